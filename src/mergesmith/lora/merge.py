"""Merge several LoRA adapters of one base model: into one adapter (adapter space) or into the base
(a full HF folder, streamed tensor by tensor). Methods and their math: :mod:`.combine`, :mod:`.lego`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..methods.base import MergeError
from .adapter import PREFIX, LoraAdapter, open_adapter
from .combine import CombineOptions, merge_factors, merged_bias, pick_replacement
from .write import OutModule, adapter_card, adapter_config, check_output, staging, write_adapter

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key not in _DTYPES:
        raise MergeError(f"unknown dtype '{name}' (use float32, float16 or bfloat16)")
    return _DTYPES[key]


@dataclass
class MergedAdapter:
    """The merged adapter: modules (scaling 1), full tensors carried over, and its adapter_config."""

    modules: list[OutModule]
    config: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    warnings: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            out.update(m.tensors(self.dtype))
        out.update(self.extra)
        return out

    def save(self, out, overwrite: bool = False, card: str = "") -> Path:
        with staging(out, overwrite) as tmp:
            write_adapter(tmp, self.modules, self.config, dtype=self.dtype, extra_tensors=self.extra,
                          readme=adapter_card(self.config, card))
        return Path(out)


def _options(n: int, weights, method, **kw) -> CombineOptions:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise MergeError(f"{n} adapter(s) but {len(w)} weight(s)")
    return CombineOptions(method=method, weights=w, **kw)


def check_compatible(adapters: list[LoraAdapter]) -> list[str]:
    """Modules shared by several adapters must have the same kind and shapes; returns warnings."""
    seen: dict[str, tuple] = {}
    for a in adapters:
        for m in a.modules.values():
            if seen.setdefault(m.name, (m.layout, a.label))[0] != m.layout:
                raise MergeError(
                    f"module '{m.name}' differs between {seen[m.name][1]} and {a.label} "
                    f"({seen[m.name][0]} vs {m.layout}); the adapters are not for the same base model"
                )
    bases = {str(a.base_model) for a in adapters if a.base_model}
    if len(bases) > 1:
        return [f"the adapters name different base models ({', '.join(sorted(bases))}); they must share one"]
    return []


def _target_modules(adapters: list[LoraAdapter], names: list[str]) -> list[str]:
    """The inputs' suffix lists when each input targeted every module matching them, else full names."""
    cfgs = [a.config for a in adapters]
    if all(isinstance(c.get("target_modules"), list) and not c.get("layers_to_transform")
           and not c.get("layers_pattern") and not c.get("exclude_modules") for c in cfgs):
        return sorted({t for c in cfgs for t in c["target_modules"]})
    return sorted(names)


def merge_adapters(adapters, out=None, *, weights=None, method: str = "svd", rank: int | None = None,
                   density: float | None = None, majority_sign: str = "total", svd_clamp: float | None = None,
                   seed: int = 0, dtype=None, modules_to_save: str = "error", base_model: str | None = None,
                   overwrite: bool = False, lego_iters: int = 10, lego_norm: str = "linf",
                   lego_output_reweight: bool = True, svd_method: str = "exact") -> MergedAdapter:
    """Merge PEFT LoRA adapters (folders or :class:`LoraAdapter`) into one adapter; written to ``out``
    (a PEFT folder) when given. ``weights`` default to 1 each. See :mod:`.combine` for ``method``."""
    if out is not None:
        check_output(out, overwrite)
    adapters = [open_adapter(a) for a in adapters]
    if not adapters:
        raise MergeError("give at least one adapter")
    opts = _options(len(adapters), weights, method, rank=rank, density=density, majority_sign=majority_sign,
                    svd_clamp=svd_clamp, seed=seed, lego_iters=lego_iters, lego_norm=lego_norm,
                    lego_output_reweight=lego_output_reweight, svd_method=svd_method)
    if modules_to_save not in ("error", "first", "average"):
        raise MergeError(f"modules_to_save must be error, first or average, got {modules_to_save!r}")
    warnings = check_compatible(adapters)
    names = sorted({n for a in adapters for n in a.modules})
    modules = []
    for name in names:
        inputs = [a.factors(name) if name in a.modules else None for a in adapters]
        A, B = merge_factors(opts, name, inputs)
        tmpl = next(a.modules[name] for a in adapters if name in a.modules)
        kind, a_tail, b_rest = tmpl.layout
        modules.append(OutModule(name, kind, A, B, merged_bias(inputs, opts.weights),
                                 a_tail if kind == "conv" else (), b_rest[1:] if kind == "conv" else ()))
    extra = _merge_replacements(adapters, opts.weights, modules_to_save)
    cfg0 = adapters[0].config
    mts = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    config = adapter_config(
        modules, base_model=base_model or adapters[0].base_model, target_modules=_target_modules(adapters, names),
        modules_to_save=mts or None, fan_in_fan_out=any(a.fan_in_fan_out for a in adapters),
        task_type=cfg0.get("task_type"),
        bias=next((a.config["bias"] for a in adapters if a.config.get("bias", "none") != "none"), "none"),
    )
    merged = MergedAdapter(modules, config, extra, parse_dtype(dtype) or adapters[0].dtype, warnings)
    if out is not None:
        body = _card_body(adapters, opts)
        merged.save(out, overwrite=overwrite, card=body)
    return merged


