"""Evaluation windows that begin with BOS: the BOS is context, never a target; no text is skipped."""
from __future__ import annotations

import pytest
import torch

from mpq.analysis.eval import compare, perplexity
from mpq.errors import CalibrationError
from tests.analysis.test_eval import VOCAB, tiny_llama

BOS = 1


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, VOCAB, (50,), generator=torch.Generator().manual_seed(0))


def nll_after_bos(model, ids, p: int, start: int) -> float:
    """NLL of ids[p] given BOS + ids[start:p]."""
    context = torch.cat([torch.tensor([BOS]), ids[start:p]])
    with torch.no_grad():
        logits = model(input_ids=context[None]).logits[0, -1]
    return torch.nn.functional.cross_entropy(logits[None].float(), ids[p:p + 1]).item()


def record_inputs(model) -> tuple[list, object]:
    seen: list = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
        with_kwargs=True)
    return seen, handle


def test_non_overlapping_windows_begin_with_bos_and_score_every_text_token(model, ids):
    seen, handle = record_inputs(model)
    try:
        r = perplexity(model, ids, window=10, bos_id=BOS)
    finally:
        handle.remove()
    # windows of BOS + 9 text tokens: 50 // 9 = 5, each scoring its 9 text tokens
    assert (r.windows, r.tokens_scored) == (5, 45)
    assert seen == [[BOS] + ids[k * 9:(k + 1) * 9].tolist() for k in range(5)]
    nlls = [nll_after_bos(model, ids, p, (p // 9) * 9) for p in range(45)]
    assert r.nll_mean == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert r.ppl != pytest.approx(perplexity(model, ids, window=10).ppl, rel=1e-3)


def test_sliding_windows_with_bos_score_each_text_token_once(model, ids):
    window, stride, body = 8, 3, 7
    seen, handle = record_inputs(model)
    try:
        r = perplexity(model, ids, window=window, stride=stride, bos_id=BOS)
    finally:
        handle.remove()
    assert r.windows == len(range(0, 50 - body + 1, stride)) == 15
    assert r.tokens_scored == body + 14 * stride == 49  # text tokens 0..48, the first included
    assert all(len(w) == window and w[0] == BOS for w in seen)
    nlls = []
    for p in range(49):
        k = 0 if p < body else -(-(p - body + 1) // stride)  # window that scores p first
        nlls.append(nll_after_bos(model, ids, p, k * stride))
    assert r.nll_mean == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_compare_with_bos_scores_the_same_tokens(model, ids):
    other = tiny_llama(5)
    seen, handle = record_inputs(other)
    try:
        r = compare(other, model, ids, window=10, bos_id=BOS)
    finally:
        handle.remove()
    assert r.tokens == 45 and all(w[0] == BOS for w in seen) and len(seen) == 5
    assert r.ref_ppl == pytest.approx(perplexity(model, ids, window=10, bos_id=BOS).ppl)
    assert r.ppl == pytest.approx(perplexity(other, ids, window=10, bos_id=BOS).ppl)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 8, "stride": 8}, r"stride must be an integer in 1..window - 1 = 7 \(the window "
                                 r"holds a BOS\), got 8"),
    ({"window": 52}, r"50 tokens, fewer than one window of 52 \(BOS \+ 51 text tokens\)"),
])
def test_bad_arguments_with_bos(model, ids, kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        perplexity(model, ids, bos_id=BOS, **kwargs)
    assert perplexity(model, ids, window=51, bos_id=BOS).windows == 1  # 50 text tokens fit
