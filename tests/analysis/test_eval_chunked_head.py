"""A long window's logits come from the decoder once and the head chunk by chunk
(mpq.analysis.eval._WindowLogits): the scores equal those of one full forward, for every tiny
model family (their logit scaling and soft-capping included)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpq.analysis import eval as evaluation
from tests.tiny_models import (ARCHITECTURES, MOE_ARCHITECTURES, RECORD_ARCHITECTURES,
                               tiny_config, tiny_model)

WINDOW = 100
CHUNK = 16  # the score chunk, lowered so that a tiny model's window spans several


def full_forward_ppl(model, ids: torch.Tensor) -> float:
    """Perplexity over non-overlapping windows from one plain forward per window."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - WINDOW + 1, WINDOW):
            chunk = ids[start:start + WINDOW]
            logits = model(input_ids=chunk.unsqueeze(0), use_cache=False).logits[0]
            nll += F.cross_entropy(logits[:-1].float(), chunk[1:], reduction="sum").item()
            count += WINDOW - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("arch", ARCHITECTURES + RECORD_ARCHITECTURES + MOE_ARCHITECTURES)
def test_chunked_head_scores_equal_one_forward(arch, monkeypatch):
    model = tiny_model(arch).eval()
    ids = torch.randint(0, tiny_config(arch).vocab_size, (3 * WINDOW,),
                        generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evaluation, "SCORE_CHUNK", CHUNK)
    assert evaluation._decoder_of(model) is not None  # the chunked path is the one tested
    heads = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: heads.append(out.shape[-2]))
    result = evaluation.perplexity(model, ids, window=WINDOW)
    hook.remove()
    assert max(heads) <= CHUNK  # the head never ran on the whole window
    assert result.ppl == pytest.approx(full_forward_ppl(model, ids), rel=1e-5)


def test_compare_chunked_equals_self_zero_kl(monkeypatch):
    model = tiny_model(ARCHITECTURES[0]).eval()
    ids = torch.randint(0, tiny_config(ARCHITECTURES[0]).vocab_size, (2 * WINDOW,),
                        generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(evaluation, "SCORE_CHUNK", CHUNK)
    result = evaluation.compare(model, model, ids, window=WINDOW)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.ppl == pytest.approx(full_forward_ppl(model, ids), rel=1e-5)


def test_model_without_logits_to_keep_gets_full_logits(monkeypatch):
    model = tiny_model(ARCHITECTURES[0]).eval()

    class Plain(torch.nn.Module):  # forward without logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    plain = Plain()
    assert evaluation._decoder_of(plain) is None
    ids = torch.randint(0, tiny_config(ARCHITECTURES[0]).vocab_size, (2 * WINDOW,),
                        generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(evaluation, "SCORE_CHUNK", CHUNK)
    assert evaluation.perplexity(plain, ids, window=WINDOW).ppl == pytest.approx(
        full_forward_ppl(model, ids), rel=1e-5)
