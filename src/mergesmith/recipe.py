"""Recipe schema (a superset of mergekit's YAML) and parameter resolution.

Parameter values, as in mergekit:

* a scalar: used as is;
* a list of numbers: a *gradient*, interpolated piecewise-linearly over the layers of a slice at
  ``t = layer / (n_layers - 1)``; tensors outside the layer stack use ``t = 0`` and a one-layer slice
  uses ``t = 1`` (mergekit's behaviour, kept for recipe compatibility);
* a list of ``{filter: substring, value: ...}``: the first entry whose filter is a substring of the
  tensor name wins; an entry without filter (or ``"*"``) is the fallback.

Precedence, highest first: slice source / model parameters, slice parameters, top-level parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .methods.base import MergeError, MethodSpec, Param, Params

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _ref_of(m) -> str | None:
    """``{path, revision}`` (or a plain string) as the string form ``path@revision``."""
    if isinstance(m, dict):
        path, rev = m.get("path"), m.get("revision")
        return f"{path}@{rev}" if path and rev else (str(path) if path else None)
    return str(m) if m else None


class ModelEntry(_Strict):
    model: Any
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_ref(cls, v):
        if isinstance(v, dict):  # mergekit object form {model: {path, revision}, lora: {path, revision}}
            path, lora = _ref_of(v.get("model", v)), _ref_of(v.get("lora"))
            if not path:
                raise ValueError("model object needs a path")
            return f"{path}+{lora}" if lora else path
        return v


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


DEFAULTS = ("paper", "mergekit")


def check_defaults(value: str) -> str:
    """``value`` if it names a defaults set (recipe key, --defaults, ``defaults=`` in the API), else the error."""
    if value not in DEFAULTS:
        raise MergeError(f"defaults: '{value}' is not one of {', '.join(DEFAULTS)}")
    return value


def default_layer(spec: MethodSpec, defaults: str) -> dict:
    """The lowest-precedence parameter layer of a recipe with ``defaults``: mergekit's settings of the method
    for ``mergekit``, nothing (each parameter's own default, the paper's) for ``paper``."""
    return dict(spec.mergekit_params) if defaults == "mergekit" else {}


class Slice(_Strict):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    residual_weight: Optional[float] = None  # accepted for mergekit compatibility; unused there too


class Module(_Strict):
    """One entry of mergekit's ``modules:`` (multi-module models: a VLM's text decoder, vision tower and
    projector; T5's encoder and decoder): its own ``models`` (or one slice over its whole layer stack) and
    ``parameters`` (above the top-level ones)."""
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[Slice]] = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("a module gives exactly one of `models:` or `slices:`")
        return self


class Recipe(_Strict):
    merge_method: str
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[Slice]] = None
    modules: Optional[dict[str, Module]] = None
    base_model: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict] = None
    chat_template: Optional[str] = None
    seed: int = Field(default=0, alias="random_seed")
    name: Optional[str] = None
    # which parameter defaults apply: the papers' (mergesmith's) or mergekit 0.1.5's (MethodSpec.mergekit_params:
    # its defaults and settings, so a model card's recipe gives the model the card describes)
    defaults: str = "paper"
    embed_policy: str = "error"  # error | truncate: how to treat vocabulary-size mismatches
    layer_pattern: Optional[str] = None  # regex with one group = layer index, overrides auto-detection

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        if isinstance(data, dict):
            if "seed" in data and "random_seed" not in data:
                data = dict(data)
                data["random_seed"] = data.pop("seed")
        return data

    @model_validator(mode="after")
    def _check(self):
        if sum(x is not None for x in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("give exactly one of `models:`, `slices:` or `modules:`")
        if self.modules is not None and not self.modules:
            raise ValueError("`modules:` names no module")
        for key in ("dtype", "out_dtype"):
            v = getattr(self, key)
            if isinstance(v, str) and v.startswith("torch.") and v[len("torch."):] in DTYPES:
                setattr(self, key, v[len("torch."):])  # mergekit reads `torch.bfloat16` too
                continue
            if v is not None and v not in DTYPES:
                raise ValueError(f"{key}: unknown dtype '{v}' (use float32, float16 or bfloat16)")
        check_defaults(self.defaults)
        if self.embed_policy not in ("error", "truncate"):
            raise ValueError("embed_policy must be 'error' or 'truncate'")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either `tokenizer:` or `tokenizer_source:`, not both")
        if self.tokenizer is not None:
            extra = set(self.tokenizer) - {"source", "pad_to_multiple_of", "tokens"}
            if extra:
                raise ValueError(f"tokenizer: unknown key(s) {sorted(extra)} (known: source, pad_to_multiple_of, tokens)")
            _check_token_settings(self.tokenizer.get("tokens"))
            pad = self.tokenizer.get("pad_to_multiple_of")
            if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
                raise ValueError(f"tokenizer.pad_to_multiple_of must be a whole number >= 1, got {pad!r}")
        for s in (self.slices or []) + [sl for m in (self.modules or {}).values() for sl in m.slices or []]:
            for src in s.sources:
                a, b = src.layer_range
                if a < 0 or b <= a:
                    raise ValueError(f"invalid layer_range [{a}, {b}] for {src.model}: need 0 <= start < end")
            lens = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lens) > 1:
                raise ValueError(f"all sources of a slice need the same number of layers, got {sorted(lens)}")
        return self

    def parameter_dicts(self, per_model: bool = True):
        """Every ``parameters`` mapping of the recipe: top level, modules, slices and (``per_model``) models /
        sources."""
        yield self.parameters
        groups = [(self.models, self.slices)] + [(m.models, m.slices) for m in (self.modules or {}).values()]
        yield from (m.parameters for m in (self.modules or {}).values())
        for models, slices in groups:
            for sl in slices or []:
                yield sl.parameters
                if per_model:
                    yield from (src.parameters for src in sl.sources)
            if per_model:
                yield from (e.parameters for e in models or [])

    @property
    def vocab_pad(self) -> Optional[int]:
        """``tokenizer.pad_to_multiple_of``: vocabulary rows rounded up to a multiple of it (mergekit)."""
        return (self.tokenizer or {}).get("pad_to_multiple_of")

    @property
    def vocab_tokens(self) -> Optional[dict]:
        """``tokenizer.tokens``: per-token embedding sources (mergekit's ``TokenEmbeddingConfig``)."""
        return (self.tokenizer or {}).get("tokens")

    @property
    def tokenizer_donor(self) -> Optional[str]:
        if self.tokenizer is not None:
            return self.tokenizer.get("source", "union")  # mergekit's TokenizerConfig default
        return self.tokenizer_source


def _check_token_settings(tokens) -> None:
    """``tokenizer.tokens``: {token: {source: MODEL | {kind: zero} | {kind: model_token, model: M, token: T |
    token_id: N}, force: bool}}."""
    if tokens is None:
        return
    if not isinstance(tokens, dict):
        raise ValueError("tokenizer.tokens must map tokens to settings ({source: ..., force: ...})")
    for tok, cfg in tokens.items():
        where = f"tokenizer.tokens['{tok}']"
        if not isinstance(cfg, dict) or set(cfg) - {"source", "force"} or "source" not in cfg:
            raise ValueError(f"{where}: give `source` (a model, {{kind: zero}} or {{kind: model_token, ...}}) and optionally `force`")
        src = cfg["source"]
        if isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero" and set(src) == {"kind"}:
                continue
            if kind != "model_token" or "model" not in src or ("token" in src) == ("token_id" in src) \
                    or set(src) - {"kind", "model", "token", "token_id"}:
                raise ValueError(f"{where}: source must be {{kind: zero}} or {{kind: model_token, model: M, token: T}} "
                                 "(or token_id: N instead of token)")
        elif not isinstance(src, str):
            raise ValueError(f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, ...}}")


