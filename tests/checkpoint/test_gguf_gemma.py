"""``--format gguf`` for the Gemma family (llama.cpp's ``gemma`` and ``gemma2``): metadata, norms
stored as 1 + w, no Q/K permutation, the tied head, the SentencePiece-style tokenizer (llama.cpp's
``llama`` tokenizer model) and what llama.cpp's graph cannot express, refused before any work."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.checkpoint.gguf_writer import GGUF_FILE
from mpq.checkpoint.state import state_from_artifact
from mpq.errors import FormatError
from tests.checkpoint.test_gguf_writer import field, reader
from tests.helpers import gemma_dir, run_cli, spm_tokenizer

gguf = pytest.importorskip("gguf")

RECIPE = """mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*(q_proj|k_proj|v_proj)"]
    weights: {format: q8_0}
  - targets: ["re:.*(o_proj|gate_proj|up_proj|down_proj)"]
    weights: {format: q4_0}
  - targets: [model.embed_tokens, lm_head]
    weights: {format: q8_0}
"""


# llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim) (16 here): the tiny config's default
# query_pre_attn_scalar (256) is refused, so the written model sets it to head_dim
WRITABLE = {"gemma": {}, "gemma2": {"query_pre_attn_scalar": 16}}


@pytest.fixture(scope="module", params=list(WRITABLE))
def written(request, tmp_path_factory):
    """(arch, source, native artifact, gguf folder written by ``mpq convert``)."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"gguf-{arch}")
    src = gemma_dir(tmp / "src", arch, **WRITABLE[arch])
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE)
    art, out = tmp / "native", tmp / "gguf"
    result = run_cli("quantize", src, "--recipe", recipe, "-o", art)
    assert result.exit_code == 0, result.output
    result = run_cli("convert", art, "-o", out, "--format", "gguf")
    assert result.exit_code == 0, result.output
    return arch, src, art, out


def test_metadata_and_tensor_names(written):
    arch, src, _, out = written
    r = reader(out)
    config = json.loads((src / "config.json").read_text())
    assert field(r, "general.architecture") == arch
    assert field(r, f"{arch}.attention.key_length") == config["head_dim"] == 16
    assert field(r, f"{arch}.attention.value_length") == 16
    assert field(r, f"{arch}.embedding_length") == 64  # head_dim × heads is 64 here too
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # llama.cpp reads the head from token_embd
    block = {n.split(".", 2)[2] for n in names if n.startswith("blk.1.")}
    norms = {"attn_norm.weight", "ffn_norm.weight"}
    if arch == "gemma2":
        norms |= {"post_attention_norm.weight", "post_ffw_norm.weight"}
        assert field(r, "gemma2.attn_logit_softcapping") == pytest.approx(50.0)
        assert field(r, "gemma2.final_logit_softcapping") == pytest.approx(30.0)
        assert field(r, "gemma2.attention.sliding_window") == 4096
    else:
        assert "gemma.attn_logit_softcapping" not in r.fields
    assert block == norms | {f"{n}.weight" for n in ("attn_q", "attn_k", "attn_v",
                                                      "attn_output", "ffn_gate", "ffn_up",
                                                      "ffn_down")}


def test_norms_are_one_plus_w_and_q_k_rows_stay(written):
    """Every ``*norm.weight`` is stored as float32(1 + w) (llama.cpp multiplies by the weight),
    and q/k are not permuted (NEOX RoPE): their blocks dequantize to mpq's weights as they
    are."""
    arch, _, art, out = written
    state = state_from_artifact(art)
    tensors = {t.name: t for t in reader(out).tensors}
    norms = [n for n in state.dense if n.endswith("norm.weight")]
    assert len(norms) == {"gemma": 5, "gemma2": 9}[arch]
    for name in norms:
        if name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, block, hf = name.split(".")[:4]
            gname = f"blk.{block}.{NORM_NAMES[arch][hf]}.weight"
        expect = state.dense[name].to(torch.float32) + 1.0
        assert tensors[gname].tensor_type.name == "F32"
        assert tensors[gname].data.tobytes() == expect.numpy().tobytes(), name
    for short, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        t = tensors[f"blk.0.{gname}.weight"]
        ours = state.qweights[f"model.layers.0.self_attn.{short}"].dequantize()
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        assert theirs.tobytes() == ours.numpy().tobytes()


