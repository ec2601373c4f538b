"""Zoo family ``bytegpt``: a tiny byte-level GPT-2 with domain experts (the Branch-Train-Merge setting).

Li et al., "Branch-Train-Merge: Embarrassingly Parallel Training of Expert Language Models"
(arXiv 2208.03306): a seed LM trained on a mixture, then one copy ("branch") trained further on each
domain; models are compared by per-domain validation loss. Here the seed LM is a random-init
``transformers`` GPT-2 (vocab = 256 bytes) trained on an equal mixture of the four domains of
:mod:`mergesmith.bench.text_domains` (code, prose, json, arith); each expert continues on one domain;
the multi-task model continues on the mixture for as many steps as all experts together.

Metric: mean next-byte cross-entropy (nats) on each domain's held-out text, lower is better.
Normalized score = (L_base - L_merged) / (L_base - L_expert): the fraction of the expert's gain kept
(1 = expert, 0 = base). Every model is a Hugging Face folder (``from_pretrained`` loads it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import text_domains
from .train import train
from .zoo import Family, Zoo, register_family

SIZES = {
    "default": dict(pretrain=["prose", "code"], domains=["json", "arith", "csv", "logs"], n_embd=64, n_layer=2,
                    n_head=4, seq=64, batch=16, train_bytes=300_000, val_windows=48, pre_steps=500, pre_lr=3e-3,
                    ft_steps=300, ft_lr=3e-4),
    "tiny": dict(pretrain=["prose", "code"], domains=["json", "arith", "csv"], n_embd=32, n_layer=1, n_head=2,
                 seq=32, batch=16, train_bytes=40_000, val_windows=24, pre_steps=100, pre_lr=5e-3, ft_steps=80,
                 ft_lr=1e-3),
}


def gpt2_config(c: dict):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=256, n_positions=max(128, c["seq"]), n_embd=c["n_embd"], n_layer=c["n_layer"],
                      n_head=c["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=10, eos_token_id=10, tie_word_embeddings=True)


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _windows(data: torch.Tensor, seq: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (count,), generator=g)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long()


def _loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


def build(folder: Path, c: dict, seed: int, log) -> dict:
    _quiet()
    from transformers import GPT2LMHeadModel

    doms, pre = c["domains"], c["pretrain"]
    train_data = {d: torch.frombuffer(bytearray(text_domains.text(d, "train", c["train_bytes"], seed)), dtype=torch.uint8)
                  for d in doms + pre}
    val_text = {d: torch.frombuffer(bytearray(text_domains.text(d, "val", c["train_bytes"] // 8, seed)), dtype=torch.uint8)
                for d in doms}
    val = {d: _windows(val_text[d], c["seq"], c["val_windows"], seed * 13 + i) for i, d in enumerate(doms)}

    def sampler(domains, sampler_seed):
        g = torch.Generator().manual_seed(sampler_seed)
        per = max(1, c["batch"] // len(domains))

        def get(step):
            parts = []
            for d in domains:
                data = train_data[d]
                starts = torch.randint(0, data.numel() - c["seq"] - 1, (per,), generator=g)
                parts.append(torch.stack([data[s : s + c["seq"] + 1] for s in starts.tolist()]))
            return torch.cat(parts).long()

        return get

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(gpt2_config(c))
    get = sampler(pre, seed * 7 + 1)
    train(base.parameters(), lambda s: _loss(base, get(s)), c["pre_steps"], c["pre_lr"], 0.01)
    log(f"bytegpt: pretrained the seed LM on {' + '.join(pre)} ({c['pre_steps']} steps)")
    base.save_pretrained(folder / "base")

    def branch(domains, steps, sampler_seed):
        model = GPT2LMHeadModel.from_pretrained(folder / "base")
        model.train()
        g = sampler(domains, sampler_seed)
        train(model.parameters(), lambda s: _loss(model, g(s)), steps, c["ft_lr"])
        return model

    for i, d in enumerate(doms):
        branch([d], c["ft_steps"], seed * 100 + 50 + i).save_pretrained(folder / "experts" / d)
        log(f"bytegpt: trained expert '{d}'")
    branch(doms, c["ft_steps"] * len(doms), seed * 100 + 90).save_pretrained(folder / "multitask")
    log("bytegpt: trained the multi-task model")

    from safetensors.torch import save_file

    (folder / "eval").mkdir()
    save_file({d: v.contiguous() for d, v in val.items()}, str(folder / "eval" / "val.safetensors"))
    return {"tasks": doms, "models": {"base": "base", "multitask": "multitask",
                                      "experts": {d: f"experts/{d}" for d in doms}},
            "config": c}


class Evaluator:
    """Per-domain validation loss (nats per byte) of a merged GPT-2 state dict."""

    def __init__(self, zoo: Zoo):
        _quiet()
        from safetensors.torch import load_file
        from transformers import GPT2LMHeadModel

        self.tasks = zoo.tasks
        self.model = GPT2LMHeadModel.from_pretrained(zoo.root / "base").eval().requires_grad_(False)
        v = load_file(str(zoo.root / "eval" / "val.safetensors"))
        self.val = {d: v[d].long() for d in self.tasks}

    def evaluate(self, state_dict: dict) -> dict[str, float]:
        sd = {k: v.to(torch.float32) for k, v in state_dict.items()}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
        if missing or unexpected:
            raise ValueError(f"bytegpt: state dict does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model.tie_weights()
        with torch.no_grad():
            return {d: float(_loss(self.model, self.val[d])) for d in self.tasks}


FAMILY = register_family(Family(
    name="bytegpt",
    version="v1",
    description="byte-level GPT-2 (HF folders): seed LM on prose + code, experts on json / arith / csv / logs (BTM setting)",
    metric="loss",
    higher_is_better=False,
    sizes=SIZES,
    build=build,
    evaluator=Evaluator,
    merge_note="every tensor is merged (tied input/output embedding)",
))
