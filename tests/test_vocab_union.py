"""`tokenizer_source: union`: one tokenizer with every input's tokens, embedding rows re-indexed to it with
mergekit's defaults for the rows an input lacks (io/vocab.py)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_model, load_state
from mergesmith.methods.base import MergeError
from mergesmith.run import run_recipe

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _save_tokenizer(folder, regular_extra=(), added=()):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, 64):
        vocab[f"w{i}"] = i
    for t in regular_extra:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens([AddedToken(t, special=True) for t in added])
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base: 64 tokens; ft0: + added <|im_start|>, <|im_end|> (66); ft1: + regular 'zz', added <|im_end|> (66)."""
    root = tmp_path_factory.mktemp("union")
    paths = {}
    for k, (name, vocab, extra, added) in enumerate([
        ("base", 64, (), ()),
        ("ft0", 66, (), ("<|im_start|>", "<|im_end|>")),
        ("ft1", 66, ("zz",), ("<|im_end|>",)),
    ]):
        m = build_model("llama", 10 + k, vocab_size=vocab)
        paths[name] = root / name
        m.save_pretrained(paths[name])
        _save_tokenizer(paths[name], extra, added)
    return paths


def _whole_equals_chunked(plan, rows: int) -> tuple:
    """Run ``plan`` whole and in chunks of ``rows`` rows; assert equal outputs; the embedding's shape."""
    from mergesmith.engine import DictSink, execute

    whole, chunked = DictSink(plan), DictSink(plan)
    execute(plan, whole)
    execute(plan, chunked, chunk_elements=rows * 32)
    for k in whole.tensors:
        assert torch.equal(whole.tensors[k], chunked.tensors[k]), k
    return tuple(whole.tensors[EMB].shape)


def _merge(zoo, tmp_path, method="task_arithmetic", **extra):
    recipe = {"merge_method": method, "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["ft0"]), "parameters": {"weight": 0.3}},
                         {"model": str(zoo["ft1"]), "parameters": {"weight": 0.5}}],
              "tokenizer_source": "union", "dtype": "float32", **extra}
    recipe = {k: v for k, v in recipe.items() if v is not None}
    out = tmp_path / "out"
    run_recipe(recipe, out)
    return out


def test_union_vocabulary_and_rows_follow_mergekit_defaults(zoo, tmp_path):
    out = _merge(zoo, tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    # base ids kept, then the new regular token, then the added tokens (first input's settings)
    assert len(vocab) == 67 and vocab["w63"] == 63
    assert (vocab["zz"], vocab["<|im_start|>"], vocab["<|im_end|>"]) == (64, 65, 66)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 67
    b, f0, f1 = (load_state(zoo[k]) for k in ("base", "ft0", "ft1"))
    got = load_state(out)
    for name in (EMB, HEAD):
        def ta(rb, r0, r1):
            return rb + 0.3 * (r0 - rb) + 0.5 * (r1 - rb)
        B, F0, F1 = b[name], f0[name], f1[name]
        assert got[name].shape == (67, B.shape[1])
        torch.testing.assert_close(got[name][:64], ta(B, F0[:64], F1[:64]))
        # 'zz' only in ft1: every input takes ft1's row -> the merge gives that row
        torch.testing.assert_close(got[name][64], F1[64])
        # <|im_start|> only in ft0
        torch.testing.assert_close(got[name][65], F0[64])
        # <|im_end|> in ft0 (65) and ft1 (65), not in the base: the base takes their mean
        mean = (F0[65] + F1[65]) / 2
        torch.testing.assert_close(got[name][66], ta(mean, F0[65], F1[65]))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("w5 zz <|im_end|>", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 64, 66]]
    assert model(ids).logits.shape == (1, 3, 67)


def test_union_base_row_used_when_the_base_has_the_token(zoo, tmp_path):
    """A token the base and some (not all) inputs have: the inputs lacking it take the base's row."""
    recipe_models = [str(zoo["ft0"]), str(zoo["ft1"])]
    out = tmp_path / "o"
    run_recipe({"merge_method": "linear", "models": [{"model": m} for m in recipe_models],
                "tokenizer": {"source": "union"}, "dtype": "float32"}, out)
    f0, f1 = load_state(zoo["ft0"]), load_state(zoo["ft1"])
    got = load_state(out)[EMB]
    tok_vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    # base = ft0 (first model): ft0's ids, then zz; <|im_end|> shared; <|im_start|> only ft0
    assert tok_vocab == 67
    torch.testing.assert_close(got[:64], (f0[EMB][:64] + f1[EMB][:64]) / 2)
    torch.testing.assert_close(got[64], f0[EMB][64])  # <|im_start|>: only ft0 has it
    torch.testing.assert_close(got[65], (f0[EMB][65] + f1[EMB][65]) / 2)  # <|im_end|>: both
    torch.testing.assert_close(got[66], f1[EMB][64])  # zz: only ft1