# llama.cpp's names of the block norms (its loader: attn_norm, ffn_norm, attn_post_norm,
# ffn_post_norm)
NORM_NAMES = {"gemma": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"},
              "gemma2": {"input_layernorm": "attn_norm",
                         "post_attention_layernorm": "post_attention_norm",
                         "pre_feedforward_layernorm": "ffn_norm",
                         "post_feedforward_layernorm": "post_ffw_norm"}}


def test_transformers_runs_the_gemma2_gguf_like_the_native_artifact(written):
    """transformers' GGUF loader (which subtracts the 1 again) gives the native artifact's
    logits.  It does not read Gemma 2's query scale from the file (it keeps its default 256), so
    it is told llama.cpp's: head_dim."""
    from transformers import AutoModelForCausalLM

    from mpq.loader import load

    arch, _, art, out = written
    if arch != "gemma2":
        pytest.skip("transformers' GGUF loader has no gemma architecture")
    ours = load(art, dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=GGUF_FILE,
                                                  dtype=torch.float32,
                                                  query_pre_attn_scalar=16).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())


def spm_merge(pieces: list[str], scores: dict[str, float]) -> list[str]:
    """llama.cpp's SentencePiece merge rule: repeatedly merge the adjacent pair whose joined
    text is a token with the highest score (the leftmost on ties)."""
    pieces = list(pieces)
    while True:
        best = None
        for i in range(len(pieces) - 1):
            joined = pieces[i] + pieces[i + 1]
            if joined in scores and (best is None or scores[joined] > best[0]):
                best = (scores[joined], i)
        if best is None:
            return pieces
        i = best[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]


TEXTS = ["ther", "the cat and the rest", "another theme is there", "in an inn, is it"]


def test_spm_tokenizer_read_back(written):
    """Tokens and types are gguf.vocab.LlamaHfVocab's; the scores make llama.cpp's merge rule
    tokenize like the tokenizer itself (LlamaHfVocab's placeholder scores, all equal, do not);
    special ids, add-BOS, add_space_prefix and the chat template are the tokenizer's."""
    _, src, _, out = written
    r = reader(out)
    tok = spm_tokenizer()
    vocab = gguf.LlamaHfVocab(src)
    theirs = list(vocab.all_tokens())
    assert field(r, "tokenizer.ggml.model") == "llama"
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    scores = field(r, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == 256
    assert tokens[:len(theirs)] == [t.decode() for t, _, _ in theirs]
    assert types[:len(theirs)] == [int(k) for _, _, k in theirs]
    assert tokens[len(theirs):] == [f"[PAD{i}]" for i in range(len(theirs), 256)]
    assert set(types[len(theirs):]) == {gguf.TokenType.UNUSED}
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokens.index("<end_of_turn>")] == gguf.TokenType.CONTROL
    by_text = {t: s for t, s, k in zip(tokens, scores, types) if k == gguf.TokenType.NORMAL}
    placeholder = {t.decode(): s for t, s, k in theirs if k == gguf.TokenType.NORMAL}
    assert set(placeholder.values()) == {-1000.0}
    for text in TEXTS:
        expect = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert spm_merge(list(text.replace(" ", "\u2581")), by_text) == expect, text
    assert spm_merge(list("ther"), placeholder) == ["the", "r"]  # not the tokenizer's th|er
    assert field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id == 2
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == 1
    assert field(r, "tokenizer.ggml.unknown_token_id") == tok.unk_token_id == 3
    assert field(r, "tokenizer.ggml.padding_token_id") == 0
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.add_space_prefix") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    assert "tokenizer.ggml.merges" not in r.fields


