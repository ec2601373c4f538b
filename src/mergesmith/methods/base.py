"""The method contract and registry.

A merge method is a pure function of tensors::

    fn(ctx: TensorContext, base: Tensor | None, models: list[Tensor], p: Params) -> Tensor

* ``base`` is the base model's tensor (float32) or ``None`` when the method takes no base.
* ``models`` are the non-base inputs' tensors (float32), in recipe order.
* ``p`` holds resolved parameters: global ones as scalars (``p.lambda_`` / ``p["lambda"]``), per-model
  ones as lists with one entry per element of ``models`` (``p["weight"][i]``).
* ``ctx`` carries the tensor name, layer index, a seeded random generator per model, the result of a
  statistics pass (``ctx.stats``) for global methods, and the compute device.

Methods never touch files. They are declared with :func:`register` in one file each under
``mergesmith/methods/``; the registry imports every module of the package on first use.
"""
from __future__ import annotations

import hashlib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

Granularity = Literal["element", "row", "tensor", "spectral", "block", "global"]
BaseUse = Literal["required", "optional", "none"]


class MergeError(ValueError):
    """A user error: bad recipe, bad input or bad parameter. Message is one line plus the fix."""


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    scope: ``global`` (one value for the merge, may vary per tensor/layer) or ``model`` (one value per
    non-base input model). ``required`` parameters have no default. ``choices`` restricts strings.
    """

    name: str
    type: type = float
    default: Any = None
    scope: Literal["global", "model"] = "global"
    help: str = ""
    required: bool = False
    choices: tuple | None = None

    def coerce(self, value: Any, where: str) -> Any:
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low in ("true", "1", "yes", "on"):
                        return True
                    if low in ("false", "0", "no", "off"):
                        return False
                    raise ValueError(value)
                return bool(value)
            if self.type is float:
                return float(value)
            if self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                return int(value)
            if self.type is str:
                value = str(value)
                if self.choices and value not in self.choices:
                    raise MergeError(
                        f"parameter '{self.name}' {where}: {value!r} is not one of {', '.join(self.choices)}"
                    )
                return value
            return value
        except MergeError:
            raise
        except (TypeError, ValueError):
            raise MergeError(
                f"parameter '{self.name}' {where}: {value!r} is not a valid {self.type.__name__}"
            ) from None


class Params(dict):
    """Resolved parameters for one tensor. Attribute access maps ``lambda_`` to ``lambda``."""

    def __getattr__(self, key: str) -> Any:
        name = key[:-1] if key.endswith("_") else key
        try:
            return self[name]
        except KeyError:
            raise AttributeError(key) from None


def seed_for(seed: int, name: str, index: int, chunk: int = 0) -> int:
    """A 63-bit seed derived from (global seed, tensor name, model index, chunk): order independent."""
    digest = hashlib.sha256(f"{seed}|{name}|{index}|{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges, besides the values."""

    name: str
    layer: int | None = None
    num_layers: int | None = None
    seed: int = 0
    device: torch.device | str = "cpu"
    stats: Any = None
    # a tensor-wise method's ``sums`` over the whole tensor when the engine gives it row chunks (see
    # MethodSpec.sums): in the apply, the result of the last sums phase; while collecting phase
    # ``phase``, the result of the phase before (None in phase 0). None in the apply: the method has
    # the whole tensor and computes them itself
    sums: Any = None
    phase: int = 0  # index of the sums phase being collected (MethodSpec.sums)
    chunk: int = 0  # index of the row chunk when the engine splits a large element/row-wise tensor
    shape: tuple = ()  # full tensor shape (the tensor given may be a row chunk)
    rows: tuple[int, int] | None = None  # row range of that chunk in the full tensor; None: the whole tensor
    extra: dict = field(default_factory=dict)
    # True when the engine made the input tensors for this call only: a method may overwrite them
    owned: bool = False
    # True when the engine handed the inputs in their stored dtype (MethodSpec.raw_inputs): the method
    # reads them as they are (never in place) or converts them to float32 itself
    raw: bool = False
    # the dtype the engine will store the result in (None: unknown); a method may return it directly
    out_dtype: Any = None
    # a ``deferred.Recorder`` when the executor patches outputs after the last tensor (GlobalStats.defer)
    defer: Any = None

    def generator(self, model_index: int) -> torch.Generator:
        """A generator seeded by (seed, tensor name, model index, chunk), on ctx.device."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed_of(model_index))
        return g

    def seed_of(self, model_index: int) -> int:
        """The 63-bit seed of (seed, tensor name, model index, chunk), for the seeded kernels."""
        return seed_for(self.seed, self.name, model_index, self.chunk)


class ChunkParts(dict):
    """A sums part that is kept per row chunk ({ctx.chunk: value}) instead of added up: ``+`` is the
    union. For quantities whose use depends on the chunk order (e.g. how many ties precede a chunk)."""

    def __add__(self, other: "ChunkParts") -> "ChunkParts":
        out = ChunkParts(self)
        out.update(other)
        return out

    def ordered(self) -> list:
        """The values in chunk order."""
        return [self[c] for c in sorted(self)]


class GlobalStats:
    """Whole-model statistics gathered by the engine before the apply pass.

    The engine calls ``collect`` on every tensor of a pass (streaming), then ``reduce`` on the partial
    results of that pass; it repeats for ``passes(params, state)`` passes. The final state is given to the
    method as ``ctx.stats``. Implementations must hold O(1) state per tensor, never the tensors.
    """

    def passes(self, params: Params, state: Any = None) -> int:
        """Number of passes; with ``state`` (during the run) it may grow, e.g. when an estimate from a
        sampled pass has to be redone exactly."""
        return 1

    def sample_stride(self, pass_index: int, state: Any) -> int:
        """> 0: pass ``pass_index`` only needs an estimate, the engine may feed ~1 row in this many."""
        return 0

    def init(self, params: Params, num_models: int) -> Any:
        return None

    def defer(self, state: Any) -> Any:
        """Called by an executor that can patch outputs after the last tensor (``deferred``): return the
        state with the statistics the apply pass can settle that way dropped from the passes."""
        return state

    def collect(self, pass_index: int, state: Any, ctx: TensorContext, base, models, p: Params) -> Any:
        raise NotImplementedError

    def reduce(self, pass_index: int, state: Any, partials: list) -> Any:
        raise NotImplementedError

    def fold(self, pass_index: int, state: Any, acc: Any, part: Any) -> Any:
        """Optional: add one tensor's partial to a running total (``acc`` None at first) so the engine need
        not hold a pass's partials until ``reduce``, which then gets ``[total]``. Return NotImplemented
        (the default) to have the partials collected in a list."""
        return NotImplemented

    def check_plan(self, params: list[Params]) -> None:
        """Called by the planner with every tensor's parameters, before any weight is read: raise
        MergeError when they cannot share one statistics pass (e.g. a per-layer global density)."""


MergeFn = Callable[[TensorContext, "torch.Tensor | None", "list[torch.Tensor]", Params], torch.Tensor]


@dataclass
class MethodSpec:
    name: str
    fn: MergeFn
    paper: str
    math: str
    base: BaseUse
    granularity: Granularity
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    stats: GlobalStats | Callable[[Params], GlobalStats | None] | None = None
    mergekit: str = ""  # how to reproduce mergekit's behaviour, if it differs
    # the parameter values that reproduce mergekit 0.1.5 (its defaults and its choices where it differs from
    # the paper): the lowest-precedence layer of a recipe with ``defaults: mergekit``
    mergekit_params: dict = field(default_factory=dict)
    # may the engine split big tensors into row chunks (dim 0)? A bool, or a function of the tensor's
    # parameters; None: yes for element/row granularity without statistics
    chunkable: bool | Callable[[Params, str, tuple], bool] | None = None
    notes: str = ""
    example: dict = field(default_factory=dict)  # parameters for a smoke run (tests, demo, docs)
    validate: Callable[[Params], None] | None = None  # per-tensor parameter check, run at planning
    # tensor-wise methods whose whole-tensor quantities add up over row chunks (norms, dot products,
    # histograms): the engine streams a tensor too big to hold whole in ``sum_phases`` chunked passes,
    # then the apply pass, instead of loading it whole. In phase k it calls
    # sums(ctx, base, models, p) on every row chunk, with ctx.phase = k and ctx.sums = the result of
    # phase k-1 (None for k = 0), adds the parts with ``+`` (tensors, numbers, ChunkParts), and makes the
    # total into phase k's result with finish_sums(k, previous result, total, p) (default: the total).
    # The apply gets the last result as ctx.sums (ctx.chunk / ctx.rows say which chunk a call has).
    # Tensors held whole get ctx.sums = None: the method computes the same quantities itself, e.g. by
    # running its phases on the one chunk it has (sce, arcee_fusion). Only used when ``can_chunk`` is
    # false for the tensor. ``sum_phases``: an int or a function of the tensor's parameters (0: none).
    sums: Callable[..., Any] | None = None
    sum_phases: int | Callable[[Params], int] = 1
    finish_sums: Callable[[int, Any, Any, Params], Any] | None = None
    # tensor-wise methods whose per-tensor work is mostly LAPACK, which uses a second thread poorly: on the
    # CPU the engine computes several tensors at once, each single-threaded (Executor, "concurrent tensors")
    concurrent_tensors: bool = False
    # a function of a tensor's parameters and full shape: True lets the engine hand that tensor's inputs in
    # their stored dtype (bf16 ...) on the CPU instead of float32 copies (ctx.raw); for methods with kernels
    # that read the stored bits (``_fused``). None: always float32
    raw_inputs: Callable[[Params, tuple], bool] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def phases(self, params: Params) -> int:
        """Number of sums phases for a tensor with these parameters (0 without ``sums``)."""
        if self.sums is None:
            return 0
        return int(self.sum_phases(params) if callable(self.sum_phases) else self.sum_phases)

    def finish(self, phase: int, previous: Any, total: Any, params: Params) -> Any:
        """Phase ``phase``'s result from its total over the chunks (``finish_sums``; default the total)."""
        return total if self.finish_sums is None else self.finish_sums(phase, previous, total, params)

    def can_chunk(self, params: Params, name: str = "", shape: tuple = ()) -> bool:
        """Whether row chunks of this tensor give the same result as the whole tensor. A callable
        ``chunkable`` gets ``(params, name, shape)`` (e.g. spectral methods chunk their excluded tensors)."""
        if callable(self.chunkable):
            return bool(self.chunkable(params, name, tuple(shape)))
        if self.chunkable is not None:
            return self.chunkable
        return self.granularity in ("element", "row") and self.stats is None

    def stats_for(self, params: Params) -> GlobalStats | None:
        if self.stats is None:
            return None
        if isinstance(self.stats, GlobalStats):
            return self.stats
        return self.stats(params)

    def describe(self) -> str:
        lines = [f"{self.name}" + (f"  (aliases: {', '.join(self.aliases)})" if self.aliases else "")]
        lines.append(f"  paper:       {self.paper}")
        lines.append(f"  base model:  {self.base}")
        lines.append(f"  granularity: {self.granularity}")
        n = f"{self.min_models}" + ("+" if self.max_models is None else (f"..{self.max_models}" if self.max_models != self.min_models else ""))
        lines.append(f"  inputs:      {n} model(s) besides the base")
        lines.append("  math:        " + self.math.strip().replace("\n", "\n               "))
        if self.params:
            lines.append("  parameters:")
            for p in self.params:
                d = "required" if p.required else f"default {p.default!r}"
                ch = f" one of {list(p.choices)}" if p.choices else ""
                lines.append(f"    {p.name:<18} {p.scope:<6} {p.type.__name__:<5} {d}{ch}  {p.help}")
        if self.mergekit:
            lines.append("  mergekit:    " + self.mergekit.strip())
        if self.mergekit_params:
            mk = ", ".join(f"{k}: {v}" for k, v in self.mergekit_params.items())
            lines.append(f"  defaults: mergekit  ->  {mk}")
        if self.notes:
            lines.append("  notes:       " + self.notes.strip())
        return "\n".join(lines)


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}
_LOADED = False