def test_union_default_is_mergekit_tokenizer_block(zoo, tmp_path):
    from mergesmith.recipe import Recipe

    assert Recipe.model_validate({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {}}).tokenizer_donor == "union"


def test_union_with_chunked_rows_equals_whole(zoo):
    """Element-wise methods stream embeddings in row chunks: the union rows must not depend on the chunking
    (a chunk of 7 rows cuts through the appended tokens)."""
    from mergesmith.run import plan_recipe

    plan = plan_recipe({"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
                        "models": [{"model": str(zoo["ft0"])}, {"model": str(zoo["ft1"])}],
                        "tokenizer_source": "union", "dtype": "float32"})
    assert _whole_equals_chunked(plan, 7) == (67, 32)
    assert "model.embed_tokens.weight  [67, 32] float32" in plan.describe()
    assert plan.describe().count("re-indexed to the output vocabulary") == 2


def test_explicit_base_tokenizer_aligns_other_vocabularies(zoo, tmp_path):
    """tokenizer_source: base with inputs of other vocabulary sizes: rows re-indexed to the base tokenizer
    (mergekit), not the vocabulary-size error that a recipe without tokenizer_source gets."""
    rec = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
           "models": [{"model": str(zoo["ft0"]), "parameters": {"weight": 0.3}},
                      {"model": str(zoo["ft1"]), "parameters": {"weight": 0.5}}], "dtype": "float32"}
    with pytest.raises(MergeError, match="vocabulary size mismatch"):
        run_recipe(rec, tmp_path / "x")
    out = tmp_path / "o"
    run_recipe({**rec, "tokenizer_source": "base"}, out)
    b, f0, f1, got = (load_state(p) for p in (zoo["base"], zoo["ft0"], zoo["ft1"], out))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    for name in (EMB, HEAD):
        torch.testing.assert_close(got[name], b[name] + 0.3 * (f0[name][:64] - b[name]) + 0.5 * (f1[name][:64] - b[name]))
    assert (out / "tokenizer.json").exists()