# config edits llama.cpp's graph cannot express → the problem named in the one error line
REFUSED = [
    ("gemma2", {}, "query_pre_attn_scalar 256 (llama.cpp's gemma2 scales queries by "
                   "1/sqrt(head_dim)"),
    ("gemma2", {"query_pre_attn_scalar": 16, "attn_logit_softcapping": None},
     "attn_logit_softcapping None (llama.cpp's gemma2 always soft-caps attention logits)"),
    ("gemma2", {"query_pre_attn_scalar": 16,
                "layer_types": ["full_attention", "sliding_attention"]},
     "layer_types ['full_attention', 'sliding_attention'] (llama.cpp's gemma2 makes even "
     "layers sliding-window and odd layers global)"),
    ("gemma2", {"query_pre_attn_scalar": 16, "sliding_window": None},
     "sliding_window None (llama.cpp's gemma2 always limits its even layers to a sliding window"),
    ("gemma", {"tie_word_embeddings": False},
     "tie_word_embeddings False (the model has its own output head; llama.cpp's gemma reads "
     "the output head from token_embd)"),
    ("gemma", {"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' (llama.cpp's gemma computes "
                                          "GELU's tanh approximation)"),
    ("gemma3", {}, "model type 'gemma3_text' (format 'gguf' writes gemma, gemma2, llama"),
]


@pytest.mark.parametrize("arch, overrides, expect", REFUSED,
                         ids=[f"{a}-{list(o)[-1] if o else 'default'}" for a, o, _ in REFUSED])
def test_what_llama_cpp_cannot_express_is_refused_before_work(tmp_path, arch, overrides,
                                                              expect):
    src = gemma_dir(tmp_path / "src", arch, **overrides)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    result = run_cli("quantize", src, "--recipe", recipe, "-o", out, "--format", "gguf")
    assert result.exit_code == FormatError.exit_code, result.output
    assert "format 'gguf' cannot express" in result.output
    assert expect in result.output
    assert not out.exists()


def test_a_head_the_plan_unties_is_refused_by_quantize_and_convert(tmp_path):
    """Quantizing only the embedding gives the head a float copy of its own (mpq.config.tying),
    which llama.cpp's gemma2 cannot hold: refused before work, and by convert."""
    src = gemma_dir(tmp_path / "src", "gemma2", query_pre_attn_scalar=16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n"
                      "  - targets: [model.embed_tokens]\n    weights: {format: q8_0}\n")
    expect = ("lm_head: untied from model.embed_tokens by the plan (only model.embed_tokens is "
              "quantized")
    result = run_cli("quantize", src, "--recipe", recipe, "-o", tmp_path / "out", "--format",
                     "gguf")
    assert result.exit_code == FormatError.exit_code, result.output
    assert expect in result.output and "quantize both with one scheme by rtn" in result.output
    assert not (tmp_path / "out").exists()
    result = run_cli("quantize", src, "--recipe", recipe, "-o", tmp_path / "native")
    assert result.exit_code == 0, result.output
    result = run_cli("convert", tmp_path / "native", "-o", tmp_path / "gguf", "--format", "gguf")
    assert result.exit_code == FormatError.exit_code, result.output
    assert expect in result.output
    assert not (tmp_path / "gguf").exists()


def test_a_token_joined_without_a_merge_rule_is_warned_about(tmp_path):
    """llama.cpp's SentencePiece tokenizer merges any pair whose text is a token: a tokenizer
    lacking the rule for one such pair (here t + he → the) may split differently there."""
    src = gemma_dir(tmp_path / "src", "gemma2", query_pre_attn_scalar=16)
    path = src / "tokenizer.json"
    data = json.loads(path.read_text())
    merges = data["model"]["merges"]
    assert ["t", "he"] in merges or "t he" in merges
    data["model"]["merges"] = [m for m in merges if m not in (["t", "he"], "t he")]
    path.write_text(json.dumps(data))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    result = run_cli("quantize", src, "--recipe", recipe, "-o", tmp_path / "out", "--format",
                     "gguf")
    assert result.exit_code == 0, result.output
    assert "tokenizer: 1 token(s) (e.g. 'the') join two vocabulary entries" in " ".join(
        result.output.split())
