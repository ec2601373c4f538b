"""Small training and saving helpers shared by the zoo builders."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch


def train(params: Iterable[torch.Tensor], loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
          weight_decay: float = 0.0, warmup: int = 20) -> float:
    """AdamW for ``steps`` steps on ``loss_fn(step)`` with linear warm-up then cosine decay.
    Returns the last loss."""
    import math

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    last = float("nan")
    for step in range(steps):
        scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
    return last


def save_model(folder: Path, state_dict: dict, config: dict) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (contiguous float32 copies) into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def batch_sampler(n: int, batch: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Deterministic random index batches: ``sample(step)`` -> LongTensor[batch]."""
    g = torch.Generator().manual_seed(seed)

    def sample(step: int) -> torch.Tensor:
        return torch.randint(0, n, (batch,), generator=g)

    return sample