def _merge_replacements(adapters, weights, policy) -> dict[str, torch.Tensor]:
    by_target: dict[str, list[int]] = {}
    for i, a in enumerate(adapters):
        for t in a.replacements:
            by_target.setdefault(t, []).append(i)
    out = {}
    for t, idx in sorted(by_target.items()):
        vals = [adapters[i].replacement(t) for i in idx]
        if len({tuple(v.shape) for v in vals}) > 1:
            raise MergeError(f"adapters carry '{t}' with different shapes; they are not for the same base model")
        key = adapters[idx[0]].replacements[t]
        out[key if key.startswith(PREFIX) else PREFIX + key] = pick_replacement(
            t, vals, [float(weights[i]) for i in idx], policy, [adapters[i].label for i in idx])
    return out


def _card_body(adapters, opts: CombineOptions) -> str:
    lines = [f"Merged by mergesmith `lora-merge`, method `{opts.method}`"
             + (f", rank {opts.rank}" if opts.rank else "") + (f", density {opts.density}" if opts.density is not None else "")
             + f", seed {opts.seed}.", "", "| adapter | weight |", "|---|---|"]
    lines += [f"| `{a.label}` | {w} |" for a, w in zip(adapters, opts.weights)]
    return "\n".join(lines)


def merge_adapters_into_base(base, adapters, out, *, weights=None, method: str = "svd", rank: int | None = None,
                             density: float | None = None, majority_sign: str = "total", seed: int = 0,
                             dtype=None, shard_size="2GB", modules_to_save: str = "error", overwrite: bool = False,
                             threads: int | None = None, progress: bool = False, lego_iters: int = 10,
                             lego_norm: str = "linf", lego_output_reweight: bool = True,
                             svd_method: str = "exact") -> Path:
    """Write ``base + merged ΔW`` of ``adapters`` as a full HF folder. Dense methods add the merged ΔW
    without SVD truncation unless ``rank`` is given. The lazy :class:`~.apply.AdaptedCheckpoint` is
    streamed through the engine as a one-model ``passthrough`` plan, so output, config, tokenizer files,
    model card and provenance are those of every merge."""
    from ..io.checkpoint import open_checkpoint
    from ..io.writer import parse_size
    from ..plan import Planner
    from ..recipe import load_recipe
    from ..io.atomic import check_output_dir
    from ..run import write_plan
    from .apply import AdaptedCheckpoint

    out = Path(out).expanduser().resolve()
    check_output_dir(out, overwrite)
    try:
        size = parse_size(shard_size)
    except ValueError as e:
        raise MergeError(str(e)) from None
    adapters = [open_adapter(a) for a in adapters]
    if not adapters:
        raise MergeError("give at least one adapter")
    opts = _options(len(adapters), weights, method, rank=rank, density=density, majority_sign=majority_sign,
                    seed=seed, lego_iters=lego_iters, lego_norm=lego_norm, lego_output_reweight=lego_output_reweight,
                    svd_method=svd_method)
    check_compatible(adapters)
    ckpt = AdaptedCheckpoint(open_checkpoint(base), adapters, opts, replace=modules_to_save)
    label = "+".join([str(base)] + [a.label for a in adapters])
    recipe = {"merge_method": "passthrough", "models": [{"model": label}]}
    if dtype is not None:
        recipe["dtype"] = str(parse_dtype(dtype)).replace("torch.", "")
    plan = Planner(load_recipe(recipe), opener=lambda ref: ckpt if ref == label else open_checkpoint(ref)).build()
    write_plan(plan, out, threads=threads, shard_size=size, overwrite=overwrite, progress=progress)
    return out
