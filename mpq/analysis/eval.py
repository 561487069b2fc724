"""Evaluation of causal LMs on a token stream: perplexity and divergence from a reference model.

Windows without BOS (``bos_id`` None): window k covers ids[k*stride : k*stride + window]; only
full windows are used (the tail shorter than ``window`` is dropped) and ``num_windows`` keeps the
first ones.  Within a window the token at position p is scored from the tokens before it in the
same window, so the first token of a window is never scored.

- Non-overlapping (``stride == window``, the default): each window scores ``window - 1`` tokens.
- Sliding (``stride < window``): the first window scores ``window - 1`` tokens, each later one only
  the ``stride`` tokens that the previous window did not score (each with >= window-stride tokens of
  context).

Windows with BOS (``bos_id`` set; mpq.calibration.conventions: where the model's tokenizer adds
one, as lm-eval's rolling windows and llama.cpp's perplexity do): window k is the BOS followed by
the ``window - 1`` text tokens ids[k*stride : k*stride + window - 1] (``stride`` at most
``window - 1``, the default ``window - 1``).  The BOS is never a target: its position predicts the
window's first text token, so non-overlapping windows score every text token they hold
(``window - 1``), the text is scored without gaps, and sliding windows score, after the first, the
``stride`` text tokens the previous window did not.

Perplexity = exp(mean NLL over all scored tokens).  Models run in eval mode under
``torch.inference_mode()`` with batch size 1 and ``use_cache=False``; their train/eval mode is
restored afterwards.  NLL and KL sums are accumulated in float64.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from mpq.calibration.sources import read_text_file
from mpq.errors import CalibrationError, ModelError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PerplexityResult:
    """exp(nll_mean) over ``tokens_scored`` tokens in ``windows`` windows."""

    ppl: float
    nll_mean: float
    tokens_scored: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CompareResult:
    """Mean KL(P_ref || P_model) in nats and top-1 agreement over ``tokens`` positions.

    ``ppl`` and ``ref_ppl`` are the perplexities of model and reference on the same positions.
    """

    kl_mean: float
    top1_agreement: float
    ppl: float
    ref_ppl: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_ids(path, tokenizer) -> torch.Tensor:
    """The whole UTF-8 file tokenized as one text without special tokens: LongTensor [T] (a
    BOS is put in front of each window by :func:`perplexity` and :func:`compare`)."""
    text = read_text_file(path)
    if not text.strip():
        raise CalibrationError(f"evaluation file {path} contains no text",
                               hint="pass a non-empty UTF-8 text file")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    if not ids:
        raise CalibrationError(f"evaluation file {path} gives no tokens")
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, ids: torch.Tensor, *, window: int = 512, num_windows: int | None = None,
               stride: int | None = None, bos_id: int | None = None,
               progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``ids`` ([T] or [1, T]); see the module docstring for windows
    (``bos_id``: the BOS each window begins with, None for none)."""
    ids = _flat_ids(ids)
    prefix, body = _window_body(window, bos_id)
    stride = body if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= body:
        what = f"window - 1 = {body} (the window holds a BOS)" if prefix else f"window={window}"
        raise CalibrationError(f"stride must be an integer in 1..{what}, got {stride!r}",
                               hint=f"use a stride of {body} or less" + (
                                   ", or windows without BOS" if prefix else ""))
    starts = _window_starts(len(ids), window, stride, num_windows, body)
    nll_sum, count = 0.0, 0
    with _evaluating(model):
        for k, start in enumerate(starts):
            # first scored position in the window: 1, or past what the previous window scored
            first = 1 if k == 0 else max(1, len(prefix) + body - stride)
            chunk = _window(ids, start, body, prefix)
            logits = _logits(model, chunk)[first - 1:-1].float()
            targets = chunk[first:].to(logits.device)
            nll_sum += F.cross_entropy(logits, targets, reduction="sum").double().item()
            count += targets.numel()
            if progress is not None:
                progress(k + 1, len(starts))
    nll_mean = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens_scored=count,
                            windows=len(starts))


