"""Planner: from a recipe and the inputs' headers to an ordered list of tensor jobs.

Only headers are read (names, shapes, dtypes). Every user error — unknown method or parameter, missing
model or tensor, shape mismatch, missing base, bad layer ranges, missing required parameter — is
raised here, before a byte of weights is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .io import layouts
from .io.checkpoint import Checkpoint, open_checkpoint
from .layers import layer_index, layer_stack, replace_layer_index, stack_depths
from .methods.base import MergeError, MethodSpec, Params, get_method
from .recipe import DTYPES, Recipe, default_layer, resolve_params, validate_param_names

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PRE_LAYER_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "shared.")


@dataclass(frozen=True)
class InputRef:
    """One tensor of one input checkpoint; ``rows`` truncates dim 0 (vocabulary truncation)."""

    model: int
    name: str
    rows: int | None = None


@dataclass
class TensorJob:
    out_name: str
    shape: tuple
    dtype: torch.dtype
    method: str | None  # None: copy models[0]
    base: InputRef | None
    models: list[InputRef]
    params: Params
    layer: int | None
    num_layers: int | None
    align: Any = None  # io.vocab.VocabAlign: rows re-indexed to the output vocabulary (tokenizer_source)

    def describe_params(self) -> str:
        if self.method is None:
            return "copy"
        parts = []
        for k, v in self.params.items():
            if isinstance(v, list):
                v = "[" + ", ".join(_fmt(x) for x in v) + "]"
            else:
                v = _fmt(v)
            parts.append(f"{k}={v}")
        return " ".join(parts)


def _fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


@dataclass
class Plan:
    method: MethodSpec
    inputs: list[Checkpoint]
    jobs: list[TensorJob]
    seed: int
    config: dict | None
    recipe: Recipe | None = None
    tokenizer_donor: Checkpoint | None = None
    warnings: list[str] = field(default_factory=list)
    tokenizer: Any = None  # a built tokenizer to save (union, or tokens added) instead of copying files

    @property
    def output_bytes(self) -> int:
        total = 0
        for j in self.jobs:
            n = 1
            for s in j.shape:
                n *= s
            total += n * torch.empty((), dtype=j.dtype).element_size()
        return total

    def entries(self) -> dict[str, tuple[tuple, torch.dtype]]:
        return {j.out_name: (j.shape, j.dtype) for j in self.jobs}

    def describe(self) -> str:
        lines = [f"method: {self.method.name}   seed: {self.seed}"]
        for i, c in enumerate(self.inputs):
            lines.append(f"input {i}: {c.label}")
        lines.append(f"{len(self.jobs)} output tensors, {self.output_bytes / 1e6:.1f} MB")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for j in self.jobs:
            src = ", ".join(f"{r.model}:{r.name}" for r in ([j.base] if j.base else []) + j.models)
            dt = str(j.dtype).replace("torch.", "")
            vocab = "  (rows re-indexed to the output vocabulary)" if j.align is not None else ""
            lines.append(f"  {j.out_name}  {list(j.shape)} {dt}  <- {j.method or 'copy'}({src})  {j.describe_params()}{vocab}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method.name,
            "seed": self.seed,
            "inputs": [c.label for c in self.inputs],
            "jobs": [
                {
                    "name": j.out_name, "shape": list(j.shape), "dtype": str(j.dtype).replace("torch.", ""),
                    "method": j.method, "base": j.base.__dict__ if j.base else None,
                    "models": [r.__dict__ for r in j.models], "params": dict(j.params), "layer": j.layer,
                    "vocab_aligned": j.align is not None,
                }
                for j in self.jobs
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def num_layers_of(ckpt: Checkpoint, pattern=None) -> int | None:
    cfg = ckpt.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    idx = [layer_index(k, pattern) for k in ckpt.keys()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else None


def _t_of(layer: int | None, n: int | None) -> float:
    """mergekit's gradient position: layer/(n-1); outside the stack 0; a one-layer stack 1."""
    if layer is None or n is None:
        return 0.0
    return 1.0 if n <= 1 else layer / (n - 1)


