"""Zoo family ``classify``: one small image body, per-task heads (the CLIP task-arithmetic setting).

Setting of Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023): a pretrained encoder,
one frozen classification head per task, experts = the encoder fine-tuned on one task with its head
frozen. Only the shared body is merged; each task is evaluated with its own head. Metric: accuracy;
normalized accuracy = acc(merged) / acc(expert), as in the paper.

Tasks (procedural 16x16 images, :mod:`mergesmith.bench.synth_images`): shapes, count, orient, freq,
digits, symmetry. The base is pretrained on a mixture of all tasks' *images* with generic objectives
(which generator made the image + its 4x4 average-pooled pixels), never on their labels. Heads are
linear probes trained on the frozen base features ("zero-shot" heads), then frozen. The multi-task
model fine-tunes the body on all tasks at once (the upper bound).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import synth_images
from .train import batch_sampler, save_model, train
from .zoo import Family, Zoo, register_family

SIZES = {
    "default": dict(tasks=list(synth_images.TASKS), width=192, hidden=384, depth=3, n_train=8192, n_val=1000,
                    pre_steps=600, pre_batch=32, pre_lr=2e-3, probe_steps=200, ft_steps=400, ft_batch=64,
                    ft_lr=5e-4, mt_steps=400),
    "tiny": dict(tasks=["shapes", "orient", "digits"], width=48, hidden=96, depth=2, n_train=1024, n_val=400,
                 pre_steps=120, pre_batch=32, pre_lr=3e-3, probe_steps=100, ft_steps=120, ft_batch=64,
                 ft_lr=1e-3, mt_steps=150),
}


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h):
        return h + self.fc2(F.gelu(self.fc1(self.ln(h))))


class Body(nn.Module):
    """Pre-norm residual MLP: embed (256 -> width), ``depth`` blocks, final LayerNorm."""

    def __init__(self, width: int, hidden: int, depth: int, inputs: int = synth_images.SIDE**2):
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.norm(h)


def body_from_config(cfg: dict) -> Body:
    return Body(cfg["width"], cfg["hidden"], cfg["depth"], cfg.get("inputs", synth_images.SIDE**2))


def _config(c: dict) -> dict:
    return {"model_type": "mergesmith-classify-body", "architectures": ["Body"], "width": c["width"],
            "hidden": c["hidden"], "depth": c["depth"], "inputs": synth_images.SIDE**2,
            "tasks": c["tasks"], "note": "mergesmith.bench.zoo_classify.Body; heads live in ../eval/heads.safetensors"}


def _accuracy(body: Body, head: nn.Linear, x, y) -> float:
    with torch.no_grad():
        return float((head(body(x)).argmax(1) == y).float().mean())


def build(folder: Path, c: dict, seed: int, log) -> dict:
    tasks = c["tasks"]
    data = {}
    for i, t in enumerate(tasks):
        ti = list(synth_images.TASKS).index(t)
        data[t] = (synth_images.make(t, c["n_train"], seed * 1000 + 10 * ti + 1),
                   synth_images.make(t, c["n_val"], seed * 1000 + 10 * ti + 2))
    n_classes = {t: synth_images.TASKS[t][1] for t in tasks}

    # 1. pretrain the body on the images of every task with label-free objectives
    torch.manual_seed(seed)
    body = body_from_config(c)
    aux = nn.Linear(c["width"], len(tasks) + 16)
    samplers = [batch_sampler(c["n_train"], c["pre_batch"], seed * 7 + i) for i in range(len(tasks))]

    def pre_loss(step):
        x = torch.cat([data[t][0][0][s(step)] for t, s in zip(tasks, samplers)])
        src = torch.arange(len(tasks)).repeat_interleave(c["pre_batch"])
        pooled = F.avg_pool2d(x.view(-1, 1, synth_images.SIDE, synth_images.SIDE), 4).flatten(1)
        out = aux(body(x))
        return F.cross_entropy(out[:, : len(tasks)], src) + 10 * F.mse_loss(out[:, len(tasks):], pooled)

    train(list(body.parameters()) + list(aux.parameters()), pre_loss, c["pre_steps"], c["pre_lr"], 0.01)
    body.requires_grad_(False)
    log(f"classify: pretrained base ({c['pre_steps']} steps)")

    # 2. zero-shot-like heads: linear probes on frozen base features, then frozen for good
    heads = {}
    for t in tasks:
        (xtr, ytr), _ = data[t]
        with torch.no_grad():
            feats = body(xtr)
        torch.manual_seed(seed * 31 + tasks.index(t))
        head = nn.Linear(c["width"], n_classes[t])
        train(head.parameters(), lambda s, h=head, f=feats, y=ytr: F.cross_entropy(h(f), y), c["probe_steps"], 1e-2)
        heads[t] = head.requires_grad_(False)

    def finetune(task_list, steps, sampler_seed):
        model = copy.deepcopy(body).requires_grad_(True)
        smp = [batch_sampler(c["n_train"], c["ft_batch"], sampler_seed + i) for i in range(len(task_list))]

        def loss(step):
            total = 0.0
            for t, s in zip(task_list, smp):
                idx = s(step)
                (xtr, ytr), _ = data[t]
                total = total + F.cross_entropy(heads[t](model(xtr[idx])), ytr[idx])
            return total / len(task_list)

        train(model.parameters(), loss, steps, c["ft_lr"])
        return model.requires_grad_(False)

    # 3. experts and the multi-task upper bound
    experts = {}
    for i, t in enumerate(tasks):
        experts[t] = finetune([t], c["ft_steps"], seed * 100 + 50 + i)
        log(f"classify: fine-tuned expert '{t}'")
    multitask = finetune(tasks, c["mt_steps"], seed * 100 + 90)
    log("classify: trained the multi-task model")

    cfg = _config(c)
    save_model(folder / "base", body.state_dict(), cfg)
    for t, m in experts.items():
        save_model(folder / "experts" / t, m.state_dict(), {**cfg, "task": t})
    save_model(folder / "multitask", multitask.state_dict(), {**cfg, "task": "all"})

    from safetensors.torch import save_file

    (folder / "eval").mkdir()
    save_file({f"{t}.{k}": v.contiguous() for t, h in heads.items() for k, v in h.state_dict().items()},
              str(folder / "eval" / "heads.safetensors"))
    save_file({**{f"{t}.x": data[t][1][0].contiguous() for t in tasks}, **{f"{t}.y": data[t][1][1] for t in tasks}},
              str(folder / "eval" / "val.safetensors"))
    return {"tasks": tasks, "models": {"base": "base", "multitask": "multitask",
                                       "experts": {t: f"experts/{t}" for t in tasks}},
            "config": c}


class Evaluator:
    """Accuracy of a merged body on every task's validation set, with that task's frozen head."""

    def __init__(self, zoo: Zoo):
        from safetensors.torch import load_file

        cfg = zoo.manifest["config"]
        self.tasks = zoo.tasks
        self.body = body_from_config(cfg).requires_grad_(False)
        h = load_file(str(zoo.root / "eval" / "heads.safetensors"))
        self.heads = {}
        for t in self.tasks:
            w = h[f"{t}.weight"]
            head = nn.Linear(w.shape[1], w.shape[0])
            head.load_state_dict({"weight": w, "bias": h[f"{t}.bias"]})
            self.heads[t] = head.requires_grad_(False)
        v = load_file(str(zoo.root / "eval" / "val.safetensors"))
        self.val = {t: (v[f"{t}.x"], v[f"{t}.y"]) for t in self.tasks}

    def evaluate(self, state_dict: dict) -> dict[str, float]:
        sd = {k: v.to(torch.float32) for k, v in state_dict.items()}
        self.body.load_state_dict(sd, strict=True)
        return {t: _accuracy(self.body, self.heads[t], *self.val[t]) for t in self.tasks}


FAMILY = register_family(Family(
    name="classify",
    version="v1",
    description="16x16 procedural images, 6 tasks; residual-MLP body + frozen per-task heads (CLIP setting)",
    metric="accuracy",
    higher_is_better=True,
    sizes=SIZES,
    build=build,
    evaluator=Evaluator,
    merge_note="only the shared body is merged; each task keeps its own frozen head",
))