def load_recipe(source: Union[str, Path, dict, Recipe]) -> Recipe:
    """Parse a recipe from a YAML file path, YAML text, a dict, or return a Recipe as is."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, (str, Path)) and not isinstance(source, dict):
        import yaml

        text = source
        p = Path(str(source))
        if "\n" not in str(source) and p.suffix in (".yml", ".yaml", ".json"):
            if not p.exists():
                raise MergeError(f"recipe not found: {source}")
            text = p.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeError(f"recipe is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise MergeError("recipe must be a mapping with at least `merge_method` and `models:` or `slices:`")
        source = data
    try:
        return Recipe.model_validate(source)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "recipe"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the recipe schema)"
        raise MergeError(f"recipe: {loc}: {msg}") from None


# ---------------------------------------------------------------------------------------------------
# Value resolution


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _interp(values: list, t: float):
    if all(_is_number(v) for v in values):
        if len(values) == 1:
            return values[0]
        pos = t * (len(values) - 1)
        i = min(int(pos), len(values) - 2)
        frac = pos - i
        return values[i] * (1 - frac) + values[i + 1] * frac
    return values[min(int(t * (len(values) - 1)), len(values) - 1)]


def evaluate_setting(value: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter value for a tensor (see module docstring). ``None`` if no filter matched."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or str(f) in tensor_name:
                return evaluate_setting(entry.get("value"), tensor_name, t)
        return None
    if isinstance(value, list):
        if not value:
            return None
        value = [float(v) if isinstance(v, str) and _looks_float(v) else v for v in value]
        return _interp(value, t)
    if isinstance(value, str) and _looks_float(value):
        return float(value)
    return value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def validate_param_names(spec: MethodSpec, names, where: str, ignored: list[str] | None = None) -> None:
    """Unknown parameter names are errors. With ``ignored`` (recipes), a name that is a parameter of other
    methods but not of this one is left out with a note there instead: mergekit ignores such parameters
    (``weight`` under ``sce``, ``density`` under ``task_arithmetic``), and model-card recipes carry them."""
    known = {p.name for p in spec.params}
    for n in names:
        if n not in known and ignored is not None and n in _all_param_names():
            ignored.append(f"parameter '{n}' {where} is not used by '{spec.name}'; ignored (as mergekit does)")
            continue
        if n not in known:
            import difflib

            close = difflib.get_close_matches(n, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else (
                f" Known: {', '.join(sorted(known))}." if known else " It takes no parameters.")
            raise MergeError(f"unknown parameter '{n}' for method '{spec.name}' {where}.{hint}")


def _all_param_names() -> set[str]:
    from .methods.base import list_methods

    return {p.name for spec in list_methods() for p in spec.params}


def resolve_params(
    spec: MethodSpec,
    tensor_name: str,
    t: float,
    global_layers: list[dict],
    model_layers: list[list[dict]],
) -> Params:
    """Resolve every parameter of ``spec`` for one tensor.

    global_layers: parameter dicts, highest precedence first (e.g. [slice.parameters, recipe.parameters]).
    model_layers: for each non-base model, its parameter dicts, highest precedence first; global dicts
    are consulted after them (mergekit lets `weight: 0.5` at top level apply to every model).
    """
    out = Params()
    for p in spec.params:
        if p.scope == "global":
            out[p.name] = _lookup(p, tensor_name, t, global_layers, "")
        else:
            vals = []
            for i, layers in enumerate(model_layers):
                vals.append(_lookup(p, tensor_name, t, list(layers) + list(global_layers), f"for model {i}"))
            out[p.name] = vals
    return out


def _lookup(p: Param, tensor_name: str, t: float, layers: list[dict], who: str):
    for layer in layers:
        if p.name in layer:
            v = evaluate_setting(layer[p.name], tensor_name, t)
            if v is not None:
                return p.coerce(v, f"{who} at {tensor_name}".strip())
    if p.required:
        raise MergeError(f"missing required parameter '{p.name}' {who} for {tensor_name}".replace("  ", " "))
    return p.default
