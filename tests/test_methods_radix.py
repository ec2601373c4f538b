"""The one radix selector (methods/_radix.py) against torch.kthvalue / torch.sort: in memory and
streamed, signed and non-negative inputs, ties, zeros of both signs, subnormals, infinities."""
from __future__ import annotations

import pytest
import torch

from mergesmith.methods._radix import Selection, high_hist, key_value, keys, kth_smallest, locate, low_hist


def _cases(nonneg: bool):
    g = torch.Generator().manual_seed(7)
    xs = [
        torch.randn(10007, generator=g),
        torch.randint(-3, 4, (5000,), generator=g).float() * 0.25,  # many ties and zeros
        torch.randn(3000, generator=g) * 1e-40,  # subnormals
        torch.cat([torch.randn(100, generator=g), torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])]),
        torch.cat([torch.zeros(50), -torch.zeros(30), torch.full((20,), -1.5), torch.full((20,), 1.5)]),
        torch.randn(70000, generator=g) * 1e3,  # dense (bincount) histogram path
        torch.tensor([2.5]),
        torch.tensor(-4.0),  # 0-d
    ]
    return [x.abs() for x in xs] if nonneg else xs


def _ranks(n: int) -> set[int]:
    return {r for r in (1, 2, n // 3 + 1, n // 2, n - 1, n) if 1 <= r <= n}


@pytest.mark.parametrize("nonneg", [False, True])
def test_kth_smallest_equals_kthvalue(nonneg):
    for x in _cases(nonneg):
        flat = x.reshape(-1)
        for r in _ranks(flat.numel()):
            got = kth_smallest(x, r, nonneg=nonneg)
            want = torch.kthvalue(flat, r).values.item()
            assert got == want, (x.shape, r, got, want)
            if want != 0.0:  # nonzero values are unique bit patterns: bit-identical
                assert torch.tensor(got).view(torch.int32) == torch.tensor(want).view(torch.int32)


def test_signed_key_is_monotone_and_invertible():
    x = torch.tensor([-float("inf"), -3.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 2.0, float("inf")])
    k = keys(x)
    assert torch.all(k[1:] > k[:-1])
    # the key's high half-word, shifted, is the histogram bucket; its low half-word the low histogram
    back = [key_value((int(v) >> 16) + (1 << 15), int(v) & 0xFFFF) for v in k]
    assert [torch.tensor(b).view(torch.int32).item() for b in back] == x.view(torch.int32).tolist()
    # non-negative keys: the bit pattern itself, and the same bucket ids either way
    a = x.abs()
    assert torch.equal(keys(a, nonneg=True), keys(a))
    for nn in (False, True):
        idx, cnt = high_hist(keys(a), nonneg=nn)
        assert idx.min() >= 1 << 15 and int(cnt.sum()) == a.numel()


def test_selection_streams_many_tensors_exactly():
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(500, generator=g) * 10 ** float(i - 3) for i in range(6)]
    parts += [torch.zeros(9), -torch.zeros(3), torch.tensor(7.5), torch.full((50,), -2.25), torch.empty(0),
              torch.randn(40000, generator=g)]
    allv = torch.cat([p.reshape(-1) for p in parts]).sort().values
    n = allv.numel()
    wanted = [1, 2, 18, n // 3, n // 2, n - 1, n]
    sel = Selection()
    sel.reduce([sel.partial(p) for p in parts], ranks=lambda count: wanted if count == n else [])
    assert sel.count == n
    sel.reduce([sel.partial(p) for p in parts])
    for r in wanted:
        assert sel.value(r) == allv[r - 1].item()
    # non-negative mode on |values| selects the same as sorting |values|
    absv = torch.cat([p.reshape(-1).abs() for p in parts]).sort().values
    sel = Selection(nonneg=True)
    sel.reduce([sel.partial(p.abs()) for p in parts], ranks=wanted)
    sel.reduce([sel.partial(p.abs()) for p in parts])
    assert [sel.value(r) for r in wanted] == [absv[r - 1].item() for r in wanted]


def test_streamed_equals_in_memory_helpers():
    x = torch.randn(9000, generator=torch.Generator().manual_seed(1))
    k = keys(x)
    b, rest = locate(high_hist(k), 4321)
    low, _ = locate(low_hist(k, b), rest)
    assert key_value(b, low) == kth_smallest(x, 4321) == x.sort().values[4320].item()


def test_bad_ranks_raise():
    x = torch.randn(10)
    for r in (0, 11):
        with pytest.raises(ValueError):
            kth_smallest(x, r)
    sel = Selection()
    with pytest.raises(ValueError):
        sel.reduce([sel.partial(x)], ranks=[11])


def test_torch_histogram_path_equals_numpy_path(monkeypatch):
    """The torch branch (used for GPU tensors) gives the same histograms as the numpy one (CPU)."""
    from mergesmith.methods import _radix as R

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(50000, generator=g) * 1e-3).to(torch.bfloat16).float().abs()
    k = keys(x, nonneg=True)
    lo = int(k.median()) & ~0xFFFF
    small = k[:1000]

    def all_hists(kk):
        b = high_hist(kk, nonneg=True)
        return [b, low_hist(kk, int(b[0][len(b[0]) // 2])), R.window_hist(kk, lo, lo + (2 << 16))]

    want = [all_hists(k), all_hists(small)]
    monkeypatch.setattr(R, "_host", lambda t: False)
    got = [all_hists(k), all_hists(small)]
    for w, h in zip(want, got):
        (wb, wl, (wbelow, ww)), (hb, hl, (hbelow, hw)) = w, h
        assert wbelow == hbelow
        for a, b in ((wb, hb), (wl, hl), (ww, hw)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