def compare(model, reference, ids: torch.Tensor, *, window: int = 512,
            num_windows: int | None = None, bos_id: int | None = None,
            progress: Progress | None = None) -> CompareResult:
    """KL(P_ref || P_model) and top-1 agreement of next-token distributions, window by window.

    Non-overlapping windows (with ``bos_id``: each the BOS and ``window - 1`` text tokens, module
    docstring); in each, the ``window - 1`` positions that have a next token in the window are
    compared (the same tokens :func:`perplexity` scores).  Log-softmax in float32.
    """
    ids = _flat_ids(ids)
    prefix, body = _window_body(window, bos_id)
    starts = _window_starts(len(ids), window, body, num_windows, body)
    kl_sum = nll_sum = ref_nll_sum = 0.0
    agree = count = 0
    with _evaluating(model), _evaluating(reference):
        for k, start in enumerate(starts):
            chunk = _window(ids, start, body, prefix)
            logp = torch.log_softmax(_logits(model, chunk)[:-1].float(), dim=-1)
            ref_logp = torch.log_softmax(_logits(reference, chunk)[:-1].float(), dim=-1)
            ref_logp = ref_logp.to(logp.device)
            if logp.shape != ref_logp.shape:
                raise ModelError(f"model and reference disagree on vocabulary size: "
                                 f"{logp.shape[-1]} vs {ref_logp.shape[-1]}",
                                 hint="compare models that share one tokenizer")
            targets = chunk[1:].to(logp.device).unsqueeze(-1)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().double().item()
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            nll_sum -= logp.gather(-1, targets).sum().double().item()
            ref_nll_sum -= ref_logp.gather(-1, targets).sum().double().item()
            count += targets.shape[0]
            if progress is not None:
                progress(k + 1, len(starts))
    return CompareResult(kl_mean=kl_sum / count, top1_agreement=agree / count,
                         ppl=math.exp(nll_sum / count), ref_ppl=math.exp(ref_nll_sum / count),
                         tokens=count)


def _flat_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        raise CalibrationError("evaluation ids must be a LongTensor of token ids")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise CalibrationError(
            f"evaluation ids must have shape [T] or [1, T], got {list(ids.shape)}")
    return ids


def _window_body(window: int, bos_id: int | None) -> tuple[list[int], int]:
    """([BOS] or [], the text tokens a window holds)."""
    if not isinstance(window, int) or window < 2:
        raise CalibrationError(f"window must be an integer >= 2, got {window!r}")
    prefix = [] if bos_id is None else [bos_id]
    return prefix, window - len(prefix)


def _window(ids: torch.Tensor, start: int, body: int, prefix: list[int]) -> torch.Tensor:
    """One window's ids: ``prefix`` then ids[start:start + body]."""
    chunk = ids[start:start + body]
    if not prefix:
        return chunk
    return torch.cat([torch.tensor(prefix, dtype=ids.dtype), chunk])


def _window_starts(n_tokens: int, window: int, stride: int, num_windows: int | None,
                   body: int) -> list[int]:
    """Start (in the text) of each window of ``body`` text tokens."""
    if num_windows is not None and (not isinstance(num_windows, int) or num_windows < 1):
        raise CalibrationError(f"num_windows must be a positive integer, got {num_windows!r}")
    starts = list(range(0, n_tokens - body + 1, stride))
    if not starts:
        held = f"{window}" if body == window else f"{window} (BOS + {body} text tokens)"
        raise CalibrationError(f"evaluation text has {n_tokens} tokens, fewer than one window of "
                               f"{held}", hint="pass a longer text or a smaller window")
    if num_windows is not None:
        if num_windows > len(starts):
            logger.warning("only %d windows of %d tokens available, %d requested", len(starts),
                           window, num_windows)
        starts = starts[:num_windows]
    return starts


def _logits(model, chunk: torch.Tensor) -> torch.Tensor:
    """Logits [L, V] for one window (batch size 1) on the model's device."""
    device = next(model.parameters()).device
    out = model(input_ids=chunk.unsqueeze(0).to(device), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0]


@contextmanager
def _evaluating(model) -> Iterator[None]:
    """eval() + inference_mode for the block; the previous training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