def test_pad_to_multiple_of_rows_are_each_inputs_mean_row(zoo, tmp_path):
    """tokenizer.pad_to_multiple_of: rows up to a multiple; each input's padding row is the mean of its
    aligned token rows (mergekit), then merged like any row. Chunking does not change it."""
    from mergesmith.run import plan_recipe

    out = _merge(zoo, tmp_path, tokenizer={"source": "union", "pad_to_multiple_of": 8}, tokenizer_source=None)
    got = load_state(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    (tmp_path / "plain").mkdir()
    plain = load_state(_merge(zoo, tmp_path / "plain"))
    b, f0, f1 = (load_state(zoo[k]) for k in ("base", "ft0", "ft1"))
    for name in (EMB, HEAD):
        assert got[name].shape == (72, 32)
        torch.testing.assert_close(got[name][:67], plain[name])
        # the aligned inputs, rebuilt from the merged rows' definition: base lacks zz, im_start, im_end
        B = torch.cat([b[name], f1[name][64:65], f0[name][64:65], ((f0[name][65] + f1[name][65]) / 2)[None]])
        F0 = torch.cat([f0[name][:64], f1[name][64:65], f0[name][64:66]])
        F1 = torch.cat([f1[name][:64], f1[name][64:65], f0[name][64:65], f1[name][65:66]])
        mb, m0, m1 = B.double().mean(0).float(), F0.double().mean(0).float(), F1.double().mean(0).float()
        want = mb + 0.3 * (m0 - mb) + 0.5 * (m1 - mb)
        for k in range(67, 72):
            torch.testing.assert_close(got[name][k], want)
    plan = plan_recipe({"merge_method": "linear", "models": [{"model": str(zoo["ft0"])}, {"model": str(zoo["ft1"])}],
                        "tokenizer": {"pad_to_multiple_of": 16}, "dtype": "float32"})
    assert _whole_equals_chunked(plan, 5) == (80, 32)
    with pytest.raises(MergeError, match="pad_to_multiple_of must be a whole number"):
        plan_recipe({"merge_method": "linear", "models": [{"model": str(zoo["ft0"])}], "tokenizer": {"pad_to_multiple_of": 0}})
    with pytest.raises(MergeError, match="unknown key"):
        plan_recipe({"merge_method": "linear", "models": [{"model": str(zoo["ft0"])}], "tokenizer": {"pad": 8}})


def test_per_token_sources(zoo, tmp_path):
    """tokenizer.tokens (mergekit's TokenEmbeddingConfig): a model's row for the inputs lacking the token, a
    fixed row of one model (model_token, forced on every input), zeros; a token no input has is added."""
    tokens = {
        "<|im_end|>": {"source": str(zoo["ft1"])},
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(zoo["ft0"]), "token": "</s>"}, "force": True},
        "zz": {"source": {"kind": "zero"}},
        "<extra>": {"source": {"kind": "model_token", "model": str(zoo["base"]), "token_id": 5}},
    }
    out = _merge(zoo, tmp_path, tokenizer={"source": "union", "tokens": tokens}, tokenizer_source=None)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 68 and vocab["<extra>"] == 67
    b, f0, f1, got = (load_state(p) for p in (zoo["base"], zoo["ft0"], zoo["ft1"], out))
    for name in (EMB, HEAD):
        B, F0, F1, G = b[name], f0[name], f1[name], got[name]
        torch.testing.assert_close(G[66], F1[65] + 0.3 * (F0[65] - F1[65]))  # base takes ft1's row
        torch.testing.assert_close(G[65], F0[2])  # forced: every input takes ft0's </s> row
        torch.testing.assert_close(G[64], 0.5 * F1[64])  # zz: zeros for base and ft0
        torch.testing.assert_close(G[67], B[5])  # added token: base's row 5 everywhere
    bad = [({"<|im_end|>": {"source": str(zoo["base"])}}, "has no token"),
           ({"zz": {"source": {"kind": "model_token", "model": str(zoo["ft0"]), "token": "nope"}}}, "has no token 'nope'"),
           ({"zz": {"source": {"kind": "model_token", "model": str(zoo["ft0"])}}}, "token_id: N instead of token"),
           ({"zz": {"force": True}}, "give `source`")]
    (tmp_path / "bad").mkdir()
    for settings, match in bad:
        with pytest.raises(MergeError, match=match):
            _merge(zoo, tmp_path / "bad", tokenizer={"source": "union", "tokens": settings}, tokenizer_source=None)


def test_padded_embeddings_keep_their_rows(tmp_path):
    """Embeddings with padding rows past the vocabulary (Qwen2.5: 152064 rows, 151665 tokens) keep the base's
    row count: the padding rows are each input's own, or its mean aligned row where it has none. With inputs
    of one tokenizer the union merge equals the plain merge (mergekit cuts the rows to the vocabulary)."""
    for name, rows in (("base", 72), ("ft0", 72), ("ft1", 64)):
        build_model("llama", {"base": 0, "ft0": 1, "ft1": 2}[name], vocab_size=rows).save_pretrained(tmp_path / name)
        _save_tokenizer(tmp_path / name)
    rec = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "ft0"), "parameters": {"weight": 0.5}}], "dtype": "float32"}
    run_recipe(rec, tmp_path / "plain")
    run_recipe({**rec, "tokenizer_source": "union"}, tmp_path / "union")
    plain, union = load_state(tmp_path / "plain"), load_state(tmp_path / "union")
    assert json.loads((tmp_path / "union" / "config.json").read_text())["vocab_size"] == 72
    assert all(torch.equal(plain[k], union[k]) for k in plain)
    rec["models"].append({"model": str(tmp_path / "ft1"), "parameters": {"weight": 0.25}})
    run_recipe({**rec, "tokenizer_source": "union"}, tmp_path / "three")
    b, f0, f1, got = (load_state(tmp_path / k) for k in ("base", "ft0", "ft1", "three"))
    for name in (EMB, HEAD):
        mean1 = f1[name].double().mean(0).float()  # ft1 has no rows 64..71: its mean row stands in
        want = b[name][64:] + 0.5 * (f0[name][64:] - b[name][64:]) + 0.25 * (mean1 - b[name][64:])
        torch.testing.assert_close(got[name][64:], want)


