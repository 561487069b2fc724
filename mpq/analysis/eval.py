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

Per-position accounting: each scored token also counts in the bucket of its text position in
its window (0 for the first text token; the BOS has none), buckets [0, 512), [512, 2048),
[2048, 4096), [4096, 8192) and, for longer windows, doubling ones beyond (``POSITION_EDGES``).
Only the buckets the window's text reaches are reported (``by_position``); their tokens and sums
add up to the totals.  Scores are computed in chunks of ``SCORE_CHUNK`` positions.  A window
longer than one chunk runs the model's decoder once and its output head chunk by chunk
(:class:`_WindowLogits`, through the model's own ``logits_to_keep``, so any logit scaling or
soft-capping of the model applies), so a long window's [T, vocab] logits are never held at once;
a model whose forward takes no ``logits_to_keep`` gets its logits in one tensor.

Perplexity = exp(mean NLL over all scored tokens).  Models run in eval mode under
``torch.inference_mode()`` with batch size 1 and ``use_cache=False``; their train/eval mode is
restored afterwards.  NLL and KL sums are accumulated in float64.
"""
from __future__ import annotations

import inspect
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

POSITION_EDGES = (0, 512, 2048, 4096, 8192)
SCORE_CHUNK = 1024


@dataclass(frozen=True)
class PositionBucket:
    """Scored tokens whose text position in their window is in [start, end)."""

    start: int
    end: int
    tokens: int
    nll_mean: float
    ppl: float
    kl_mean: float | None = None
    top1_agreement: float | None = None
    ref_ppl: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k in ("start", "end", "tokens", "nll_mean", "ppl")}


def position_buckets(body: int, edges=POSITION_EDGES) -> list[tuple[int, int]]:
    """[start, end) text-position buckets that a window of ``body`` text tokens reaches: the
    given ``edges`` (ascending, from 0), then doubling past the last one."""
    edges = list(edges)
    while edges[-1] < body:
        edges.append(edges[-1] * 2 if edges[-1] > 0 else 1)
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < body]


class _Buckets:
    """Float64 sums per bucket (tokens, NLL, and for compare KL, agreement, reference NLL)."""

    def __init__(self, body: int, edges):
        self.ranges = position_buckets(body, edges)
        self.bounds = torch.tensor([b for _, b in self.ranges[:-1]], dtype=torch.long)
        n = len(self.ranges)
        self.tokens = torch.zeros(n, dtype=torch.long)
        self.sums = {key: torch.zeros(n, dtype=torch.float64)
                     for key in ("nll", "kl", "agree", "ref_nll")}

    def add(self, positions: torch.Tensor, **values: torch.Tensor) -> None:
        index = torch.bucketize(positions, self.bounds, right=True)
        self.tokens += torch.bincount(index, minlength=len(self.ranges))
        for key, value in values.items():
            self.sums[key].index_add_(0, index, value.detach().to("cpu", torch.float64))

    def results(self, compared: bool) -> list[PositionBucket]:
        out = []
        for i, (start, end) in enumerate(self.ranges):
            n = int(self.tokens[i])
            if n == 0:
                continue
            nll = float(self.sums["nll"][i]) / n
            extra = {}
            if compared:
                extra = {"kl_mean": float(self.sums["kl"][i]) / n,
                         "top1_agreement": float(self.sums["agree"][i]) / n,
                         "ref_ppl": math.exp(float(self.sums["ref_nll"][i]) / n)}
            out.append(PositionBucket(start=start, end=end, tokens=n, nll_mean=nll,
                                      ppl=math.exp(nll), **extra))
        return out


@dataclass(frozen=True)
class PerplexityResult:
    """exp(nll_mean) over ``tokens_scored`` tokens in ``windows`` windows."""

    ppl: float
    nll_mean: float
    tokens_scored: int
    windows: int
    by_position: tuple[PositionBucket, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["by_position"] = [b.to_dict() for b in self.by_position]
        return out


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
    by_position: tuple[PositionBucket, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["by_position"] = [b.to_dict() for b in self.by_position]
        return out


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
               progress: Progress | None = None, edges=POSITION_EDGES) -> PerplexityResult:
    """Perplexity of ``model`` on ``ids`` ([T] or [1, T]); see the module docstring for windows
    (``bos_id``: the BOS each window begins with, None for none) and ``edges`` (position
    buckets)."""
    ids = _flat_ids(ids)
    prefix, body = _window_body(window, bos_id)
    stride = body if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= body:
        what = f"window - 1 = {body} (the window holds a BOS)" if prefix else f"window={window}"
        raise CalibrationError(f"stride must be an integer in 1..{what}, got {stride!r}",
                               hint=f"use a stride of {body} or less" + (
                                   ", or windows without BOS" if prefix else ""))
    starts = _window_starts(len(ids), window, stride, num_windows, body)
    buckets = _Buckets(body, edges)
    nll_sum, count = 0.0, 0
    with _evaluating(model):
        for k, start in enumerate(starts):
            # first scored position in the window: 1, or past what the previous window scored
            first = 1 if k == 0 else max(1, len(prefix) + body - stride)
            chunk = _window(ids, start, body, prefix)
            logits = _WindowLogits(model, chunk)
            targets = chunk.to(logits.device)
            for a in range(first, len(chunk), SCORE_CHUNK):
                b = min(a + SCORE_CHUNK, len(chunk))
                nll = F.cross_entropy(logits.rows(a - 1, b - 1).float(), targets[a:b],
                                      reduction="none")
                nll_sum += nll.double().sum().item()
                buckets.add(torch.arange(a, b) - len(prefix), nll=nll)
            count += len(chunk) - first
            del logits
            if progress is not None:
                progress(k + 1, len(starts))
    nll_mean = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens_scored=count,
                            windows=len(starts), by_position=tuple(buckets.results(False)))


def compare(model, reference, ids: torch.Tensor, *, window: int = 512,
            num_windows: int | None = None, bos_id: int | None = None,
            progress: Progress | None = None, edges=POSITION_EDGES) -> CompareResult:
    """KL(P_ref || P_model) and top-1 agreement of next-token distributions, window by window.

    Non-overlapping windows (with ``bos_id``: each the BOS and ``window - 1`` text tokens, module
    docstring); in each, the ``window - 1`` positions that have a next token in the window are
    compared (the same tokens :func:`perplexity` scores).  Log-softmax in float32.
    """
    ids = _flat_ids(ids)
    prefix, body = _window_body(window, bos_id)
    starts = _window_starts(len(ids), window, body, num_windows, body)
    buckets = _Buckets(body, edges)
    kl_sum = nll_sum = ref_nll_sum = 0.0
    agree = count = 0
    with _evaluating(model), _evaluating(reference):
        for k, start in enumerate(starts):
            chunk = _window(ids, start, body, prefix)
            logits = _WindowLogits(model, chunk)
            ref_logits = _WindowLogits(reference, chunk)
            targets = chunk.to(logits.device)
            for a in range(1, len(chunk), SCORE_CHUNK):
                b = min(a + SCORE_CHUNK, len(chunk))
                rows, ref_rows = logits.rows(a - 1, b - 1), ref_logits.rows(a - 1, b - 1)
                if rows.shape != ref_rows.shape:
                    raise ModelError(f"model and reference disagree on vocabulary size: "
                                     f"{rows.shape[-1]} vs {ref_rows.shape[-1]}",
                                     hint="compare models that share one tokenizer")
                logp = torch.log_softmax(rows.float(), dim=-1)
                ref_logp = torch.log_softmax(ref_rows.to(rows.device).float(), dim=-1)
                target = targets[a:b].unsqueeze(-1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                same = logp.argmax(-1) == ref_logp.argmax(-1)
                nll = -logp.gather(-1, target)[:, 0]
                ref_nll = -ref_logp.gather(-1, target)[:, 0]
                kl_sum += kl.double().sum().item()
                agree += int(same.sum())
                nll_sum += nll.double().sum().item()
                ref_nll_sum += ref_nll.double().sum().item()
                buckets.add(torch.arange(a, b) - len(prefix), nll=nll, kl=kl, agree=same,
                            ref_nll=ref_nll)
            count += len(chunk) - 1
            del logits, ref_logits
            if progress is not None:
                progress(k + 1, len(starts))
    return CompareResult(kl_mean=kl_sum / count, top1_agreement=agree / count,
                         ppl=math.exp(nll_sum / count), ref_ppl=math.exp(ref_nll_sum / count),
                         tokens=count, by_position=tuple(buckets.results(True)))


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


def _logits(model, chunk: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits [L, V] for one window (batch size 1) on the model's device."""
    device = next(model.parameters()).device
    out = model(input_ids=chunk.unsqueeze(0).to(device), use_cache=False, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0]


