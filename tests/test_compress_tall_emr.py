"""`mergesmith compress` / `extract`: bit packing, TALL and EMR round trips on a tiny Llama (hidden 32,
2 layers, vocab 64) against independent references, bytes saved, closeness of rebuilt experts, CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import _tokenizer, build_model, cli, load_state

from mergesmith import merge_state_dicts
from mergesmith.compress import Artefact, compress_experts, extract_expert
from mergesmith.compress.storage import pack_masks, unpack_mask
from mergesmith.methods.base import MergeError

N = 3


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    _tokenizer(folder, model.config.vocab_size)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny Llama base and 3 'localized' experts: each changes its own random 3 % of the weights
    (N(0, 0.05^2)) plus dense N(0, 1e-4^2) noise everywhere — the paper's premise, task vectors that
    barely overlap."""
    root = tmp_path_factory.mktemp("compress_zoo")
    base = build_model("llama", 0, num_hidden_layers=2)
    paths = {"base": _save(base, root / "base")}
    for t in range(N):
        m = build_model("llama", 0, num_hidden_layers=2)
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in m.parameters():
                support = torch.rand(p.shape, generator=g) < 0.03
                p.add_(support * torch.randn(p.shape, generator=g) * 0.05 + torch.randn(p.shape, generator=g) * 1e-4)
        paths[f"local{t}"] = _save(m, root / f"local{t}")
    return paths


def _experts(zoo, kind):
    return [zoo[f"{kind}{t}"] for t in range(N)]


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    for shape in [(), (1,), (7,), (8,), (3, 5), (2, 3, 4)]:
        masks = torch.rand((N,) + shape, generator=g) < 0.5
        packed = pack_masks(masks)
        numel = torch.Size(shape).numel()
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (N, (numel + 7) // 8)
        for t in range(N):
            assert torch.equal(unpack_mask(packed[t], shape), masks[t])


def _rel_error(a: dict, b: dict, base: dict) -> float:
    num = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in base)
    den = sum(float(((b[k].float() - base[k].float()) ** 2).sum()) for k in base)
    return (num / den) ** 0.5


def test_tall_roundtrip_matches_reference(zoo, tmp_path):
    rep = compress_experts(zoo["base"], _experts(zoo, "local"), tmp_path / "set", mask_lambda=[0.4, 0.5, 0.6])
    base = load_state(zoo["base"])
    experts = [load_state(p) for p in _experts(zoo, "local")]
    for t in range(N):
        got = extract_expert(tmp_path / "set", t)
        for k in base:
            taus = [e[k] - base[k] for e in experts]
            total = sum(taus)
            mask = taus[t].abs() >= [0.4, 0.5, 0.6][t] * (total - taus[t]).abs()
            assert torch.allclose(got[k], base[k] + mask * total, atol=1e-6), k
        assert rep["tasks"][t]["relative_error"] == pytest.approx(_rel_error(got, experts[t], base), rel=1e-4)
    assert [t["name"] for t in rep["tasks"]] == ["local0", "local1", "local2"]


def test_emr_roundtrip_matches_reference(zoo, tmp_path):
    rep = compress_experts(zoo["base"], _experts(zoo, "local"), tmp_path / "set", method="emr", names=["a", "b", "c"])
    base = load_state(zoo["base"])
    for t, name in enumerate("abc"):
        got = extract_expert(tmp_path / "set", name)
        ref = merge_state_dicts("emr", [str(p) for p in _experts(zoo, "local")], base=str(zoo["base"]), task=t)
        for k in base:
            assert torch.allclose(got[k], ref[k], atol=1e-6), k
        assert rep["tasks"][t]["scale"] != 1.0


def test_emr_single_expert_is_exact(zoo, tmp_path):
    compress_experts(zoo["base"], [zoo["local0"]], tmp_path / "one", method="emr")
    got = extract_expert(tmp_path / "one", 0)
    base, exp = load_state(zoo["base"]), load_state(zoo["local0"])
    for k in base:
        assert torch.equal(got[k], base[k] + (exp[k] - base[k]))