def test_union_in_a_frankenmerge(zoo, tmp_path):
    """Slices with a union vocabulary: the embedding comes from the first slice's sources and the head from
    the last's, each re-indexed (a token none of its sources has gets zeros, as in mergekit)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_recipe({"merge_method": "passthrough", "tokenizer_source": "union", "dtype": "float32",
                "slices": [{"sources": [{"model": str(zoo["base"]), "layer_range": [0, 2]}]},
                           {"sources": [{"model": str(zoo["ft1"]), "layer_range": [1, 3]}]}]}, out)
    b, f1, got = load_state(zoo["base"]), load_state(zoo["ft1"]), load_state(out)
    assert got[EMB].shape == (66, 32) and json.loads((out / "config.json").read_text())["vocab_size"] == 66
    torch.testing.assert_close(got[EMB][:64], b[EMB])
    assert not got[EMB][64:].any()  # zz and <|im_end|>: not in the base, the first slice's only source
    torch.testing.assert_close(got[HEAD], f1[HEAD])  # ft1 has every token of the union of base and ft1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and model(torch.tensor([[1, 64, 65]])).logits.shape == (1, 3, 66)


def test_union_errors(zoo, tmp_path):
    bare = tmp_path / "bare"
    build_model("llama", 3).save_pretrained(bare)  # no tokenizer files
    with pytest.raises(MergeError, match="cannot load the tokenizer"):  # the base (first model) needs one
        run_recipe({"merge_method": "linear", "models": [{"model": str(bare)}, {"model": str(zoo["base"])}],
                    "tokenizer_source": "union"}, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def _save_vocab(folder, tokens, bpe_merges=None, added=()):
    """A tokenizer with exactly ``tokens`` at ids 0.. (WordLevel, or BPE with ``bpe_merges``) + ``added``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=bpe_merges, unk_token="<unk>") if bpe_merges is not None \
        else models.WordLevel(vocab=vocab, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if added:
        fast.add_tokens([AddedToken(t, special=True) for t in added])
    fast.save_pretrained(folder)


def test_base_tokenizer_reindexes_same_size_vocabularies_with_other_ids(tmp_path):
    """tokenizer_source: base with inputs of one vocabulary size whose tokenizers put tokens at other ids (a
    fine-tune that renamed a reserved token): rows re-indexed by token string, as mergekit does whenever a
    tokenizer source is given. Equal tokenizer files (a different chat template only) re-index nothing."""
    from mergesmith.run import plan_recipe

    words = ["<unk>"] + [f"w{i}" for i in range(1, 63)]
    for name, seed, last in (("base", 0, "<reserved_0>"), ("ft", 1, "<|im_start|>"), ("same", 2, "<reserved_0>")):
        build_model("llama", seed, vocab_size=64).save_pretrained(tmp_path / name)
        order = words[:1] + words[1:][::-1] if name == "ft" else words  # ft: w1..w62 at reversed ids
        _save_vocab(tmp_path / name, order + [last])
    cfg = json.loads((tmp_path / "same" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (tmp_path / "same" / "tokenizer_config.json").write_text(json.dumps(cfg))
    rec = {"merge_method": "linear", "base_model": str(tmp_path / "base"), "dtype": "float32",
           "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "ft")}], "tokenizer_source": "base"}
    plan = plan_recipe(rec)
    assert {j.out_name for j in plan.jobs if j.align is not None} == {EMB, HEAD}
    run_recipe(rec, tmp_path / "out")
    b, f, got = (load_state(tmp_path / k) for k in ("base", "ft", "out"))
    for name in (EMB, HEAD):
        torch.testing.assert_close(got[name][0], (b[name][0] + f[name][0]) / 2)
        torch.testing.assert_close(got[name][1:63], (b[name][1:63] + f[name][1:63].flip(0)) / 2)
        torch.testing.assert_close(got[name][63], b[name][63])  # <reserved_0>: only the base has it
    same = plan_recipe({**rec, "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "same")}]})
    assert all(j.align is None for j in same.jobs)


def test_base_tokenizer_tokens_past_vocab_size_are_stripped(tmp_path):
    """A base tokenizer with tokens at ids >= its vocab_size (no embedding rows): mergekit strips them from a
    fast BPE tokenizer (the tokens, added tokens and merges using them) instead of failing; other kinds are
    a clear error."""
    from transformers import AutoTokenizer

    from mergesmith.run import plan_recipe

    letters = ["<unk>", "a", "b", "ab"] + [f"w{i}" for i in range(4, 64)]
    build_model("llama", 0, vocab_size=64).save_pretrained(tmp_path / "base")
    _save_vocab(tmp_path / "base", letters + ["ba"], bpe_merges=[("a", "b"), ("b", "a")], added=("<x>",))
    build_model("llama", 1, vocab_size=64).save_pretrained(tmp_path / "ft")
    _save_vocab(tmp_path / "ft", letters, bpe_merges=[("a", "b")])
    rec = {"merge_method": "linear", "base_model": str(tmp_path / "base"), "dtype": "float32",
           "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "ft")}], "tokenizer_source": "union"}
    plan = plan_recipe(rec)
    assert any("dropped from the output tokenizer" in w for w in plan.warnings)
    run_recipe(rec, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok.get_vocab()) == 64 and "ba" not in tok.get_vocab() and "<x>" not in tok.get_vocab()
    assert tok.tokenize("ab ba") == ["ab", "b", "a"]
    b, f, got = (load_state(tmp_path / k) for k in ("base", "ft", "out"))
    torch.testing.assert_close(got[EMB], (b[EMB] + f[EMB]) / 2)
    _save_vocab(tmp_path / "base", letters + ["ba"])  # WordLevel: nothing mergekit strips either
    with pytest.raises(MergeError, match="supported for BPE tokenizers only"):
        plan_recipe(rec)


def test_union_input_without_tokenizer_files_takes_the_base_vocabulary(zoo, tmp_path):
    """An input without tokenizer files in a union merge: its vocabulary is taken to be the base's (mergekit's
    "Assuming same as base"), with a warning; the base itself must have one."""
    from mergesmith.run import plan_recipe

    bare = tmp_path / "bare"
    build_model("llama", 3).save_pretrained(bare)  # 64 rows, like the base
    plan = plan_recipe({"merge_method": "linear", "base_model": str(zoo["base"]), "dtype": "float32",
                        "models": [{"model": str(zoo["ft0"])}, {"model": str(bare)}], "tokenizer_source": "union"})
    assert any("no tokenizer files" in w and "bare" in w for w in plan.warnings)
    run_recipe({"merge_method": "linear", "base_model": str(zoo["base"]), "dtype": "float32",
                "models": [{"model": str(zoo["ft0"])}, {"model": str(bare)}], "tokenizer_source": "union"},
               tmp_path / "out")
    b, f0, br, got = load_state(zoo["base"]), load_state(zoo["ft0"]), load_state(bare), load_state(tmp_path / "out")
    assert got[EMB].shape == (66, 32)  # linear averages the listed base too (as mergekit)
    torch.testing.assert_close(got[EMB][:64], (b[EMB] + f0[EMB][:64] + br[EMB]) / 3)
    torch.testing.assert_close(got[EMB][64:], f0[EMB][64:])  # only ft0 has them: its rows for all


def test_lora_adapter_that_added_tokens_brings_its_vocabulary(zoo, tmp_path):
    """`base+adapter` where training added tokens: the adapter folder holds the tokenizer (+2 tokens) and full
    resized embed_tokens / lm_head (modules_to_save). That input's vocabulary is the adapter's (its tokenizer,
    vocab_size from the resized rows), so a union merge gives the new tokens their rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesmith.io.checkpoint import open_checkpoint

    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    model.resize_token_embeddings(66)
    model.config.vocab_size = 66
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.save_pretrained(adapter)
    ck = open_checkpoint(f"{zoo['base']}+{adapter}")
    assert ck.meta(EMB).shape[0] == 66 and ck.config["vocab_size"] == 66 and ck.folder == adapter
    out = tmp_path / "out"
    run_recipe({"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                "models": [{"model": str(zoo["base"])}, {"model": f"{zoo['base']}+{adapter}"}]}, out)
    b, got = load_state(zoo["base"]), load_state(out)
    emb = ck.get(EMB)
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    torch.testing.assert_close(emb, saved["base_model.model.model.embed_tokens.modules_to_save.weight"])  # the trained copy
    assert got[EMB].shape == (66, 32) and len(AutoTokenizer.from_pretrained(out).get_vocab()) == 66
    torch.testing.assert_close(got[EMB][:64], (b[EMB] + emb[:64]) / 2)
    torch.testing.assert_close(got[EMB][64:], emb[64:])  # only the adapter has them: its rows for both
