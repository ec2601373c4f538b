"""Twin-Merging at inference: compressed exclusive knowledge, a router, and the routed module.

Lu, Fan, Wei, Qu, Chen, Cheng, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", NeurIPS 2024 (arXiv 2406.15479); official code LZY-the-boys/Twin-Merging.

1. Shared expert theta* (data-free; default task arithmetic with lambda = 0.29, method ``twin_merging``;
   any merged state dict may be given instead).
2. Exclusive knowledge per task, relative to the *shared* model: v_t = theta_t - theta*. Each matrix
   (2-D, not matching ``exclude``) is compressed to its best rank-k approximation (TSV-C, k = max(1,
   floor(density * r)), density 0.1 = the official ``mask_rate`` 0.9); other floating tensors are kept
   dense; tensors matching ``exclude`` get no exclusive part (official: classifier heads and biases; ours:
   embeddings and lm_head by default, as ``spectral_exclude``).
3. Router: MLP on features of the input (paper: mean-pooled last hidden state of theta*),
   Linear(d, 2d)-BN-LeakyReLU-Dropout(0.5)-Linear(2d, 2d)-BN-LeakyReLU-Dropout-Linear(2d, N), trained with
   cross-entropy on the user's (input, task id) pairs: Adam, lr 5e-4, 50 epochs, batch 1024, best epoch by
   accuracy on a held-out split (official defaults).
4. Inference: w = softmax(R(x) / T), theta(x) = theta* + sum_t w_t v_t, applied with
   ``torch.func.functional_call``; per input (``routing="sample"``, as the official code) or once per batch
   with the batch-mean weights (``routing="batch"``, cheaper).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..methods import _spectral as sp
from ..methods.base import MergeError, TensorContext

Exclusive = dict[str, "sp.LowRank | torch.Tensor"]


# ---------------------------------------------------------------------------------------------------
# 1-2. shared expert and exclusive knowledge


def shared_expert(base: Any, finetuned: Sequence[Any], lam: float = 0.29) -> dict[str, torch.Tensor]:
    """theta* = theta_0 + lam * sum_t (theta_t - theta_0), through the streaming engine."""
    from ..api import merge_state_dicts

    return merge_state_dicts("twin_merging", list(finetuned), base=base, **{"lambda": lam})


def compress_exclusive(shared: Any, finetuned: Sequence[Any], density: float = 0.1, *, exclude: str = "default",
                       svd: str = "exact", niter: int = 2, seed: int = 0) -> list[Exclusive]:
    """v_t = theta_t - theta* per task: ``LowRank`` for matrices, dense float32 for other floating tensors,
    nothing for tensors matching ``exclude``. Inputs: state dicts, nn.Modules or paths (read tensor by tensor)."""
    from ..io.checkpoint import open_checkpoint
    from ..methods.tsv import tsv_c_compress

    if not 0 < density <= 1:
        raise MergeError(f"twin: density must lie in (0, 1], got {density}")
    if not finetuned:
        raise MergeError("twin: give at least one fine-tuned model")
    pats = sp.exclude_patterns(exclude)
    sh = open_checkpoint(shared)
    fts = [open_checkpoint(f) for f in finetuned]
    out: list[Exclusive] = [dict() for _ in fts]
    for name in sh.keys():
        meta = sh.meta(name)
        if not meta.dtype.is_floating_point or any(p.search(name) for p in pats):
            continue
        s = sh.get(name).to(torch.float32)
        for t, f in enumerate(fts):
            if name not in f:
                raise MergeError(f"twin: tensor {name} is missing from fine-tuned model {t}")
            v = f.get(name).to(torch.float32) - s
            if v.shape != s.shape:
                raise MergeError(f"twin: {name} has shape {tuple(v.shape)} in model {t}, "
                                 f"{tuple(s.shape)} in the shared model")
            if v.dim() == 2:
                g = TensorContext(name=name, seed=seed).generator(t)
                out[t][name] = tsv_c_compress(v, density, svd=svd, niter=niter, generator=g)
            else:
                out[t][name] = v
    return out


def exclusive_numel(exclusives: Sequence[Exclusive]) -> int:
    """Stored numbers of all exclusive parts (factors count m*k + k*n)."""
    return sum(x.numel if isinstance(x, sp.LowRank) else x.numel() for ex in exclusives for x in ex.values())


def save_exclusives(path, exclusives: Sequence[Exclusive]) -> None:
    """Write exclusive parts to one safetensors file (keys ``t|name|B``, ``t|name|A``, ``t|name|D``)."""
    from safetensors.torch import save_file

    flat = {}
    for t, ex in enumerate(exclusives):
        for name, x in ex.items():
            if isinstance(x, sp.LowRank):
                flat[f"{t}|{name}|B"], flat[f"{t}|{name}|A"] = x.B.contiguous(), x.A.contiguous()
            else:
                flat[f"{t}|{name}|D"] = x.contiguous()
    save_file(flat, str(path), metadata={"format": "mergesmith-twin-exclusive", "tasks": str(len(exclusives))})


def load_exclusives(path) -> list[Exclusive]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mergesmith-twin-exclusive":
            raise MergeError(f"{path} is not a mergesmith Twin-Merging exclusive file")
        out: list[Exclusive] = [dict() for _ in range(int(meta["tasks"]))]
        parts: dict[tuple[int, str], dict] = {}
        for key in f.keys():
            t, name, kind = key.split("|")
            parts.setdefault((int(t), name), {})[kind] = f.get_tensor(key)
    for (t, name), d in parts.items():
        out[t][name] = sp.LowRank(d["B"], d["A"]) if "B" in d else d["D"]
    return out


# ---------------------------------------------------------------------------------------------------
# 3. features and router


def pooled_input(module: nn.Module | None, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Features of a raw float input: [B, d] as is, [B, ..., d] mean-pooled over the middle dims."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise MergeError("pooled_input needs a float tensor input; "
                         "give feature_fn=hidden_state_features() for token ids")
    if x.dim() == 1:
        return x[:, None]
    if x.dim() == 2:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


def hidden_state_features(layer: int = -1) -> Callable:
    """Feature function for Hugging Face models: the mean-pooled hidden state ``layer`` of the given module
    (the shared expert), masked by ``attention_mask`` when it is passed (the paper's router input)."""

    def fn(module: nn.Module, *args, **kwargs) -> torch.Tensor:
        out = module(*args, output_hidden_states=True, **kwargs)
        h = out.hidden_states[layer]
        mask = kwargs.get("attention_mask")
        if mask is None:
            return h.mean(dim=1)
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)

    return fn


