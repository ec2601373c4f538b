"""Continual baselines of the OPCM paper (official code: FusionBench ``fusion_bench/method/opcm/``
``weight_average.py``, ``task_arithmetic.py``, ``ties_merging.py``).

* **average** (no base): theta^(t) = ((t-1) theta^(t-1) + theta_t) / t, a running mean.
  State: theta^(t) itself, updated as M += (theta_t - M) / t.  Equals the plain average (model soup).
* **task_arithmetic**: theta^(t) = theta^(t-1) + lambda tau_t (lambda = 0.3).  State: D = sum_i lambda tau_i;
  equals batch task arithmetic with the same lambda.
* **ties**: theta^(1) = theta_0 + lambda tau_1;
  theta^(t) = theta^(t-1) + lambda * TIES_{k, dis-sum}(theta^(t-1) - theta_0, tau_t), lambda = 0.5,
  k = 20 % kept.  TIES runs on the two stacked vectors with the top-k taken over the whole model for each
  (official "global" trim), mass sign election with the whole-model majority for zero signs, and
  disjoint sum; its output is *added on top of* the previous merge (official code).  Not equal to batch
  TIES.  The trim thresholds are whole-model statistics: they come from the registered ``ties`` method's
  exact streaming statistics passes (one implementation of TIES), run before each step.
"""
from __future__ import annotations

import torch

from ..methods.base import MergeError, Param
from .protocol import ContinualMethod


class Average(ContinualMethod):
    name = "average"
    paper = "Wortsman et al., Model soups, ICML 2022 (continual form: OPCM paper's baseline)"
    math = "theta^(t) = theta^(t-1) + (theta_t - theta^(t-1)) / t"
    base = "none"

    def first(self, ctx, x, p, acc):
        return x

    def step(self, ctx, state, x, p, count, acc):
        return state + (x - state) / float(count + 1)

    def export(self, ctx, state, base, p, scalars, count):
        return state


class TaskArithmetic(ContinualMethod):
    name = "task_arithmetic"
    paper = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (continual form: OPCM baseline)"
    math = "theta^(t) = theta^(t-1) + lambda (theta_t - theta_0)"
    params = (Param("lambda", float, 0.3, help="scale of each task vector (OPCM baseline: 0.3)"),)

    def first(self, ctx, x, p, acc):
        return x * p["lambda"]

    def step(self, ctx, state, x, p, count, acc):
        return state + x * p["lambda"]

    def export(self, ctx, state, base, p, scalars, count):
        return base + state


class Ties(ContinualMethod):
    name = "ties"
    paper = "Yadav et al., TIES-Merging, NeurIPS 2023 (continual form: OPCM paper's baseline)"
    math = "theta^(t) = theta^(t-1) + lambda TIES_{k,sum}(theta^(t-1) - theta_0, tau_t); theta^(1) = theta_0 + lambda tau_1"
    params = (
        Param("lambda", float, 0.5, help="scale of each TIES update (official scaling_factor 0.5)"),
        Param("density", float, 0.2, help="fraction kept by the whole-model top-k trim (official threshold=20)"),
        Param("agg", str, "sum", choices=("sum", "mean", "max"), help="disjoint merge (official merge_func sum)"),
    )

    def chunkable(self, name, shape):
        return False  # the registered ties method merges whole tensors

    def validate(self, p):
        if not 0.0 <= p["density"] <= 1.0:
            raise MergeError(f"ties: density must be in [0, 1], got {p['density']}")

    def _ties(self):
        from ..methods.base import get_method

        return get_method("ties")

    def _params(self, p):
        from ..api import method_params

        return method_params("ties", 2, density=p["density"], **{"lambda": 1.0}, agg=p["agg"],
                             scope="global", zero_sign="majority", elect="mass")

    def stats(self, p):
        tp = self._params(p)
        return self._ties().stats_for(tp), tp

    def stats_inputs(self, ctx, state, x, p):
        return torch.zeros_like(state), [state, x]

    def first(self, ctx, x, p, acc):
        return x * p["lambda"]

    def step(self, ctx, state, x, p, count, acc):
        zero, pair = self.stats_inputs(ctx, state, x, p)
        merged = self._ties().fn(ctx, zero, pair, self._params(p))  # = 0 + 1 * TIES(D, tau); needs ctx.stats
        return state + merged * p["lambda"]

    def export(self, ctx, state, base, p, scalars, count):
        return base + state


BASELINES = (Average(), TaskArithmetic(), Ties())
