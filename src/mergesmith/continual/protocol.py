"""The contract of a continual merge method and the lookup of the available ones.

A continual method keeps one float32 state tensor per float tensor of the model (e.g. OPCM's unscaled
merged task vector D, or the running average) plus a few scalars in the manifest.  Folding in model t
streams tensor by tensor: ``first`` (t = 1) or ``step`` (t >= 2) maps (state, x) to the new state tensor,
where x = theta_t - theta_0 (the task vector) for methods with a base and x = theta_t for methods without
(the caller frees base and model before the step, so only state, x and the step's workspace are alive),
and adds per-tensor sums (e.g. squared norms) to ``acc``; ``finish`` turns those sums into
the manifest's scalars.  A method whose step needs whole-model statistics returns them from ``stats``
(a :class:`~mergesmith.methods.base.GlobalStats`, gathered in streaming passes before the step).
``export`` maps a state tensor back to model weights.
"""
from __future__ import annotations

from typing import Any

import torch

from ..methods.base import MergeError, Param, Params, TensorContext


class ContinualMethod:
    name: str = ""
    paper: str = ""
    math: str = ""
    base: str = "required"  # "required" | "none"
    params: tuple[Param, ...] = ()
    order_dependent: bool = False

    def resolve(self, params: dict[str, Any]) -> Params:
        """Typed parameters with defaults; unknown names are a MergeError."""
        known = {p.name: p for p in self.params}
        for k in params:
            if k not in known:
                import difflib

                close = difflib.get_close_matches(k, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else (
                    f" Known: {', '.join(sorted(known))}." if known else " It takes no parameters.")
                raise MergeError(f"unknown parameter '{k}' for continual method '{self.name}'.{hint}")
        out = Params()
        for p in self.params:
            out[p.name] = p.coerce(params[p.name], "") if p.name in params else p.default
        self.validate(out)
        return out

    def validate(self, p: Params) -> None:
        pass

    def chunkable(self, name: str, shape) -> bool:
        """May this tensor be processed in row chunks (element-wise update and export)?"""
        return True

    # -- one add ------------------------------------------------------------------------------------
    def stats(self, p: Params):
        """(GlobalStats, its Params) needed by ``step``, or None."""
        return None

    def stats_inputs(self, ctx: TensorContext, state, x, p: Params):
        """(base, models) handed to the GlobalStats for one tensor."""
        raise NotImplementedError

    def first(self, ctx: TensorContext, x, p: Params, acc: dict) -> torch.Tensor:
        raise NotImplementedError

    def step(self, ctx: TensorContext, state, x, p: Params, count: int, acc: dict) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, scalars: dict, acc: dict, count: int) -> dict:
        return scalars

    # -- read out -----------------------------------------------------------------------------------
    def export(self, ctx: TensorContext, state, base, p: Params, scalars: dict, count: int) -> torch.Tensor:
        raise NotImplementedError

    def summary(self, scalars: dict, count: int) -> dict:
        """Human-facing numbers for ``status`` (e.g. OPCM's lambda_t)."""
        return {}


def continual_methods() -> dict[str, ContinualMethod]:
    from .baselines import BASELINES
    from .opcm import OPCMContinual

    out = {m.name: m for m in BASELINES}
    out[OPCMContinual.name] = OPCMContinual()
    return out


ALIASES = {"average": "average", "weight_average": "average", "mean": "average", "linear": "average",
           "task_arithmetic": "task_arithmetic", "ta": "task_arithmetic",
           "ties": "ties", "ties_merging": "ties", "opcm": "opcm"}


def get_continual_method(name: str) -> ContinualMethod:
    methods = continual_methods()
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in methods:
        raise MergeError(f"unknown continual method '{name}'; choose one of {', '.join(sorted(methods))}")
    return methods[key]
