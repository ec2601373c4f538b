"""Helpers for the continual tests: tiny random "models" and straightforward references of the official
OPCM / continual-TIES loops (written independently of mergesmith, in float64, full SVDs)."""
from __future__ import annotations

from pathlib import Path

import torch

LINEAR = ("layers.0.q.weight", "layers.0.up.weight", "layers.1.down.weight")


def tiny_sd(seed: int, base: dict | None = None, scale: float = 0.05) -> dict:
    """A small state dict with linear weights (rectangular both ways), biases, a norm, an embedding, a
    0-d scalar and an integer buffer.  With ``base``: base + scale * noise (a "fine-tune")."""
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "embed_tokens.weight": torch.randn(11, 6, generator=g),
            "layers.0.q.weight": torch.randn(6, 6, generator=g),
            "layers.0.q.bias": torch.randn(6, generator=g),
            "layers.0.up.weight": torch.randn(9, 6, generator=g),
            "layers.1.down.weight": torch.randn(6, 9, generator=g),
            "layers.1.norm.weight": torch.ones(6),
            "scale": torch.tensor(0.5),
            "position_ids": torch.arange(7),
        }
    out = {}
    for k, v in base.items():
        out[k] = v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
    return out


def save_sd(sd: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _tv_norm(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a if a[k].is_floating_point())))


def ref_opcm(base: dict, models: list, alpha: float, full_diagonal: bool = True, linear=LINEAR):
    """The official FusionBench OPCM loop, literally: provisional lambda = 1, lambda_{t-1} * Delta + tau~,
    whole-model rescaling each step.  Returns (merged state dict in float64, final lambda_t)."""
    b = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    merged = {k: models[0][k].double().clone() for k in b}
    norms = [_tv_norm(models[0], base)]
    prev_lambda = 1.0
    for m in models[1:]:
        norms.append(_tv_norm(m, base))
        avg = sum(norms) / len(norms)
        new = {}
        for k in b:
            delta = merged[k] - b[k]
            tau = m[k].double() - b[k]
            if k in linear:
                u, s, vh = torch.linalg.svd(delta, full_matrices=True)
                v = vh.T
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                P = u.T @ tau @ v
                if full_diagonal:
                    P.diagonal().fill_(0)
                P[:split, :split] = 0
                tau = u @ P @ v.T
            new[k] = b[k] + prev_lambda * delta + tau
        S = _tv_norm(new, b)
        lam = S / avg
        merged = {k: b[k] + (new[k] - b[k]) * avg / S for k in b}
        prev_lambda = lam
    return merged, prev_lambda


def ref_continual_ties(base: dict, models: list, lam: float = 0.5, density: float = 0.2, merge_func: str = "sum"):
    """FusionBench's ContinualTiesMergingForCLIP loop with its ties_merging on flattened vectors."""
    keys = sorted(k for k, v in base.items() if v.is_floating_point())

    def flat(sd):
        return torch.cat([sd[k].double().reshape(-1) for k in keys])

    def unflat(vec):
        out, i = {}, 0
        for k in keys:
            n = base[k].numel()
            out[k] = vec[i:i + n].reshape(base[k].shape)
            i += n
        return out

    b = flat(base)
    merged = b.clone()
    for t, m in enumerate(models):
        tv = flat(m) - b
        if t == 0:
            upd = tv
        else:
            M = torch.stack([merged - b, tv])
            d = M.shape[1]
            k = d - int(d * density)
            kth = M.abs().kthvalue(k, dim=1, keepdim=True).values
            M = M * (M.abs() >= kth)
            sign = torch.sign(M.sum(0))
            sign[sign == 0] = torch.sign(sign.sum())
            keep = torch.where(sign.unsqueeze(0) > 0, M > 0, M < 0)
            sel = M * keep
            if merge_func == "sum":
                upd = sel.sum(0)
            elif merge_func == "mean":
                upd = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
            else:
                upd = sel.abs().max(0).values * sign
        merged = merged + lam * upd
    return unflat(merged)
