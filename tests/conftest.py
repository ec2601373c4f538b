"""Shared fixtures: tiny random-init Hugging Face models written to disk (no downloads).

``tiny_zoo(arch)`` builds a base plus three "fine-tunes" (base + small random deltas) as HF folders
with a tiny word-level tokenizer, and returns their paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def make_config(arch: str, **kw):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        cfg.update(kw)
        return LlamaConfig(**cfg)
    if arch == "gpt2":
        cfg = dict(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        cfg.update(kw)
        return GPT2Config(**cfg)
    raise ValueError(arch)


def build_model(arch: str, seed: int, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **kw))
    return model.eval()


def perturb(model, seed: int, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def write_zoo(root: Path, arch: str, n: int = 3, seed: int = 0, dtype=torch.float32, **kw) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    base = build_model(arch, seed, **kw).to(dtype)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    _tokenizer(paths["base"], base.config.vocab_size)
    for i in range(n):
        m = build_model(arch, seed, **kw).to(dtype)
        perturb(m, 100 + i)
        p = root / f"ft{i}"
        m.save_pretrained(p)
        _tokenizer(p, m.config.vocab_size)
        paths[f"ft{i}"] = p
    return paths


def cli(*args) -> int:
    """Run the ``mergesmith`` CLI in-process; its exit code (0 on success)."""
    from mergesmith.cli import main as cli_main

    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    cache: dict = {}

    def get(arch: str = "llama", **kw) -> dict:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_zoo(tmp_path_factory.mktemp(f"zoo_{arch}"), arch, **kw)
        return cache[key]

    return get


def load_state(folder) -> dict:
    from safetensors.torch import load_file

    folder = Path(folder)
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        out = {}
        for f in sorted(set(json.loads(idx.read_text())["weight_map"].values())):
            out.update(load_file(folder / f))
        return out
    return load_file(folder / "model.safetensors")


def method_inputs(spec, zoo: dict) -> tuple:
    """(base path or None, model paths) to merge with ``spec`` in the end-to-end tests: up to 3 models
    (the method's maximum, else at least 2), the base where the method takes one."""
    n = spec.max_models if spec.max_models is not None else max(spec.min_models, 2)
    models = [zoo[f"ft{i}"] for i in range(min(n, 3))]
    base = zoo["base"] if spec.base in ("required", "optional") else None
    return base, models


def spy_kernels(monkeypatch, *names: str) -> list:
    """Skip without numba; else record (in the returned list) the calls of the ``_fused`` wrappers ``names``."""
    import mergesmith.methods._fused as F

    if not F.enabled():
        pytest.skip("numba not installed")
    seen: list = []
    for name in names:
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _r=real, _n=name, **k: seen.append(_n) or _r(*a, **k))
    return seen


def on_torch_path(monkeypatch, fn):
    """``fn()`` with the fused kernels off (MERGESMITH_FUSED=0): the torch form of the same merge."""
    with monkeypatch.context() as m:
        m.setenv("MERGESMITH_FUSED", "0")
        return fn()
