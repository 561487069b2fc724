"""Per-position buckets of perplexity and compare: they add up to the totals, and each token
lands in the bucket of its text position in its window."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from mpq.analysis.eval import compare, perplexity, position_buckets
from tests.tiny_models import model_from_config

VOCAB = 64


def long_llama(seed: int):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return model_from_config(config, seed)


@pytest.fixture(scope="module")
def model():
    return long_llama(0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (5000,), generator=torch.Generator().manual_seed(1))


def test_position_buckets_reached_by_the_window():
    assert position_buckets(100) == [(0, 512)]
    assert position_buckets(512) == [(0, 512)]
    assert position_buckets(513) == [(0, 512), (512, 2048)]
    assert position_buckets(8192) == [(0, 512), (512, 2048), (2048, 4096), (4096, 8192)]
    assert position_buckets(20000)[-2:] == [(8192, 16384), (16384, 32768)]
    assert position_buckets(7, edges=(0, 2, 5)) == [(0, 2), (2, 5), (5, 10)]


@pytest.mark.parametrize("kwargs", [
    {"window": 2500},                               # three buckets, one window
    {"window": 2200, "stride": 1000},               # sliding: later windows score the tail only
    {"window": 2200, "bos_id": 3},                  # text positions start after the BOS
])
def test_bucket_sums_equal_the_totals(model, ids, kwargs):
    r = perplexity(model, ids, **kwargs)
    assert [(b.start, b.end) for b in r.by_position] == [(0, 512), (512, 2048), (2048, 4096)]
    assert sum(b.tokens for b in r.by_position) == r.tokens_scored
    nll = sum(b.nll_mean * b.tokens for b in r.by_position)
    assert nll == pytest.approx(r.nll_mean * r.tokens_scored, rel=1e-9)
    for b in r.by_position:
        assert b.ppl == pytest.approx(math.exp(b.nll_mean))


def test_sliding_windows_fill_the_late_buckets(model, ids):
    r = perplexity(model, ids, window=2200, stride=1000)
    tokens = {b.start: b.tokens for b in r.by_position}
    # first window: text positions 1..2199; each later one 1000 tokens at positions 1200..2199
    later = r.windows - 1
    assert tokens == {0: 511, 512: 1536 + later * (2048 - 1200), 2048: 152 + later * 152}


def test_tokens_land_in_the_bucket_of_their_text_position(model, ids):
    """A window of BOS + 7 text tokens, buckets [0, 2), [2, 5), [5, 10): each token by hand."""
    bos = 5
    r = perplexity(model, ids, window=8, num_windows=3, bos_id=bos, edges=(0, 2, 5))
    sums = {0: [], 2: [], 5: []}
    with torch.no_grad():
        for k in range(3):
            window = torch.cat([torch.tensor([bos]), ids[k * 7:(k + 1) * 7]])
            logits = model(input_ids=window[None]).logits[0]
            for p in range(1, 8):  # window index p = text position p - 1
                nll = F.cross_entropy(logits[p - 1:p], window[p:p + 1]).item()
                sums[max(s for s in sums if s <= p - 1)].append(nll)
    assert [(b.start, b.end, b.tokens) for b in r.by_position] == [(0, 2, 6), (2, 5, 9),
                                                                     (5, 10, 6)]
    for b in r.by_position:
        assert b.nll_mean == pytest.approx(sum(sums[b.start]) / len(sums[b.start]), rel=1e-5)


def test_without_bos_the_first_bucket_lacks_position_zero(model, ids):
    r = perplexity(model, ids, window=6, num_windows=2, edges=(0, 1, 3))
    assert [(b.start, b.tokens) for b in r.by_position] == [(1, 4), (3, 6)]


def test_compare_buckets_add_up(model, ids):
    other = long_llama(1)
    r = compare(other, model, ids, window=2100, num_windows=2)
    assert [(b.start, b.tokens) for b in r.by_position] == [(0, 1022), (512, 3072), (2048, 104)]
    n = r.tokens
    assert sum(b.tokens for b in r.by_position) == n
    assert sum(b.kl_mean * b.tokens for b in r.by_position) == pytest.approx(r.kl_mean * n)
    assert sum(b.top1_agreement * b.tokens for b in r.by_position) == pytest.approx(
        r.top1_agreement * n)
    for key, total in (("ppl", r.ppl), ("ref_ppl", r.ref_ppl)):
        nll = sum(math.log(getattr(b, key)) * b.tokens for b in r.by_position)
        assert nll == pytest.approx(math.log(total) * n, rel=1e-9)
    assert all(b.kl_mean > 0 for b in r.by_position)
    assert set(r.to_dict()["by_position"][0]) == {"start", "end", "tokens", "nll_mean", "ppl",
                                                  "kl_mean", "top1_agreement", "ref_ppl"}
    assert set(perplexity(model, ids, window=600).to_dict()["by_position"][1]) == {
        "start", "end", "tokens", "nll_mean", "ppl"}