class _WindowLogits:
    """The logits of one window, row range by row range (:meth:`rows`).

    A window of at most ``SCORE_CHUNK`` tokens, or a model without ``logits_to_keep`` or
    ``get_decoder``, runs once and keeps its [L, V] logits.  A longer one runs the decoder once
    and keeps its output; each :meth:`rows` call then runs the model's forward with that decoder
    output replayed (the decoder's forward is replaced for the call) and ``logits_to_keep`` set
    to the rows, so only the head, and whatever the model does to its logits, runs again.
    """

    def __init__(self, model, chunk: torch.Tensor):
        self.model, self.chunk = model, chunk
        self.device = next(model.parameters()).device
        self.decoder = _decoder_of(model) if len(chunk) > SCORE_CHUNK else None
        if self.decoder is None:
            self.full = _logits(model, chunk)
        else:
            self.full = None
            self.decoded = self.decoder(input_ids=chunk.unsqueeze(0).to(self.device),
                                        use_cache=False)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Logits [b - a, V] of window positions a..b-1."""
        if self.full is not None:
            return self.full[a:b]
        decoded = self.decoded
        self.decoder.forward = lambda *args, **kwargs: decoded
        try:
            return _logits(self.model, self.chunk,
                           logits_to_keep=torch.arange(a, b, device=self.device))
        finally:
            del self.decoder.forward


def _decoder_of(model):
    """The model's decoder (``get_decoder()``) when its forward takes ``logits_to_keep`` and
    the decoder returns its hidden states as ``last_hidden_state``; else None."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        return None
    if "forward" in vars(decoder):  # already replaced by someone else: do not stack
        return None
    return decoder


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
