"""Vocabulary alignment, as mergekit does it (``mergekit/tokenizer``): ``tokenizer_source: union`` builds one
output tokenizer holding every input's tokens; ``base`` or a model path takes that tokenizer. The embedding
rows of each input are re-indexed to the output tokenizer by token string, unless every input has each output
token at the same id (equal tokenizer files are seen without loading them: :func:`vocabulary_fingerprint`).
An input without tokenizer files is taken to have the base's vocabulary, and tokens of the base / source
tokenizer at ids >= its ``vocab_size`` are stripped from it (fast BPE tokenizers), as mergekit does.

Union vocabulary: the base tokenizer's tokens at their ids, then every other input's regular tokens it
lacks (inputs in recipe order, each in its id order), then their added tokens (first settings win). Tokens at
ids >= an input's ``vocab_size`` (config) are ignored for that input. mergekit walks the inputs in the order
of a Python set of model references, which changes from run to run: the appended tokens then get the same
rows but possibly other ids; here the order is the recipe's.

Rows of a vocabulary-indexed tensor (embeddings, lm_head: dim 0 = the input's vocabulary size) for output
token t: each input that has t gives its own row; an input that lacks t gets (mergekit's defaults) the row
of the only input that has it, else the base's row if the base has it, else the mean of the rows of the
inputs that have it (float32, then the stored dtype; mergekit averages in its working dtype), else zeros.
The ``tokenizer:`` block's ``tokens`` settings replace that default per token (a model's row of the token,
a fixed row ``{kind: model_token, model, token | token_id}``, ``{kind: zero}``; ``force`` gives it to every
input; tokens no input has are added), and ``pad_to_multiple_of`` appends rows equal to each input's mean
aligned row. Without it, a base whose embedding has more rows than the output vocabulary (padding rows,
Qwen2.5's 152064 for 151665 tokens) keeps its row count: the rows past the vocabulary are each input's
own rows there, or its mean aligned row (mergekit cuts them away, its issue #425). Inputs are merged as usual afterwards. Tokenizers are read with ``transformers`` (imported
here only).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..methods.base import MergeError

AVERAGE, ZERO, FIXED = -1, -2, -3  # default-row kinds besides a donor input's index
_LOCK = threading.Lock()


@dataclass(frozen=True)
class VocabAlign:
    """How to build output rows of a vocabulary tensor: ``src[i][t]`` = row of input i for token t (-1: lacks
    it); ``fill[t]`` = input whose row the inputs lacking t get, or AVERAGE / ZERO / FIXED. ``size`` > the vocabulary
    (``pad_to_multiple_of``): the rows past it are each input's mean aligned row (mergekit's padding)."""

    size: int
    src: dict[int, np.ndarray]
    fill: np.ndarray
    force: np.ndarray | None = None  # tokens whose default row every input takes (``force: true``)
    fixed: dict = field(default_factory=dict)  # token -> (input, row): a ``model_token`` source
    keep_rows: bool = False  # rows past the vocabulary are the base's padding rows kept: inputs' own rows there
    means: dict = field(default_factory=dict, compare=False, repr=False)  # input -> mean row, made once

    def rows(self, inputs: list, refs: list, rows: tuple[int, int] | None) -> list[torch.Tensor]:
        """The aligned rows ``rows`` (all if None) of each input tensor ``refs`` (InputRefs), stored dtype."""
        a, b = rows if rows is not None else (0, self.size)
        v = len(self.fill)
        got = self._tokens(inputs, refs, min(a, v), min(b, v))
        if b > v:  # rows past the vocabulary: the input's own row there if it has one, else its mean row
            lo = max(a, v)
            out = []
            for ref, t in zip(refs, got):
                have = min(b, inputs[ref.model].meta(ref.name).shape[0]) if self.keep_rows else lo
                parts = [t]
                if have > lo:
                    parts.append(inputs[ref.model].get(ref.name, (lo, have)))
                if b > max(have, lo):
                    row = self._means(inputs, refs)[ref.model]
                    parts.append(row.expand((b - max(have, lo),) + tuple(t.shape[1:])))
                out.append(torch.cat(parts))
            got = out
        return got

    def _tokens(self, inputs: list, refs: list, a: int, b: int) -> list[torch.Tensor]:
        got = {}
        for ref in refs:
            if ref.model not in got:
                got[ref.model] = _gather(inputs[ref.model], ref.name, self.src[ref.model][a:b])
        fill = self.fill[a:b]
        force = self.force[a:b] if self.force is not None else False
        missing = {i: np.flatnonzero((self.src[i][a:b] < 0) | force) for i in got}
        names = {ref.model: ref.name for ref in refs}
        defaults: dict[int, torch.Tensor | None] = {}
        for k in sorted({k for lack in missing.values() for k in lack.tolist()}):
            f = int(fill[k])
            if f >= 0:
                row = got[f][k].clone()
            elif f == AVERAGE:
                have = [got[j][k].float() for j in got if self.src[j][a + k] >= 0]
                row = torch.stack(have).mean(0) if have else None
            elif f == FIXED:
                j, r = self.fixed[a + k]
                row = inputs[j].get(names.get(j, refs[0].name), (r, r + 1))[0]
            else:
                row = None
            defaults[k] = row
        for i, lack in missing.items():
            for k in lack.tolist():
                row = defaults[k]
                got[i][k] = 0 if row is None else row.to(got[i].dtype)
        return [got[ref.model] for ref in refs]

    def _means(self, inputs: list, refs: list) -> dict:
        """Each input's mean aligned token row (float64 sums over row blocks, then its stored dtype)."""
        with _LOCK:
            if not self.means:
                v = len(self.fill)
                width = max(1, math.prod(inputs[refs[0].model].meta(refs[0].name).shape[1:]))
                step = max(1, (1 << 22) // width)
                sums: dict[int, torch.Tensor] = {}
                for a in range(0, v, step):
                    rows = dict(zip((ref.model for ref in refs), self._tokens(inputs, refs, a, min(v, a + step))))
                    for i, t in rows.items():  # once per input, however many refs read it
                        part = t.double().sum(0)
                        sums[i] = part if i not in sums else sums[i] + part
                dtypes = {ref.model: inputs[ref.model].meta(ref.name).dtype for ref in refs}
                self.means.update({i: (s / v).to(dtypes[i]) for i, s in sums.items()})
            return self.means


def _gather(ck, name: str, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of tensor ``name`` (-1: a zero row), read as runs of consecutive rows."""
    meta = ck.meta(name)
    out = torch.zeros((len(idx),) + tuple(meta.shape[1:]), dtype=meta.dtype)
    k = 0
    while k < len(idx):
        if idx[k] < 0:
            k += 1
            continue
        e = k + 1
        while e < len(idx) and idx[e] == idx[e - 1] + 1:
            e += 1
        out[k:e] = ck.get(name, (int(idx[k]), int(idx[e - 1]) + 1))
        k = e
    return out


def _tokenizer(folder: Path | None, label: str, required: bool = True):
    """The input's tokenizer (``transformers``, fast, no remote code); without loadable files an error, or None
    when not ``required`` (mergekit then assumes the base's tokenizer)."""
    from transformers import AutoTokenizer

    if folder is None:
        if not required:
            return None
        raise MergeError(f"vocabulary alignment needs the tokenizer files of the base / tokenizer source; {label} is "
                         f"not a model folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user input problem here
        if not required:
            return None
        raise MergeError(f"vocabulary alignment: cannot load the tokenizer of {label}: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "added_tokens.json")


def vocabulary_fingerprint(folder: Path | None) -> str | None:
    """A hash of what fixes a folder's token ids (the tokenizer files, and ``added_tokens_decoder`` of
    tokenizer_config.json, not its chat template); None without tokenizer files. Equal fingerprints mean
    equal vocabularies, without importing transformers."""
    import hashlib
    import json

    if folder is None or not Path(folder).is_dir():
        return None
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = Path(folder) / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    cfg = Path(folder) / "tokenizer_config.json"
    if cfg.is_file():
        try:
            added = json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder")
        except (ValueError, UnicodeDecodeError):
            added = cfg.read_text(errors="replace")
        h.update(b"added\0" + json.dumps(added, sort_keys=True).encode())
    return h.hexdigest() if found else None


def _strip_past(tok, size: int, label: str) -> bool:
    """Remove from ``tok``, in place, its tokens at ids >= ``size`` (the model's vocab_size; tokens it has no rows
    for), as mergekit strips the base tokenizer: fast BPE tokenizers only (their tokens, added tokens and the
    merges that use or make them). Whether there was anything to strip."""
    import json

    extra = {t for t, i in tok.get_vocab().items() if i >= size}
    if not extra:
        return False
    if not tok.is_fast:
        raise MergeError(f"vocabulary alignment: the tokenizer of {label} has tokens past its vocab_size {size} and "
                         f"no fast version to strip them from")
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise MergeError(f"vocabulary alignment: the tokenizer of {label} has tokens past its vocab_size {size}; "
                         f"stripping them is supported for BPE tokenizers only, this one is {spec['model']['type']}")
    from tokenizers import Tokenizer

    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < size]
    vocab = spec["model"]["vocab"]
    for t in extra:
        vocab.pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in extra for p in parts) and "".join(parts) not in extra

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return True


def _vocab_size(ck, tok) -> int:
    cfg = ck.config or {}
    n = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(n) if n else len(tok.get_vocab())


@dataclass
class OutputVocab:
    """The output tokenizer and, per input (plan index), the id in that input of each output token (-1: it
    lacks it), its vocab_size and its own vocabulary (token -> id)."""

    tokenizer: object
    src: dict[int, np.ndarray]
    sizes: dict[int, int]
    vocabs: dict[int, dict]
    built: bool  # the tokenizer differs from an input's (union, tokens added or stripped): saved, not copied
    warnings: list = field(default_factory=list)

    def identity(self, members: list[int]) -> bool:
        """Whether every input of ``members`` has each output token at the same id (re-indexing is a no-op)."""
        ids = np.arange(self.size)
        return all(len(self.src[i]) <= self.sizes[i] and np.array_equal(self.src[i], ids) for i in members)

    @property
    def size(self) -> int:
        return len(self.src[next(iter(self.src))])


def aligned_vocab(inputs: list, order: list[int], base: int, source: int | None = None,
                  add_tokens: tuple[str, ...] = ()) -> OutputVocab:
    """The :class:`OutputVocab` of the inputs ``order`` (plan input indices, recipe order), ``base`` the base
    input. ``source`` None: the union vocabulary (mergekit's ``build_union_tokenizer``); an input index: that
    input's tokenizer (``tokenizer_source: base`` / a model). ``add_tokens`` (the ``tokens:`` settings' keys)
    are added where the output tokenizer lacks them, as mergekit does."""
    load = order + ([source] if source is not None and source not in order else [])
    top = base if source is None else source
    toks, warnings = {}, []
    for i in dict.fromkeys([base, *load]):  # the base first: inputs without tokenizer files take its vocabulary
        toks[i] = _tokenizer(inputs[i].folder, inputs[i].label, required=i in (base, top))
        if toks[i] is None:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
            warnings.append(f"{inputs[i].label}: no tokenizer files; its vocabulary is taken to be "
                            f"{inputs[base].label}'s")
            toks[i] = toks[base]
    sizes = {i: _vocab_size(inputs[i], toks[i]) for i in load}
    # in place: every later use (the fallback of inputs without tokenizer files too) sees it stripped
    strip = _strip_past(toks[top], sizes[top], inputs[top].label)
    if strip:
        warnings.append(f"{inputs[top].label}: tokens past its vocab_size {sizes[top]} dropped from the output "
                        f"tokenizer (no embedding rows)")
    out = toks[source] if source is not None else _union(toks, sizes, order, base)
    new = [t for t in dict.fromkeys(add_tokens) if t not in out.get_vocab()]
    if new:
        out = _copy(out) if source is not None else out
        out.add_tokens(new)
    vocab = out.get_vocab()
    src = {}
    for i in order:
        mv = toks[i].get_vocab()
        s = np.full(len(vocab), -1, np.int64)
        for t, new_id in vocab.items():
            old = mv.get(t)
            if old is not None and old < sizes[i]:
                s[new_id] = old
        src[i] = s
    return OutputVocab(out, src, sizes, {i: toks[i].get_vocab() for i in load}, source is None or bool(new) or strip,
                       warnings)


def _union(toks: dict, sizes: dict, order: list[int], base: int):
    regular: dict[str, None] = {}
    added: dict[str, object] = {}
    for i in [base] + [j for j in order if j != base]:
        for t, idx in sorted(toks[i].get_vocab().items(), key=lambda kv: kv[1]):
            if idx < sizes[i]:
                regular.setdefault(t)
        for idx, info in sorted(toks[i].added_tokens_decoder.items()):
            if idx < sizes[i]:
                added.setdefault(info.content, info)
    out = _copy(toks[base])
    have = set(toks[base].get_vocab())
    new = [t for t in regular if t not in added and t not in have]
    if new:
        out.add_tokens(new)
    for info in added.values():
        if info.content not in have:
            out.add_tokens([info])
    return out


def _copy(tok):
    """A fresh tokenizer equal to ``tok`` (save and reload: adding tokens must not change the input's)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False)


def token_settings(vocab: OutputVocab, tokens: dict | None, members: list[int], input_of) -> dict:
    """The recipe's ``tokenizer.tokens`` (validated by the recipe schema) as {output token id: (kind, input,
    row, force)} for :func:`align_for`; ``input_of`` maps a model reference to its plan input index."""
    out = {}
    ids = vocab.tokenizer.get_vocab()
    for token, cfg in (tokens or {}).items():
        t, src, force = ids[token], cfg["source"], bool(cfg.get("force", False))
        if isinstance(src, dict) and src["kind"] == "zero":
            out[t] = (ZERO, -1, -1, force)
            continue
        ref = src["model"] if isinstance(src, dict) else src
        i = input_of(ref)
        if i not in members:
            raise MergeError(f"tokenizer.tokens['{token}']: source model {ref} is not an input of the merge")
        if not isinstance(src, dict):  # that model's own row of the token
            if vocab.src[i][t] < 0:
                raise MergeError(f"tokenizer.tokens['{token}']: {ref} has no token '{token}'")
            out[t] = (i, i, -1, force)
            continue
        row = src.get("token_id")
        if row is None:
            row = vocab.vocabs[i].get(src["token"])
            if row is None:
                raise MergeError(f"tokenizer.tokens['{token}']: {ref} has no token '{src['token']}'")
        if not 0 <= row < vocab.sizes[i]:
            raise MergeError(f"tokenizer.tokens['{token}']: token id {row} is out of range for {ref}")
        out[t] = (FIXED, i, int(row), force)
    return out


def align_for(vocab: OutputVocab, members: list[int], base: int | None, pad: int | None = None,
              tokens: dict | None = None) -> VocabAlign:
    """The :class:`VocabAlign` of a tensor read from inputs ``members``: mergekit's default rows, rows padded
    to a multiple of ``pad`` (else the base's row count kept, see below); ``tokens`` = {output token id: (kind, input, row, force)} from the recipe's
    per-token settings (kind ZERO, FIXED with that input's row, or an input index: its row of the token)."""
    src = vocab.src
    size = vocab.size
    present = np.stack([src[i] >= 0 for i in members])
    count = present.sum(0)
    fill = np.full(size, AVERAGE, np.int64)
    fill[count == 0] = ZERO
    if base is not None and base in members:
        fill[(count > 1) & (src[base] >= 0)] = base
    one = count == 1
    fill[one] = np.asarray(members)[present.argmax(0)[one]]
    force = np.zeros(size, bool)
    fixed = {}
    for t, (kind, i, row, forced) in (tokens or {}).items():
        fill[t] = kind
        force[t] = forced
        if kind == FIXED:
            fixed[t] = (i, row)
    # rows: mergekit's pad_to_multiple_of when given; else the vocabulary, or the base's row count when that
    # is larger (padded embeddings such as Qwen2.5's 152064 rows for 151665 tokens keep their shape, where
    # mergekit cuts them to the vocabulary: its issue #425)
    ref = base if base is not None else members[0]
    rows = -(-size // pad) * pad if pad else max(size, vocab.sizes[ref])
    return VocabAlign(rows, {i: src[i] for i in members}, fill, force if force.any() else None, fixed,
                      keep_rows=not pad)
