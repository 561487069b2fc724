"""Calibration sets: token samples drawn reproducibly from a text source, hashed for provenance.

Two modes:

- ``concat`` (default): every document is tokenized without special tokens; documents are joined
  into one stream with the tokens of ``"\\n\\n"`` when they are paragraphs of one plain text file
  (an EOS mid-article is text the model never sees), else with the tokenizer's EOS id (records of
  jsonl/parquet/datasets are separate documents; without an EOS, ``"\\n\\n"`` again),
  cut into non-overlapping ``seq_len`` chunks from the start (the tail shorter than ``seq_len`` is
  dropped).  Samples all have shape [1, seq_len].
- ``document``: each document is tokenized on its own and truncated to ``seq_len``; documents with
  fewer than ``min(min_doc_tokens, seq_len)`` tokens (default 16) are dropped.  Samples have shape
  [1, L] with L <= seq_len.

Drawing: ``torch.randperm(n_candidates, generator=torch.Generator().manual_seed(seed))``, the first
``num_samples`` indices, **sorted ascending** (samples keep source order; the subset depends on the
seed only).  With fewer candidates than requested, all are used and a warning is logged; with none,
CalibrationError.

The hash (:func:`token_sha256`) is SHA-256 over, for each sample in order, its shape as two int64
little-endian values (1, L) followed by its L token ids as int64 little-endian.
"""
from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mpq.calibration.options import CalibrationOptions
from mpq.calibration.sources import load_documents
from mpq.errors import CalibrationError, did_you_mean

logger = logging.getLogger(__name__)

MODES = ("concat", "document")
MIN_DOC_TOKENS = 16
_TOKENIZE_BATCH = 256
_FIELD_LOADERS = {"jsonl", "parquet", "disk", "hub"}


@dataclass(frozen=True)
class CalibrationSet:
    """Token samples (each a LongTensor of shape [1, L]) and where they came from.

    ``provenance`` keys: source, loader, field, split, mode, seq_len, seed, requested_samples,
    num_samples, documents, corpus_tokens (tokens the source yielded, separators included in concat
    mode), total_tokens (in the samples), tokenizer (name_or_path), sha256 (:func:`token_sha256`).
    All values are JSON-serialisable.
    """

    samples: list[torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    @property
    def sha256(self) -> str:
        return self.provenance["sha256"]


def token_sha256(samples: Sequence[torch.Tensor]) -> str:
    """SHA-256 hex digest: per sample, shape dims then ids, all int64 little-endian."""
    h = hashlib.sha256()
    for s in samples:
        h.update(struct.pack(f"<{s.dim()}q", *s.shape))
        h.update(s.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def build_calibration_set(options: CalibrationOptions, tokenizer, *,
                          min_doc_tokens: int = MIN_DOC_TOKENS) -> CalibrationSet:
    """Read ``options.source`` (see :func:`mpq.calibration.sources.detect_source`), tokenize,
    draw ``options.num_samples`` samples of ``options.seq_len`` tokens.

    Deterministic: the same source, tokenizer and arguments give the same samples and hash.
    Raises CalibrationError for bad arguments, bad data, or when no sample can be made.
    """
    spec, num_samples, seq_len = options.source, options.num_samples, options.seq_len
    seed, mode, field, split = options.seed, options.mode, options.field, options.split
    if mode not in MODES:
        hint = did_you_mean(mode, MODES) or f"choose one of {', '.join(MODES)}"
        raise CalibrationError(f"unknown calibration mode '{mode}'", hint=hint)
    for name, value, low in (("num_samples", num_samples, 1), ("seq_len", seq_len, 2)):
        if not isinstance(value, int) or value < low:
            raise CalibrationError(f"{name} must be an integer >= {low}, got {value!r}")

    loader, docs = load_documents(spec, field=field, split=split)
    token_lists = _tokenize(tokenizer, docs)
    if mode == "concat":
        candidates, corpus_tokens = _concat_chunks(tokenizer, token_lists, seq_len,
                                                   use_eos=loader != "text")
        short = f"{corpus_tokens} tokens, fewer than one sample of seq_len={seq_len}"
    else:
        floor = min(min_doc_tokens, seq_len)
        candidates = [ids[:seq_len] for ids in token_lists if len(ids) >= floor]
        corpus_tokens = sum(len(ids) for ids in token_lists)
        short = f"no document with at least {floor} tokens"
    if not candidates:
        raise CalibrationError(f"calibration source {spec} is too short: {short}",
                               hint="pass more text, a smaller seq_len, or mode=concat")

    picked = _draw(len(candidates), num_samples, seed)
    if len(picked) < num_samples:
        logger.warning("calibration source %s gives only %d samples of %d requested (mode=%s, "
                       "seq_len=%d); using %d", spec, len(candidates), num_samples, mode, seq_len,
                       len(picked))
    samples = [torch.tensor(candidates[i], dtype=torch.long).unsqueeze(0) for i in picked]
    provenance = {
        "source": spec, "loader": loader, "field": field if loader in _FIELD_LOADERS else None,
        "split": split, "mode": mode, "seq_len": seq_len, "seed": seed,
        "requested_samples": num_samples, "num_samples": len(samples), "documents": len(docs),
        "corpus_tokens": corpus_tokens, "total_tokens": sum(s.shape[1] for s in samples),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "sha256": token_sha256(samples),
    }
    return CalibrationSet(samples=samples, provenance=provenance)


def _tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, no special tokens, in batches (fast tokenizers parallelise)."""
    out: list[list[int]] = []
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        batch = docs[start:start + _TOKENIZE_BATCH]
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        out.extend(enc["input_ids"])
    return out


def _concat_chunks(tokenizer, token_lists: list[list[int]], seq_len: int,
                   use_eos: bool) -> tuple[list[list[int]], int]:
    """Non-overlapping seq_len chunks of the separator-joined stream, and the stream length."""
    eos = getattr(tokenizer, "eos_token_id", None) if use_eos else None
    sep = [eos] if eos is not None else list(
        tokenizer("\n\n", add_special_tokens=False, return_attention_mask=False)["input_ids"])
    stream: list[int] = []
    for i, ids in enumerate(token_lists):
        if i and sep:
            stream.extend(sep)
        stream.extend(ids)
    n = len(stream) // seq_len
    return [stream[k * seq_len:(k + 1) * seq_len] for k in range(n)], len(stream)


def _draw(n_candidates: int, num_samples: int, seed: int) -> list[int]:
    """Sorted indices of min(num_samples, n_candidates) candidates chosen by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_candidates, generator=generator)[:num_samples]
    return sorted(perm.tolist())