def test_bytes_saved_and_closeness_of_localized_experts(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 2, 40]])
    base = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    originals = [AutoModelForCausalLM.from_pretrained(zoo[f"local{t}"]).eval() for t in range(N)]
    # TALL retrieves the experts closely; EMR's sign-agreement masks also take in the other experts'
    # updates wherever an expert's own delta is tiny noise of the same sign, so it is looser here.
    for method, max_rel, max_logit in (("tall", 0.25, 0.15), ("emr", 0.8, 0.9)):
        out = tmp_path / method
        rep = compress_experts(zoo["base"], _experts(zoo, "local"), out, method=method)
        model_bytes = sum(v.numel() * v.element_size() for v in load_state(zoo["base"]).values())
        assert rep["experts_bytes"] == N * model_bytes
        assert rep["artefact_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        assert rep["saved_bytes"] == rep["experts_bytes"] - rep["artefact_bytes"] and rep["ratio"] > 2.4
        for t in range(N):
            assert rep["tasks"][t]["relative_error"] < max_rel
            rebuilt = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
            rebuilt.load_state_dict(extract_expert(out, t))
            with torch.no_grad():
                lr, lo, lb = rebuilt(ids).logits, originals[t](ids).logits, base(ids).logits
            # the rebuilt expert is much closer to its original than the base is
            assert (lr - lo).abs().max() < max_logit * (lb - lo).abs().max()


def test_extract_outputs_hf_folder_and_file(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    compress_experts(zoo["base"], _experts(zoo, "local"), tmp_path / "set", dtype="bfloat16")
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["tensors"]["lm_head.weight"]["stored_dtype"] == "bfloat16"
    mem = extract_expert(tmp_path / "set", "local1")
    folder = extract_expert(tmp_path / "set", "local1", tmp_path / "hf")
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(v, mem[k]), k
    f = extract_expert(tmp_path / "set", 1, tmp_path / "local1.safetensors")
    from safetensors.torch import load_file

    single = load_file(f)
    assert set(single) == set(mem) and all(torch.equal(single[k], mem[k]) for k in mem)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_tall_with_global_ties_vector(zoo, tmp_path):
    compress_experts(zoo["base"], _experts(zoo, "local"), tmp_path / "set", merge="ties",
                     merge_params={"density": 0.2, "agg": "sum"})
    art = Artefact(tmp_path / "set")
    ref = merge_state_dicts("ties", [str(p) for p in _experts(zoo, "local")], base=str(zoo["base"]), density=0.2, agg="sum")
    base = load_state(zoo["base"])
    for k in base:
        assert torch.allclose(art.vector.get(k), ref[k] - base[k], atol=1e-6), k


def test_compress_from_state_dicts_needs_base_at_extract(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "step": torch.tensor(7)}
    experts = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
               for _ in range(2)]
    compress_experts(base, experts, tmp_path / "set", method="emr")
    with pytest.raises(MergeError, match="--base"):
        extract_expert(tmp_path / "set", 0)
    out = extract_expert(tmp_path / "set", 0, base=base)
    assert out["step"].dtype == torch.int64 and int(out["step"]) == 7
    with pytest.raises(MergeError, match="shape"):
        extract_expert(tmp_path / "set", 0, base={"w": torch.zeros(5, 4), "b": base["b"], "step": base["step"]})


def test_cli_compress_extract_and_errors(zoo, tmp_path, capsys):
    experts = _experts(zoo, "local")
    out = tmp_path / "set"
    assert cli("compress", *experts, "-b", zoo["base"], "-o", out, "--method", "emr") == 0
    text = capsys.readouterr().out
    assert "saved" in text and "local2" in text
    assert cli("extract", out, "-t", "local0", "-o", tmp_path / "e0") == 0
    assert (tmp_path / "e0" / "model.safetensors").exists()
    errors = [
        ("compress", *experts, "-b", zoo["base"], "-o", out),  # output exists
        ("compress", *experts, "-b", tmp_path / "nope", "-o", tmp_path / "x1"),  # missing base
        ("compress", *experts, "-b", zoo["base"], "-o", tmp_path / "x2", "--method", "zip"),
        ("compress", *experts, "-b", zoo["base"], "-o", tmp_path / "x3", "-p", "density"),
        ("compress", *experts, "-b", zoo["base"], "-o", tmp_path / "x4", "--merge", "ties", "-p", "densty=0.2"),
        ("compress", *experts, "-b", zoo["base"], "-o", tmp_path / "x5", "--mask-lambda", "0.5,0.2"),
        ("compress", *experts, "-b", zoo["base"], "-o", tmp_path / "x6", "--names", "a,a,b"),
        ("extract", out, "-t", "nosuch", "-o", tmp_path / "e1"),
        ("extract", out, "-t", "7", "-o", tmp_path / "e2"),
        ("extract", tmp_path / "e0", "-t", "0", "-o", tmp_path / "e3"),  # not a compressed set
        ("extract", out, "-t", "0", "-o", tmp_path / "e0"),  # output exists
    ]
    for args in errors:
        assert cli(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    other = build_model("llama", 0, num_hidden_layers=2, vocab_size=80)
    _save(other, tmp_path / "other")
    assert cli("compress", experts[0], tmp_path / "other", "-b", zoo["base"], "-o", tmp_path / "x7") == 2
    assert "shape" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
