"""Extract a LoRA adapter from a full fine-tune: truncated SVD of each weight delta.

For every weight of a Linear / GPT-2 Conv1D / ConvNd (and Embedding with ``embed_lora``) module that
changed: ΔW = W_ft - W_base (float32, in adapter orientation out x in_flat), ΔW = U S V^T (exact, or randomized),
keep k = min(rank, #{σ > sv_epsilon}) components: B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T
(``distribute_scale``, mergekit's default) or B = U_k S_k, A = V_k^T. The best rank-k approximation
(Eckart-Young); its relative Frobenius error sqrt(Σ_{j>k} σ_j² / Σ_j σ_j²) is reported per module.
The adapter is written with scaling 1 (lora_alpha = r per module).

Other changed tensors (norms, embeddings without ``embed_lora``, biases of modules without a LoRA,
vocabulary-resized embeddings) go to ``modules_to_save`` as full copies unless ``skip_undecomposable``;
bias deltas of LoRA modules become ``lora_B.bias`` (``lora_bias``). Reads one tensor pair at a time.

Module types come from building the base architecture (``config.architectures``) on the meta device with
transformers (no weights, no remote code); without it, names and shapes decide (no Conv1D detection).
Like mergekit's ``mergekit-extract-lora`` (anchors/mergekit.md §3.3), but streaming and without
downloads.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..methods import kernels as K
from ..methods.base import MergeError
from .adapter import PREFIX
from .write import OutModule, adapter_card, adapter_config, check_output, staging, write_adapter

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_EMBED_NAME = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")
LORA_KINDS = ("linear", "conv1d", "conv")


def module_kinds(ckpt) -> dict[str, str] | None:
    """{module name: linear | conv1d | embedding | conv | other} from the base architecture built on the
    meta device, or None when transformers cannot build it."""
    cfg = ckpt.config
    if not cfg or not cfg.get("model_type"):
        return None
    try:
        import transformers
        from torch import nn
        from transformers.pytorch_utils import Conv1D

        config = transformers.AutoConfig.for_model(**cfg)
        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls._from_config(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - unknown or custom architecture: fall back to names
        return None
    kinds = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(mod, nn.Linear):
            kinds[name] = "linear"
        elif isinstance(mod, nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kinds[name] = "conv" if mod.groups == 1 else "other"
        else:
            kinds[name] = "other"
    return kinds


def guess_kind(name: str, shape: tuple) -> str:
    if len(shape) == 2:
        return "embedding" if _EMBED_NAME.search(name) else "linear"
    return "conv" if 3 <= len(shape) <= 5 else "other"


@dataclass
class ModuleReport:
    module: str
    kind: str
    shape: list
    rank: int
    rel_error: float
    delta_norm: float


@dataclass
class ExtractReport:
    modules: list[ModuleReport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unchanged: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        errs = [m.rel_error for m in self.modules]
        return {
            "modules": [m.__dict__ for m in self.modules],
            "modules_to_save": self.modules_to_save,
            "dropped": self.dropped,
            "unchanged_tensors": self.unchanged,
            "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
            "max_rel_error": max(errs) if errs else 0.0,
            "warnings": self.warnings,
        }


def _orient(kind: str, delta: torch.Tensor) -> torch.Tensor:
    if kind in ("conv1d", "embedding"):
        return delta.T
    return delta.reshape(delta.shape[0], -1)


def _low_rank(delta2: torch.Tensor, rank: int, sv_epsilon: float, distribute: bool, method: str):
    A, B, S = K.lowrank_factors(delta2, rank, split="sqrt" if distribute else "us", method=method)
    keep = max(1, min(A.shape[0], int((S > sv_epsilon).sum()))) if sv_epsilon > 0 else A.shape[0]
    A, B = A[:keep], B[:, :keep]
    S = S.double()
    if S.numel() == min(delta2.shape):  # every singular value known: the exact tail
        rest, total = float((S[keep:] ** 2).sum()), float((S ** 2).sum())
    else:  # randomized: energy not captured by the kept values
        total = float((delta2.double() ** 2).sum())
        rest = max(0.0, total - float((S[:keep] ** 2).sum()))
    return A, B, (math.sqrt(rest / total) if total > 0 else 0.0)


@dataclass
class _Parts:
    """What an extraction collects: LoRA modules, bias deltas of LoRA-able modules, and full copies
    (modules_to_save: module -> {param: tensor})."""

    ft: object
    report: ExtractReport
    modules: dict = field(default_factory=dict)
    bias: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)

    def keep_full(self, module: str, param: str) -> None:
        self.full.setdefault(module, {})[param] = self.ft.get(f"{module}.{param}")

    def demote(self, module: str, why: str) -> None:
        """LoRA module -> full copy."""
        self.report.warnings.append(f"{module}: saved in full, since {why}")
        self.report.modules = [r for r in self.report.modules if r.module != module]
        del self.modules[module]
        self.keep_full(module, "weight")

    def finish(self, b, skip_undecomposable: bool) -> str | None:
        """Attach bias deltas, apply PEFT's constraints, complete full copies; returns the tied embedding
        that needs ``ensure_weight_tying`` (or None)."""
        for module, d in self.bias.items():
            if module in self.modules:
                self.modules[module].bias = d
            else:
                self.keep_full(module, "bias")
        if any(m.bias is not None for m in self.modules.values()):
            for module in [k for k, m in self.modules.items() if m.kind == "embedding"]:
                self.demote(module, "PEFT does not allow lora_bias with embedding LoRA")
        embeds = [k for k, m in self.modules.items() if m.kind == "embedding"]
        tied = _tied_embedding(b, embeds + list(self.full), self.report)
        if tied in self.modules:
            self.demote(tied, "it is tied to the LM head (PEFT ties modules_to_save copies, not embedding LoRA)")
        for module in [m for m in self.full if m in self.modules]:  # PEFT cannot hold both for one module
            self.report.warnings.append(f"{module}: has both a LoRA and a full tensor change; the full change is dropped")
            self.report.dropped.append(module)
            del self.full[module]
        if skip_undecomposable:
            self.report.dropped += sorted(self.full)
            self.full = {}
        for module, params in self.full.items():  # PEFT's modules_to_save wrapper needs every tensor
            for p in ("weight", "bias"):
                if p not in params and f"{module}.{p}" in self.ft:
                    self.keep_full(module, p)
        self.report.modules_to_save = sorted(self.full)
        return tied if tied in self.full else None


def extract_lora(fine_tuned, base, out=None, *, rank: int = 32, sv_epsilon: float = 0.0,
                 distribute_scale: bool = True, embed_lora: bool = False, skip_undecomposable: bool = False,
                 include: list[str] | None = None, exclude: list[str] | None = None, dtype=None,
                 overwrite: bool = False, svd_method: str = "exact", on_module=None) -> ExtractReport:
    """Extract a PEFT LoRA adapter (written to ``out`` when given) from ``fine_tuned`` relative to ``base``.
    ``include`` / ``exclude``: regexes on module names (``re.search``). ``on_module(report)`` is called
    after each decomposed module (progress). ``svd_method="randomized"``: randomized SVD (much faster on
    large matrices when rank << their size; approximate)."""
    from ..io.checkpoint import open_checkpoint
    from .merge import parse_dtype

    if int(rank) < 1:
        raise MergeError(f"rank must be >= 1, got {rank}")
    if svd_method not in ("exact", "randomized"):
        raise MergeError(f"svd_method must be exact or randomized, got {svd_method!r}")
    if out is not None:
        check_output(out, overwrite)
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    ft, b = open_checkpoint(fine_tuned), open_checkpoint(base)
    kinds = module_kinds(b)
    report = ExtractReport()
    if kinds is None:
        report.warnings.append("could not build the base architecture; module types guessed from names (GPT-2 Conv1D is not detected)")
    parts = _Parts(ft, report)
    out_dtype = None
    for name in ft.keys():
        meta = ft.meta(name)
        module, _, param = name.rpartition(".")
        if meta.dtype not in FLOAT_DTYPES or (inc and not any(p.search(module) for p in inc)) \
                or any(p.search(module) for p in exc):
            continue
        if name not in b:
            report.warnings.append(f"{name} is not in the base model; skipped")
            continue
        kind = (kinds or {}).get(module) or guess_kind(name, meta.shape)
        out_dtype = out_dtype or meta.dtype
        if tuple(b.meta(name).shape) != tuple(meta.shape):
            if kind != "embedding" and "lm_head" not in module:
                raise MergeError(f"{name}: shape {list(meta.shape)} in the fine-tune but {list(b.meta(name).shape)} in the base")
            report.warnings.append(f"{name}: vocabulary resized; saved in full (call resize_token_embeddings on the base before loading)")
            parts.keep_full(module, param)
            continue
        delta = ft.get(name).to(torch.float32) - b.get(name).to(torch.float32)
        if not bool(delta.any()):
            report.unchanged += 1
        elif param == "weight" and delta.dim() >= 2 and (kind in LORA_KINDS or (kind == "embedding" and embed_lora)):
            A, B, err = _low_rank(_orient(kind, delta), rank, sv_epsilon, distribute_scale, svd_method)
            tails = (tuple(delta.shape[1:]), (1,) * (delta.dim() - 2)) if kind == "conv" else ((), ())
            parts.modules[module] = OutModule(module, {"conv1d": "linear"}.get(kind, kind), A, B, None, *tails)
            rep = ModuleReport(module, kind, list(delta.shape), A.shape[0], err, float(torch.linalg.vector_norm(delta)))
            report.modules.append(rep)
            if on_module is not None:
                on_module(rep)
        elif param == "bias" and kind in LORA_KINDS:
            parts.bias[module] = delta
        else:
            parts.keep_full(module, param)
    tied = parts.finish(b, skip_undecomposable)
    if not parts.modules:
        if not parts.full:
            raise MergeError(f"{fine_tuned} does not differ from {base} in any selected tensor; nothing to extract")
        raise MergeError("no weight of a Linear/Conv module changed; a LoRA adapter cannot represent this fine-tune")
    if out is not None:
        mods = [parts.modules[k] for k in sorted(parts.modules)]
        extra = {f"{PREFIX}{m}.{p}": t.contiguous() for m, ps in parts.full.items() for p, t in ps.items()}
        config = adapter_config(
            mods, base_model=str(base), target_modules=_targets(sorted(parts.modules), kinds, embed_lora),
            modules_to_save=sorted(parts.full) or None,
            fan_in_fan_out=any(kinds and kinds.get(m) == "conv1d" for m in parts.modules),
        )
        if tied:  # PEFT ties lm_head to the embed_tokens copy and expects lm_head's tensor in the file
            config["ensure_weight_tying"] = True
            extra[f"{PREFIX}lm_head.weight"] = parts.full[tied]["weight"].clone()
        _save(out, overwrite, mods, config, parse_dtype(dtype) or out_dtype or torch.float32, extra, report)
    return report


def _tied_embedding(b, changed: list[str], report: ExtractReport) -> str | None:
    """The changed word embedding when it is tied to the LM head and named embed_tokens (PEFT keeps such
    weights tied with ``ensure_weight_tying``, implemented for embed_tokens / lm_head only); a warning for
    other tied embeddings (GPT-2 ``wte``), whose change PEFT can apply on the input side only."""
    cfg = b.config or {}
    if not cfg.get("tie_word_embeddings", True) or "lm_head.weight" in b:
        return None
    for m in changed:
        w = f"{m}.weight"
        if w in b and len(b.meta(w).shape) == 2 and b.meta(w).shape[0] == cfg.get("vocab_size"):
            if m.rpartition(".")[2] == "embed_tokens":
                return m
            report.warnings.append(f"{m} is tied to the LM head; PEFT applies its change on the input side only "
                                   "(PEFT keeps weights tied only for modules named embed_tokens)")
    return None


def _targets(names: list[str], kinds: dict | None, embed_lora: bool) -> list[str]:
    """Suffixes (q_proj, ...) when every module of the model with such a suffix is extracted, else full names."""
    if kinds is None:
        return names
    chosen = set(names)
    suffixes = {n.rpartition(".")[2] for n in names}
    ok_kinds = LORA_KINDS + (("embedding",) if embed_lora else ())
    for s in suffixes:
        others = [m for m, k in kinds.items() if m.rpartition(".")[2] == s and k in ok_kinds]
        if any(m not in chosen for m in others):
            return names
    return sorted(suffixes)


def _save(out, overwrite, mods, config, dtype, extra, report: ExtractReport) -> None:
    import json

    d = report.to_dict()
    body = (f"Extracted by mergesmith `extract-lora`: {len(mods)} LoRA module(s), "
            f"mean relative error {d['mean_rel_error']:.4g}, max {d['max_rel_error']:.4g}; "
            f"{len(report.modules_to_save)} module(s) saved in full.")
    with staging(out, overwrite) as tmp:
        write_adapter(tmp, mods, config, dtype=dtype, extra_tensors={k: v.to(dtype) for k, v in extra.items()},
                      readme=adapter_card(config, body))
        (Path(tmp) / "extract_report.json").write_text(json.dumps(d, indent=2) + "\n")