def _tie_setting(ckpt: Checkpoint) -> bool | None:
    """The input's ``tie_word_embeddings`` (top level, else its ``text_config``'s), None when unset."""
    cfg = ckpt.config or {}
    tied = cfg.get("tie_word_embeddings")
    if tied is None and isinstance(cfg.get("text_config"), dict):
        tied = cfg["text_config"].get("tie_word_embeddings")
    return tied


def _tied(ckpt: Checkpoint) -> bool:
    return bool(_tie_setting(ckpt))


CONFIG_KEYS_TO_COMPARE = ("max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
                          "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                          "layer_norm_eps", "hidden_act", "model_type")
# computed buffers that older checkpoints store and newer ones do not (transformers rebuilds them): when only
# some inputs have one, the reference input's copy is written
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "embeddings.position_ids")
TIED_TO = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                              "embed_tokens.weight", "model.language_model.embed_tokens.weight")}


def tensor_name(ck: Checkpoint, name: str) -> str:
    """``name``; in a VLM stored in the other transformers layout, the same tensor's name there (io.layouts);
    or for an output head an input with tied embeddings does not store (``lm_head.weight`` with
    ``tie_word_embeddings`` not false), the embedding it is tied to, as mergekit's ``tied_names`` do."""
    if name in ck:
        return name
    other = layouts.stored_name(ck, name)  # a VLM's tensor in the other transformers layout of names
    if other is not None:
        return other
    if _tie_setting(ck) is not False:
        for alias in TIED_TO.get(name, ()):
            if alias in ck:
                return alias
    raise MergeError(f"tensor '{name}' is missing from {ck.label}")


def _is_embedding_like(name: str) -> bool:
    n = name.lower()
    return any(h in n for h in ("embed", "wte", "lm_head", "output.weight", "word_embeddings"))