class TwinRouter(nn.Module):
    """Linear(d, h)-BN-LeakyReLU-Dropout-Linear(h, h)-BN-LeakyReLU-Dropout-Linear(h, N), h = 2d by default."""

    def __init__(self, in_features: int, num_tasks: int, hidden: int | None = None, dropout: float = 0.5):
        super().__init__()
        h = hidden or 2 * in_features
        self.net = nn.Sequential(
            nn.Linear(in_features, h), nn.BatchNorm1d(h), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(h, num_tasks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def train_router(router: TwinRouter, features: torch.Tensor, labels: torch.Tensor, *, epochs: int = 50,
                 lr: float = 5e-4, batch_size: int = 1024, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Cross-entropy training of ``router`` on (features [S, d], task ids [S]); keeps the epoch with the best
    accuracy on a held-out ``val_fraction`` (on the training data when that split would be empty).
    Seeded; the global RNG is left untouched. Returns {"best_accuracy", "history": [(loss, acc), ...]}."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    features = features.detach().to(torch.float32)
    n_tasks = router.net[-1].out_features
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise MergeError(f"router data: need features [S, d] and S task ids, "
                         f"got {tuple(features.shape)} and {tuple(labels.shape)}")
    if labels.numel() < 2:
        raise MergeError("router data: need at least two labelled inputs")
    if labels.min() < 0 or labels.max() >= n_tasks:
        raise MergeError(f"router data: task ids must lie in 0..{n_tasks - 1}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=g)
    n_val = int(val_fraction * labels.numel())
    if n_val < 1 or labels.numel() - n_val < 2:
        tr, va = perm, perm
    else:
        va, tr = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    best, best_state, history = -1.0, None, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            router.train()
            order = tr[torch.randperm(tr.numel(), generator=g)]
            total = 0.0
            for i in range(0, order.numel(), batch_size):
                idx = order[i : i + batch_size]
                if idx.numel() < 2:  # BatchNorm needs two samples
                    continue
                loss = nn.functional.cross_entropy(router(features[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            router.eval()
            with torch.no_grad():
                acc = float((router(features[va]).argmax(-1) == labels[va]).float().mean())
            history.append((total / max(1, tr.numel()), acc))
            if acc > best:
                best, best_state = acc, copy.deepcopy(router.state_dict())
    router.load_state_dict(best_state)
    router.eval()
    return {"best_accuracy": best, "history": history}


# ---------------------------------------------------------------------------------------------------
# 4. the routed module


def _batch_size(args, kwargs) -> int:
    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    raise MergeError("TwinMergedModel: no tensor input with a batch dimension")


def _slice(v, i: int):
    return v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v


def _cat(outs: list):
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs, dim=0)
    if isinstance(first, Mapping):  # dicts and Hugging Face ModelOutput
        merged = {k: _cat([o[k] for o in outs]) for k in first.keys() if first[k] is not None}
        try:
            return type(first)(**merged)
        except TypeError:
            return merged
    if isinstance(first, (tuple, list)):
        return type(first)(_cat(list(x)) for x in zip(*outs))
    return outs


class TwinMergedModel(nn.Module):
    """theta(x) = theta* + sum_t w_t(x) v_t on top of ``module`` (whose own weights are theta*).

    exclusives: one ``{name: LowRank | Tensor}`` per task (:func:`compress_exclusive`); router: a trained
    :class:`TwinRouter`; feature_fn(module, *inputs) -> [B, d] (default :func:`pooled_input`);
    routing ``sample`` (weights per input, the paper) or ``batch`` (batch-mean weights, one weight set);
    temperature T of the softmax; ``top_k``: keep only the k largest weights (renormalised), None = all.
    """

    def __init__(self, module: nn.Module, exclusives: Sequence[Exclusive], router: nn.Module,
                 feature_fn: Callable | None = None, routing: str = "sample", temperature: float = 1.0,
                 top_k: int | None = None):
        super().__init__()
        if routing not in ("sample", "batch"):
            raise MergeError(f"routing must be 'sample' or 'batch', got {routing!r}")
        if not exclusives:
            raise MergeError("TwinMergedModel needs the exclusive parts of at least one task")
        self.module = module
        self.router = router.eval()
        self.feature_fn = feature_fn or pooled_input
        self.routing = routing
        self.temperature = float(temperature)
        self.top_k = top_k
        self.num_tasks = len(exclusives)
        own = dict(module.named_parameters())
        own.update(dict(module.named_buffers()))
        canonical = {id(v): k for k, v in own.items()}  # tied weights (lm_head = embeddings): one name each
        every = module.state_dict(keep_vars=True)
        self._slots: list[list[tuple[str, str, bool]]] = []  # per task: (tensor name, buffer prefix, low-rank?)
        for t, ex in enumerate(exclusives):
            slots, seen = [], set()
            for j, (name, x) in enumerate(sorted(ex.items())):
                if name not in every:
                    raise MergeError(f"TwinMergedModel: exclusive tensor {name} is not a parameter of the module")
                name = canonical.get(id(every[name]), name)
                if name in seen:  # the tied twin of a tensor already handled
                    continue
                seen.add(name)
                shape = tuple(own[name].shape)
                key = f"_ex{t}_{j}"
                if isinstance(x, sp.LowRank):
                    if x.shape != shape:
                        raise MergeError(f"TwinMergedModel: {name} exclusive shape {x.shape} != parameter {shape}")
                    self.register_buffer(key + "_B", x.B.to(torch.float32))
                    self.register_buffer(key + "_A", x.A.to(torch.float32))
                else:
                    if tuple(x.shape) != shape:
                        raise MergeError(f"TwinMergedModel: {name} exclusive shape {tuple(x.shape)} "
                                         f"!= parameter {shape}")
                    self.register_buffer(key + "_D", x.to(torch.float32))
                slots.append((name, key, isinstance(x, sp.LowRank)))
            self._slots.append(slots)

    # -- routing -----------------------------------------------------------------------------------
    @torch.no_grad()
    def routing_weights(self, *args, **kwargs) -> torch.Tensor:
        """Softmax routing weights [B, N] for a batch of inputs."""
        feats = self.feature_fn(self.module, *args, **kwargs)
        logits = self.router(feats.to(torch.float32)) / self.temperature
        w = torch.softmax(logits, dim=-1)
        if self.top_k is not None and self.top_k < self.num_tasks:
            keep = torch.topk(w, self.top_k, dim=-1).indices
            mask = torch.zeros_like(w).scatter_(-1, keep, 1.0)
            w = w * mask
            w = w / w.sum(dim=-1, keepdim=True)
        return w

    def _delta(self, name_key: str, lowrank: bool) -> torch.Tensor:
        if lowrank:
            return getattr(self, name_key + "_B") @ getattr(self, name_key + "_A")
        return getattr(self, name_key + "_D")

    def merged_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: theta*[name] + sum_t weights[t] v_t[name]} for every tensor with an exclusive part."""
        own = dict(self.module.named_parameters())
        own.update(dict(self.module.named_buffers()))
        acc: dict[str, torch.Tensor] = {}
        for t, slots in enumerate(self._slots):
            wt = weights[t]
            for name, key, lowrank in slots:
                d = self._delta(key, lowrank) * wt
                acc[name] = acc[name] + d if name in acc else d
        return {name: own[name] + d.to(own[name].dtype) for name, d in acc.items()}

    def forward(self, *args, **kwargs):
        from torch.func import functional_call

        w = self.routing_weights(*args, **kwargs)
        if self.routing == "batch":
            return functional_call(self.module, self.merged_parameters(w.mean(dim=0)), args, kwargs)
        outs = []
        for i in range(_batch_size(args, kwargs)):
            a = tuple(_slice(v, i) for v in args)
            k = {key: _slice(v, i) for key, v in kwargs.items()}
            outs.append(functional_call(self.module, self.merged_parameters(w[i]), a, k))
        return _cat(outs)


# ---------------------------------------------------------------------------------------------------
# one call


@torch.no_grad()
def _features(feature_fn, module, inputs, batch: int) -> torch.Tensor:
    if isinstance(inputs, Mapping):
        n = _batch_size((), inputs)
        chunks = [feature_fn(module, **{k: v[i : i + batch] if torch.is_tensor(v) else v for k, v in inputs.items()})
                  for i in range(0, n, batch)]
    else:
        n = inputs.shape[0]
        chunks = [feature_fn(module, inputs[i : i + batch]) for i in range(0, n, batch)]
    return torch.cat([c.to(torch.float32) for c in chunks], dim=0)


def build_twin_model(module: nn.Module, base: Any, finetuned: Sequence[Any], inputs, task_ids, *,
                     shared: Any = None, lam: float = 0.29, density: float = 0.1, exclude: str = "default",
                     feature_fn: Callable | None = None, routing: str = "sample", svd: str = "exact",
                     router_hidden: int | None = None, dropout: float = 0.5, epochs: int = 50, lr: float = 5e-4,
                     batch_size: int = 1024, val_fraction: float = 0.2, seed: int = 0) -> TwinMergedModel:
    """Twin-Merging end to end for a torch module.

    module: an instance of the architecture (deep-copied; its weights become theta*). base/finetuned:
    state dicts, modules or paths. shared: a merged state dict to use as theta* (default: task arithmetic
    with ``lam``). inputs: a tensor [S, ...] or a dict of tensors sharing dim 0 (Hugging Face kwargs);
    task_ids: [S] ints in 0..N-1. Returns the routed model (with ``.train_report`` from router training).
    """
    if len(finetuned) < 1:
        raise MergeError("twin: give at least one fine-tuned model")
    ids = torch.as_tensor(task_ids).long().reshape(-1)
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= len(finetuned):
        raise MergeError(f"twin: task ids must lie in 0..{len(finetuned) - 1} (one per fine-tuned model)")
    shared_sd = dict(shared) if isinstance(shared, Mapping) else (
        shared.state_dict() if isinstance(shared, nn.Module) else shared_expert(base, finetuned, lam))
    model = copy.deepcopy(module)
    missing, unexpected = model.load_state_dict(shared_sd, strict=False)
    if unexpected:
        raise MergeError(f"twin: the shared state dict has tensors the module lacks, e.g. {unexpected[0]}")
    model.eval()
    exclusives = compress_exclusive(model.state_dict(), finetuned, density, exclude=exclude, svd=svd, seed=seed)
    fn = feature_fn or pooled_input
    feats = _features(fn, model, inputs, batch=max(1, batch_size))
    if feats.shape[0] != ids.numel():
        raise MergeError(f"twin: {feats.shape[0]} inputs but {ids.numel()} task ids")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = TwinRouter(feats.shape[1], len(finetuned), router_hidden, dropout)
    report = train_router(router, feats, ids, epochs=epochs, lr=lr, batch_size=batch_size,
                          val_fraction=val_fraction, seed=seed)
    twin = TwinMergedModel(model, exclusives, router, fn, routing=routing)
    twin.train_report = report
    return twin
