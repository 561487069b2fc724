"""Perplexity and model comparison on tiny random Llama models built in-process."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mpq.errors import CalibrationError, ModelError
from mpq.analysis.eval import compare, load_eval_ids, perplexity

VOCAB = 48


def tiny_llama(seed: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(0))


def manual_nll(model, ids, p: int, start: int) -> float:
    """NLL of ids[p] given ids[start:p], one forward pass per token."""
    with torch.no_grad():
        logits = model(input_ids=ids[None, start:p]).logits[0, -1]
    return F.cross_entropy(logits[None].float(), ids[p:p + 1]).item()


def test_uniform_model_has_perplexity_vocab_size(ids):
    uniform = tiny_llama(1)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    r = perplexity(uniform, ids, window=8)
    assert r.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert r.nll_mean == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert (r.windows, r.tokens_scored) == (6, 6 * 7)  # 50 // 8 full windows, tail dropped
    bucket = r.by_position[0].to_dict()
    assert r.to_dict() == {"ppl": r.ppl, "nll_mean": r.nll_mean, "tokens_scored": 42, "windows": 6,
                           "by_position": [bucket]}
    assert (bucket["start"], bucket["end"], bucket["tokens"]) == (0, 512, 42)


def test_non_overlapping_matches_manual_and_num_windows(model, ids):
    r = perplexity(model, ids[None], window=10, num_windows=3)  # [1, T] is accepted too
    assert (r.windows, r.tokens_scored) == (3, 27)
    nlls = [manual_nll(model, ids, p, (p // 10) * 10) for p in range(30) if p % 10]
    assert r.nll_mean == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_stride_scores_each_token_once_with_sliding_context(model, ids):
    window, stride = 8, 3
    r = perplexity(model, ids, window=window, stride=stride)
    assert r.windows == len(range(0, 50 - window + 1, stride)) == 15
    assert r.tokens_scored == (window - 1) + 14 * stride == 49  # every token but the first
    nlls = []
    for p in range(1, 50):
        k = 0 if p < window else -(-(p - window + 1) // stride)  # window that scores p first
        nlls.append(manual_nll(model, ids, p, k * stride))
    assert r.nll_mean == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_progress_and_training_flag_restored(model, ids):
    calls = []
    model.train()
    perplexity(model, ids, window=16, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert model.training
    model.eval()


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 64}, "fewer than one window of 64"),
    ({"window": 8, "stride": 9}, "stride must be an integer in 1..window=8"),
    ({"window": 1}, "window must be an integer >= 2"),
    ({"window": 8, "num_windows": 0}, "num_windows must be a positive integer"),
])
def test_bad_arguments(model, ids, kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        perplexity(model, ids, **kwargs)


def test_compare_with_itself(model, ids):
    r = compare(model, model, ids, window=10)
    assert abs(r.kl_mean) < 1e-7 and r.top1_agreement == 1.0
    assert r.tokens == 5 * 9
    assert r.ppl == pytest.approx(r.ref_ppl) == pytest.approx(perplexity(model, ids, window=10).ppl)
    assert set(r.to_dict()) == {"kl_mean", "top1_agreement", "ppl", "ref_ppl", "tokens",
                                "by_position"}


def test_compare_against_other_models(model, ids):
    other = compare(tiny_llama(2), model, ids, window=10, num_windows=2)
    assert other.kl_mean > 1e-4 and other.tokens == 18 and 0.0 <= other.top1_agreement <= 1.0
    assert other.ref_ppl == pytest.approx(perplexity(model, ids, window=10, num_windows=2).ppl)

    uniform = tiny_llama(3)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    r = compare(uniform, model, ids, window=10, num_windows=2)
    # KL(P || uniform) = log V - H(P) for each position
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(model(input_ids=ids[None, s:s + 10]).logits[0, :-1], -1)
                          for s in (0, 10)])
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert r.kl_mean == pytest.approx(math.log(VOCAB) - entropy, rel=1e-5)
    assert r.ppl == pytest.approx(VOCAB, rel=1e-6)


def test_compare_vocab_mismatch(model, ids):
    with pytest.raises(ModelError, match="vocabulary size: 64 vs 48"):
        compare(tiny_llama(4, vocab=64), model, ids, window=10)


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


def test_load_eval_ids(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("a b\n\nb a a\n", encoding="utf-8")
    ids = load_eval_ids(path, word_tokenizer())
    assert ids.dtype == torch.long and ids.tolist() == [1, 2, 2, 1, 1]


@pytest.mark.parametrize("content, match", [(None, "does not exist"), (b" \n\n", "contains no text"),
                                            (b"a \xff", "not valid UTF-8: byte 0xff at byte offset 2")])
def test_load_eval_ids_bad_files(tmp_path, content, match):
    path = tmp_path / "eval.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match=match):
        load_eval_ids(path, word_tokenizer())