def register(
    name: str,
    *,
    paper: str,
    math: str,
    base: BaseUse,
    granularity: Granularity,
    params: Sequence[Param] = (),
    aliases: Sequence[str] = (),
    min_models: int = 1,
    max_models: int | None = None,
    stats=None,
    mergekit: str = "",
    mergekit_params: dict | None = None,
    chunkable: bool | Callable[[Params, str, tuple], bool] | None = None,
    notes: str = "",
    example: dict | None = None,
    validate: Callable[[Params], None] | None = None,
    sums: Callable[..., Any] | None = None,
    sum_phases: int | Callable[[Params], int] = 1,
    finish_sums: Callable[[int, Any, Any, Params], Any] | None = None,
    concurrent_tensors: bool = False,
    raw_inputs: Callable[[Params, tuple], bool] | None = None,
):
    """Decorator that registers a tensor-level merge function under ``name``."""

    def deco(fn: MergeFn) -> MergeFn:
        unknown = set(mergekit_params or {}) - {p.name for p in params}
        if unknown:
            raise RuntimeError(f"merge method {name!r}: mergekit_params {sorted(unknown)} are not its parameters")
        spec = MethodSpec(
            name=name, fn=fn, paper=paper, math=math, base=base, granularity=granularity,
            params=tuple(params), aliases=tuple(aliases), min_models=min_models, max_models=max_models,
            stats=stats, mergekit=mergekit, mergekit_params=dict(mergekit_params or {}), chunkable=chunkable, notes=notes,
            example=dict(example or {}), validate=validate, sums=sums,
            sum_phases=sum_phases, finish_sums=finish_sums, concurrent_tensors=concurrent_tensors,
            raw_inputs=raw_inputs,
        )
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise RuntimeError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = spec
        for a in spec.aliases:
            _ALIASES[a] = name
        fn.spec = spec  # type: ignore[attr-defined]
        return fn

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import mergesmith.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name in ("base", "kernels") or mod.name.startswith("_"):
            continue
        importlib.import_module(f"mergesmith.methods.{mod.name}")
    _LOADED = True


def get_method(name: str) -> MethodSpec:
    _load_all()
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else " Run `mergesmith methods` for the list."
        raise MergeError(f"unknown merge method '{name}'.{hint}")
    return _REGISTRY[key]


def list_methods() -> list[MethodSpec]:
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda s: s.name)