class Planner:
    """Build a :class:`Plan`. ``opener`` maps a model reference to a Checkpoint (headers only)."""

    def __init__(self, recipe: Recipe, opener: Callable[[Any], Checkpoint] | None = None, seed: int | None = None):
        self.recipe = recipe
        # a bare PEFT adapter folder among the inputs opens as base_model+adapter
        self.opener = opener or (lambda ref: open_checkpoint(ref, base=recipe.base_model))
        self.seed = recipe.seed if seed is None else seed
        self._open: dict[str, int] = {}
        self.inputs: list[Checkpoint] = []
        self.warnings: list[str] = []
        self._module: tuple[str, list[str]] | None = None  # (this module, the recipe's modules): modules.py
        self._fingerprints: dict[int, str | None] = {}  # input -> io.vocab.vocabulary_fingerprint

    # -- inputs -------------------------------------------------------------------------------------
    def _input(self, ref: Any) -> int:
        key = ref if isinstance(ref, str) else f"obj:{id(ref)}"
        if key not in self._open:
            self._open[key] = len(self.inputs)
            self.inputs.append(self.opener(ref))
        return self._open[key]

    # -- main ---------------------------------------------------------------------------------------
    def build(self) -> Plan:
        r = self.recipe
        spec = get_method(r.merge_method)
        self._validate_param_names(spec)
        out_dtype = getattr(torch, DTYPES[r.out_dtype or r.dtype]) if (r.out_dtype or r.dtype) else None
        self._vocab = None
        if r.tokenizer_donor == "union" or r.vocab_pad or r.vocab_tokens:
            self._vocab = self._output_vocab()  # built before the jobs: every job's rows depend on it
        if r.modules is not None:
            jobs, ref, cfg = self._plan_modules(spec, out_dtype)
        elif r.slices is not None:
            jobs, ref, cfg = self._plan_slices(spec, out_dtype)
        else:
            jobs, ref, cfg = self._plan_models(spec, out_dtype)
        if not jobs:
            raise MergeError("the plan is empty: no tensors to write")
        self._validate_jobs(spec, jobs)
        donor = None
        tok = r.tokenizer_donor
        if tok == "union":
            donor = None
        elif tok in (None, "base"):
            donor = ref
        else:
            donor = self.inputs[self._input(tok)] if tok not in self._open else self.inputs[self._open[tok]]
        if cfg is not None:
            cfg = dict(cfg)
            dt = jobs_dtype(jobs)
            if dt is not None:
                name = str(dt).replace("torch.", "")
                cfg["torch_dtype"] = name
                if "dtype" in cfg or "transformers_version" in cfg:
                    cfg["dtype"] = name
        self._warn_config_differences(ref)
        self._warn_paper_defaults(spec)
        aligned = [j.align for j in jobs if j.align is not None]
        if aligned and cfg is not None:
            cfg["vocab_size"] = aligned[0].size
        built = self._vocab.tokenizer if self._vocab is not None and self._vocab.built else None
        return Plan(method=spec, inputs=self.inputs, jobs=jobs, seed=self.seed, config=cfg, recipe=r,
                    tokenizer_donor=donor, warnings=list(dict.fromkeys(self.warnings)), tokenizer=built)

    def _warn_config_differences(self, ref: Checkpoint) -> None:
        """Inputs whose configs differ in what the weights do not show (context length, RoPE, attention
        heads, norm eps): the output takes the reference's, said in a warning (mergekit is silent: its #667)."""
        cfgs = [(c.label, c.config) for c in self.inputs if c.config]
        if ref.config is None or len(cfgs) < 2:
            return
        for key in CONFIG_KEYS_TO_COMPARE:
            values = {json.dumps(cfg.get(key), sort_keys=True) for _, cfg in cfgs if key in cfg}
            if len(values) > 1:
                self.warnings.append(f"inputs differ in config `{key}` ({', '.join(sorted(values))}); the output "
                                     f"takes {ref.label}'s: {json.dumps(ref.config.get(key))}")

    def _output_vocab(self):
        """The output vocabulary of ``tokenizer_source`` / ``tokenizer:`` (io.vocab.OutputVocab)."""
        from .io import vocab

        r = self.recipe
        refs = ([r.base_model] if r.base_model is not None else []) + [e.model for e in r.models or []]
        refs += [src.model for sl in r.slices or [] for src in sl.sources]  # a frankenmerge's sources, in order
        for m in (r.modules or {}).values():
            refs += [e.model for e in m.models or []] + [src.model for sl in m.slices or [] for src in sl.sources]
        order = list(dict.fromkeys(self._input(m) for m in refs))
        tok = r.tokenizer_donor
        source = None if tok == "union" else order[0] if tok in (None, "base") else self._input(tok)
        out = vocab.aligned_vocab(self.inputs, order, order[0], source, tuple(r.vocab_tokens or ()))
        self.warnings.extend(out.warnings)
        return out

    def _same_vocabularies(self, members: list[int]) -> bool:
        """Whether the inputs ``members``, the base and the tokenizer source have equal tokenizer files (inputs
        without any count as the base's), checked without transformers (io.vocab.vocabulary_fingerprint)."""
        from .io import vocab

        r = self.recipe
        idx = list(members)
        if r.base_model is not None:
            idx.append(self._input(r.base_model))
        if r.tokenizer_donor not in (None, "base", "union"):
            idx.append(self._input(r.tokenizer_donor))
        for i in idx:  # once per input and plan: embed_tokens and lm_head both ask
            if i not in self._fingerprints:
                self._fingerprints[i] = vocab.vocabulary_fingerprint(self.inputs[i].folder)
        return len({self._fingerprints[i] for i in idx} - {None}) <= 1

    def _vocab_align(self, name: str, members: list[int], base: int | None, names: dict[int, str]):
        """The vocabulary re-indexing (io.vocab) of tensor ``name`` read from inputs ``members``, or None when it
        is not indexed by the vocabulary (dim 0 = each input's vocab_size, an embedding-like name) or needs none
        (no tokenizer source given, or every input has each output token at the same id)."""
        if not _is_embedding_like(name) or "position" in name.lower():
            return None
        shapes = {self.inputs[i].meta(names[i]).shape for i in members}
        if self._vocab is None:
            if self.recipe.tokenizer_donor is None or len({s[1:] for s in shapes}) > 1:
                return None
            if len(shapes) == 1 and self._same_vocabularies(members):
                return None
            # tokenizer_source base / a model, with inputs of other vocabularies (sizes, or ids: mergekit
            # re-indexes whenever a tokenizer source is given)
            self._vocab = self._output_vocab()
        r = self.recipe
        if len(shapes) == 1 and not r.vocab_pad and not r.vocab_tokens and self._vocab.identity(members):
            return None  # every input has each output token at its id: re-indexing would copy the rows
        from .io import vocab

        sizes = self._vocab.sizes
        if not all(len(self.inputs[i].meta(names[i]).shape) >= 1 and self.inputs[i].meta(names[i]).shape[0] == sizes[i] for i in members):
            return None
        tokens = vocab.token_settings(self._vocab, self.recipe.vocab_tokens, members, self._input)
        return vocab.align_for(self._vocab, members, base, self.recipe.vocab_pad, tokens)

    def _validate_jobs(self, spec: MethodSpec, jobs: list[TensorJob]) -> None:
        """Method-specific parameter checks for every tensor, and the statistics pass's own check."""
        merge_params = [j.params for j in jobs if j.method is not None]
        if spec.validate is not None:
            for j in jobs:
                if j.method is not None:
                    try:
                        spec.validate(j.params)
                    except MergeError as e:
                        raise MergeError(f"{e} (at {j.out_name})") from None
        gs = spec.stats_for(merge_params[0]) if merge_params else None
        if gs is None:
            return
        try:
            gs.check_plan(merge_params)
        except MergeError as e:
            r = self.recipe
            explicit = any("scope" in d for d in r.parameter_dicts(per_model=False))
            if explicit or not any(p.name == "scope" for p in spec.params):
                raise
            # a per-layer density (mergekit's gradients, as in its own examples) with the default whole-model
            # scope: the recipe is mergekit's, so is the per-tensor top-k it means
            for p in merge_params:
                p["scope"] = "tensor"
            self.warnings.append(f"{e.args[0].split(';')[0]}: this merge uses scope: tensor (mergekit's per-tensor "
                                 "top-k); set `scope` to choose")
            self._validate_jobs(spec, jobs)

    def _warn_paper_defaults(self, spec: MethodSpec) -> None:
        """One warning when the recipe leaves unset a parameter whose paper default differs from mergekit's
        (e.g. TIES's density 0.2 vs 1.0): a mergekit user then learns of ``defaults: mergekit``."""
        r = self.recipe
        if r.defaults != "paper" or "defaults" in r.model_fields_set or not spec.mergekit_params:
            return  # mergekit's, or the paper's chosen explicitly
        given = {k for d in r.parameter_dicts() for k in d}
        differ = [(k, spec.param(k).default, v) for k, v in spec.mergekit_params.items()
                  if k not in given and spec.param(k).default != v]
        if differ:
            paper = ", ".join(f"{k} {d}" for k, d, _ in differ)
            mk = ", ".join(f"{k} {v}" for k, _, v in differ)
            self.warnings.append(f"{spec.name}: parameters not set take the paper's defaults ({paper}); "
                                 f"`defaults: mergekit` (or --defaults mergekit) gives mergekit's ({mk})")

    def _validate_param_names(self, spec: MethodSpec) -> None:
        r = self.recipe
        validate_param_names(spec, r.parameters, "in `parameters`", self.warnings)
        entries = [(m.model, m.parameters) for m in (r.models or [])]
        for s in r.slices or []:
            validate_param_names(spec, s.parameters, "in a slice's `parameters`", self.warnings)
            entries += [(src.model, src.parameters) for src in s.sources]
        known = {p.name for p in spec.params}
        for model, params in entries:
            validate_param_names(spec, params, f"for model {model}", self.warnings)
            for k in params:
                if k in known and spec.param(k).scope == "global":
                    raise MergeError(
                        f"parameter '{k}' of '{spec.name}' is global; set it under top-level `parameters`, not for model {model}"
                    )

    def _check_counts(self, spec: MethodSpec, n: int, has_base: bool, where: str = "") -> None:
        if spec.base == "required" and not has_base:
            raise MergeError(f"method '{spec.name}' needs a base model: set `base_model`{where}")
        if n < spec.min_models:
            raise MergeError(f"method '{spec.name}' needs at least {spec.min_models} model(s) besides the base, got {n}{where}")
        if spec.max_models is not None and n > spec.max_models:
            raise MergeError(f"method '{spec.name}' takes at most {spec.max_models} model(s) besides the base, got {n}{where}")

    # -- models: whole-model merge ------------------------------------------------------------------
    def _plan_models(self, spec: MethodSpec, out_dtype):
        r = self.recipe
        entries = list(r.models or [])
        base_idx = None
        base_ref = r.base_model
        if base_ref is not None and spec.base != "none":
            base_idx = self._input(base_ref)
            entries = [e for e in entries if e.model != base_ref]
        elif base_ref is not None and not any(e.model == base_ref for e in entries):
            from .recipe import ModelEntry

            entries.append(ModelEntry(model=base_ref))  # base-free method: the base is one more input
        model_idx = [self._input(e.model) for e in entries]
        model_params = [[e.parameters] for e in entries]
        self._check_counts(spec, len(model_idx), base_idx is not None)
        ref_i = base_idx if base_idx is not None else model_idx[0]
        ref = self.inputs[ref_i]
        n_layers = num_layers_of(ref, r.layer_pattern)
        depths = stack_depths(ref.keys(), r.layer_pattern)
        jobs = []
        for name in self._output_names(ref):
            meta = ref.meta(name)
            layer = layer_index(name, r.layer_pattern)
            n = n_layers
            if len(depths) > 1 and layer is not None:  # several stacks (a VLM's text and vision): its own depth
                n = depths[layer_stack(name, r.layer_pattern)]
            if meta.dtype not in FLOAT_DTYPES:
                jobs.append(TensorJob(name, meta.shape, meta.dtype, None, None, [InputRef(ref_i, name)], Params(), layer, n))
                continue
            all_idx = ([base_idx] if base_idx is not None else []) + model_idx
            if name.endswith(BUFFER_SUFFIXES) and any(name not in self.inputs[i] for i in all_idx):
                self.warnings.append(f"{name}: a buffer not every input stores; copied from {ref.label}")
                jobs.append(TensorJob(name, meta.shape, meta.dtype, None, None, [InputRef(ref_i, name)], Params(), layer, n))
                continue
            names = {i: tensor_name(self.inputs[i], name) for i in all_idx}
            self._check_dtypes(name, list(names.items()), out_dtype)
            align = self._vocab_align(name, all_idx, base_idx, names)
            if align is not None:
                shape, rows = (align.size,) + tuple(meta.shape[1:]), None
            else:
                shape, rows = self._common_shape(name, [(i, names[i]) for i in all_idx])
            params = resolve_params(spec, name, _t_of(layer, n), [r.parameters, default_layer(spec, r.defaults)],
                                    model_params)
            base = InputRef(base_idx, names[base_idx], rows) if base_idx is not None else None
            models = [InputRef(i, names[i], rows) for i in model_idx]
            jobs.append(TensorJob(name, shape, out_dtype or meta.dtype, spec.name, base, models, params, layer, n,
                                  align))
        cfg = self._config_with_vocab(ref, jobs)
        return jobs, ref, cfg

    def _plan_modules(self, spec: MethodSpec, out_dtype):
        """mergekit's ``modules:`` (modules.py): each module planned as a ``models:`` merge of its own tensors,
        with the inputs, warnings and output vocabulary of this planner; the config (vocabulary size) from the
        text decoder's (T5: the decoder's; else the first module's)."""
        from .modules import module_of, sub_recipes

        subs = sub_recipes(self.recipe)
        names = [n for n, _, _ in subs]
        jobs, configs, seen = [], {}, set()
        for name, sub, end in subs:
            p = Planner(sub, opener=self.opener, seed=self.seed)
            p.inputs, p._open, p.warnings, p._vocab = self.inputs, self._open, self.warnings, self._vocab
            p._module = (name, names)
            p._validate_param_names(spec)
            mjobs, ref, cfg = p._plan_slices(spec, out_dtype) if sub.slices is not None else p._plan_models(spec, out_dtype)
            self._vocab = self._vocab or p._vocab
            depth = max((j.num_layers or 0 for j in mjobs if j.layer is not None), default=0)
            if end is not None and end != depth:
                raise MergeError(f"modules: {name}: layer_range [0, {end}] does not span its layer stack of {depth} "
                                 f"layers; only the text decoder's stack can be rebuilt by slices")
            if not mjobs:
                raise MergeError(f"modules: {name}: no tensor of {ref.label} belongs to it")
            jobs += mjobs
            seen |= set(ref.keys())
            configs[name] = (ref, cfg)
        stray = sorted(n for n in seen if module_of(n, names) is None)
        if stray:
            raise MergeError(f"modules: {len(stray)} tensors belong to none of the recipe's modules ({', '.join(names)}), "
                             f"e.g. {stray[0]}; add the module they belong to")
        main = next((m for m in ("text_decoder", "decoder") if m in configs), names[0])  # the vocabulary's module
        return jobs, configs[main][0], configs[main][1]

    def _output_names(self, ref: Checkpoint) -> list[str]:
        names = self._names(ref)
        if _tied(ref) and "lm_head.weight" in names and any("embed_tokens" in n or n.endswith("wte.weight") for n in names):
            self.warnings.append("tie_word_embeddings is set: lm_head.weight is not written (it stays tied)")
            names = [n for n in names if n != "lm_head.weight"]
        return names

    def _check_dtypes(self, name: str, refs: list[tuple[int, str]], out_dtype) -> None:
        """Inputs stored in different float dtypes need ``dtype:`` / ``out_dtype:``: which one to write would
        be a guess (mergekit promotes bf16 + fp16 to a float32 output, twice the size)."""
        if out_dtype is not None:
            return
        dtypes = {self.inputs[i].meta(t).dtype for i, t in refs if t in self.inputs[i]}  # missing: _common_shape
        if len(dtypes) > 1:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
            raise MergeError(f"dtype mismatch for '{name}': inputs store {names}; set `dtype:` (and/or `out_dtype:`) "
                             "in the recipe, e.g. dtype: bfloat16")

    def _common_shape(self, name: str, refs: list[tuple[int, str]]):
        shapes = []
        for i, tname in refs:
            ck = self.inputs[i]
            if tname not in ck:
                raise MergeError(f"tensor '{tname}' is missing from {ck.label}")
            shapes.append(ck.meta(tname).shape)
        if len(set(shapes)) == 1:
            return shapes[0], None
        same_tail = len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes)
        if same_tail and _is_embedding_like(name):
            if self.recipe.embed_policy == "truncate":
                rows = min(s[0] for s in shapes)
                self.warnings.append(f"{name}: vocabulary sizes {sorted({s[0] for s in shapes})} truncated to {rows} rows")
                return (rows,) + tuple(shapes[0][1:]), rows
            raise MergeError(
                f"vocabulary size mismatch for '{name}': {[list(s) for s in shapes]}. "
                "Set `embed_policy: truncate` in the recipe to keep the common rows"
            )
        raise MergeError(f"shape mismatch for '{name}': {[list(s) for s in shapes]} across inputs")

    def _config_with_vocab(self, ref: Checkpoint, jobs: list[TensorJob]) -> dict | None:
        cfg = dict(ref.config) if ref.config else None
        if cfg is None:
            return None
        truncated = [j for j in jobs if j.models and j.models[0].rows is not None]
        if truncated and "vocab_size" in cfg:
            cfg["vocab_size"] = truncated[0].shape[0]
        return cfg

    # -- slices: layer-wise assembly (frankenmerges) ------------------------------------------------
    def _plan_slices(self, spec: MethodSpec, out_dtype):
        r = self.recipe
        pattern = r.layer_pattern
        jobs: list[TensorJob] = []
        out_layer = 0
        first_ref = None
        slice_inputs = []
        layer_from: list[tuple[int, int]] = []  # (input, its layer) each output layer takes its config from
        for si, s in enumerate(r.slices):
            base_ref = s.base_model or r.base_model
            srcs = list(s.sources)
            idx = [self._input(src.model) for src in srcs]
            base_pos = None
            if spec.base != "none" and base_ref is not None:
                for k, src in enumerate(srcs):
                    if src.model == base_ref:
                        base_pos = k
                        break
                if base_pos is None:
                    if spec.base == "required":
                        raise MergeError(f"slice {si}: base model {base_ref} must be one of the slice's sources")
            non_base = [k for k in range(len(srcs)) if k != base_pos]
            self._check_counts(spec, len(non_base), base_pos is not None, f" (slice {si})")
            for k, src in enumerate(srcs):
                stacks = stack_depths(self._names(self.inputs[idx[k]]), pattern)
                if len(stacks) > 1:  # a VLM's text layers and vision blocks: slices would re-index both
                    raise MergeError(f"slice {si}: {src.model} has several layer stacks ({', '.join(sorted(stacks))}); "
                                     f"top-level slices are for single-stack models: give the stacks as `modules:` "
                                     f"(as mergekit requires)")
                n = num_layers_of(self.inputs[idx[k]], pattern) if self._module is None else max(stacks.values(), default=None)
                a, b = src.layer_range
                if n is None or b > n:
                    raise MergeError(f"slice {si}: layer_range [{a}, {b}] is out of range for {src.model} ({n} layers)")
            slice_inputs.append((s, srcs, idx, base_pos, non_base))
            if first_ref is None:
                first_ref = idx[base_pos if base_pos is not None else 0]
            length = srcs[0].layer_range[1] - srcs[0].layer_range[0]
            # per-source: names of the layer tensors at each layer
            for off in range(length):
                t = 1.0 if length == 1 else off / (length - 1)
                ref_k = base_pos if base_pos is not None else 0
                ref_ck = self.inputs[idx[ref_k]]
                src_layer = srcs[ref_k].layer_range[0] + off
                layer_from.append((idx[ref_k], src_layer))
                for name in self._names(ref_ck):
                    if layer_index(name, pattern) != src_layer:
                        continue
                    out_name = replace_layer_index(name, out_layer, pattern)
                    refs = []
                    for k, src in enumerate(srcs):
                        refs.append((idx[k], replace_layer_index(name, src.layer_range[0] + off, pattern)))
                    jobs.append(self._slice_job(spec, s, srcs, refs, base_pos, non_base, name, out_name, t, out_layer, out_dtype))
                out_layer += 1
        # pre-layer tensors come from the first slice, post-layer ones from the last (as mergekit)
        total = out_layer
        pre, post = [], []
        for which, (s, srcs, idx, base_pos, non_base) in (("pre", slice_inputs[0]), ("post", slice_inputs[-1])):
            ref_k = base_pos if base_pos is not None else 0
            ref_ck = self.inputs[idx[ref_k]]
            for name in self._output_names(ref_ck):
                if layer_index(name, pattern) is not None:
                    continue
                is_pre = any(h in name for h in PRE_LAYER_HINTS)
                if (which == "pre") != is_pre:
                    continue
                refs = [(idx[k], tensor_name(self.inputs[idx[k]], name)) for k in range(len(srcs))]
                job = self._slice_job(spec, s, srcs, refs, base_pos, non_base, name, name, 0.0, None, out_dtype)
                job.num_layers = total
                (pre if which == "pre" else post).append(job)
        for j in jobs:
            j.num_layers = total
        jobs = pre + jobs + post
        ref = self.inputs[first_ref]
        cfg = self._config_with_vocab(ref, jobs)
        if cfg is not None:
            n_ref = num_layers_of(ref, pattern)
            target, sub = cfg, None
            if self._module is not None and isinstance(cfg.get("text_config"), dict):  # a VLM's text decoder
                sub = "text_config"
                target = cfg[sub] = dict(cfg[sub])
                n_ref = target.get("num_hidden_layers", n_ref)
            keys = ("num_hidden_layers", "n_layer", "num_layers")
            if self._module is not None and self._module[0] == "decoder":  # T5 / Whisper: the decoder's own count
                keys = ("num_decoder_layers", "decoder_layers")
            for key in keys:
                if key in target:
                    target[key] = total
            _relayer_config(target, n_ref, [((self.inputs[i].config or {}).get(sub, {}) if sub else
                                             self.inputs[i].config or {}, layer) for i, layer in layer_from])
        return jobs, ref, cfg

    def _names(self, ck: Checkpoint) -> list[str]:
        """The tensor names of ``ck`` this planner merges: all, or those of its module (modules.py)."""
        if self._module is None:
            return ck.keys()
        from .modules import module_of

        return [n for n in ck.keys() if module_of(n, self._module[1]) == self._module[0]]

    def _slice_job(self, spec, s, srcs, refs, base_pos, non_base, name, out_name, t, out_layer, out_dtype):
        ref_i, ref_name = refs[base_pos if base_pos is not None else 0]
        meta = self.inputs[ref_i].meta(ref_name) if ref_name in self.inputs[ref_i] else None
        if meta is None:
            raise MergeError(f"tensor '{ref_name}' is missing from {self.inputs[ref_i].label}")
        if meta.dtype not in FLOAT_DTYPES:
            return TensorJob(out_name, meta.shape, meta.dtype, None, None, [InputRef(ref_i, ref_name)], Params(), out_layer, None)
        self._check_dtypes(name, refs, out_dtype)
        align = None
        if out_layer is None and len({i for i, _ in refs}) == len(refs):  # embeddings / head: vocabulary-indexed
            base_i = refs[base_pos][0] if base_pos is not None else None
            align = self._vocab_align(name, [i for i, _ in refs], base_i, dict(refs))
        if align is not None:
            shape, rows = (align.size,) + tuple(meta.shape[1:]), None
        else:
            shape, rows = self._common_shape(name, refs)
        model_params = [[srcs[k].parameters, s.parameters] for k in non_base]
        params = resolve_params(spec, name, t, [s.parameters, self.recipe.parameters,
                                                default_layer(spec, self.recipe.defaults)], model_params)
        base = InputRef(refs[base_pos][0], refs[base_pos][1], rows) if base_pos is not None else None
        models = [InputRef(refs[k][0], refs[k][1], rows) for k in non_base]
        return TensorJob(out_name, shape, out_dtype or meta.dtype, spec.name, base, models, params, out_layer, None,
                         align)


def _relayer_config(cfg: dict, n_layers: int | None, layer_from: list[tuple[dict, int]]) -> None:
    """Per-layer config lists of a frankenmerge (``layer_types`` of Qwen2/Gemma2/..., any list as long as the
    reference's layer count) rebuilt from the source layer of each output layer, so the output config
    validates and each layer keeps its attention type."""
    if not n_layers:
        return
    for key, value in list(cfg.items()):
        if not isinstance(value, list) or len(value) != n_layers:
            continue
        rebuilt = []
        for src_cfg, layer in layer_from:
            own = src_cfg.get(key)
            rebuilt.append(own[layer] if isinstance(own, list) and len(own) > layer else value[min(layer, n_layers - 1)])
        cfg[key] = rebuilt


def jobs_dtype(jobs: list[TensorJob]) -> torch.dtype | None:
    for j in jobs:
        if j.method is not None:
            return j.dtype
    return None
