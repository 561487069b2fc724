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

BOS (mpq.calibration.conventions): when the model's tokenizer adds a BOS token, every sample is
that BOS followed by ``seq_len - 1`` text tokens (concat: the stream is cut into chunks of
``seq_len - 1``; document: each document is truncated to ``seq_len - 1`` and the floor counts its
text tokens), so samples keep their shapes and begin as the model's training sequences did.  The
separators between documents stay as above (EOS between records, ``"\\n\\n"`` between
paragraphs).  A tokenizer that adds none (GPT-2, SmolLM2) gives exactly the samples it gave
before.

Reading budget: a source is read and tokenized incrementally, only until the candidates' tokens
(concat: the stream's length; document: the kept documents' lengths, each at most seq_len, so
at least budget / seq_len candidates) reach
``read_budget = max(16 × num_samples × seq_len, 2**20)`` tokens (mpq.calibration.stream: 16 is
``CANDIDATE_FACTOR``, 2**20 ``MIN_READ_TOKENS``); the samples are then drawn from what was read.
Why 16: the draw below stays a sparse pick (at most 1 candidate in 16) from a stretch of the
source 16 times what the run uses, while reading holds 4 bytes a token kept (4 MiB at the
defaults, 128 × 512, whose budget is exactly 2**20) plus one tokenizer call's text; the floor keeps
small runs (few samples) drawing from the same spread as the defaults and keeps small sources
(up to 2**20 tokens, e.g. the project's corpora) whole.  A source that ends before the budget (or
in the tokenizer call that reaches it) is read to its end and gives exactly the samples of a
whole-file read.  A longer one is cut: concat keeps the stream's first ``read_budget`` tokens,
document mode its first candidates up to the one that brings them to the budget (the parts of
a very long document after the one that brought it to seq_len tokens are read past but not
tokenized).  A text file read one document per line because no blank line lies in the part read
stays so (mpq.calibration.reading).

Drawing: ``torch.randperm(n_candidates, generator=torch.Generator().manual_seed(seed))``, the first
``num_samples`` indices, **sorted ascending** (samples keep source order; the subset depends on the
seed only).  With fewer candidates than requested, all are used and a warning is logged; with none,
CalibrationError.

The hash (:func:`token_sha256`) is SHA-256 over, for each sample in order, its shape as two int64
little-endian values (1, L) followed by its L token ids as int64 little-endian (a BOS included).
"""
from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mpq.calibration.conventions import token_conventions
from mpq.calibration.coverage import concat_cuts, data_coverage
from mpq.calibration.options import CalibrationOptions
from mpq.calibration.sources import SOURCES, detect_source
from mpq.calibration.stream import read_budget, tokenize_source
from mpq.errors import CalibrationError, did_you_mean

logger = logging.getLogger(__name__)

MODES = ("concat", "document")
MIN_DOC_TOKENS = 16
_FIELD_LOADERS = {"jsonl", "parquet", "disk", "hub"}


@dataclass(frozen=True)
class CalibrationSet:
    """Token samples (each a LongTensor of shape [1, L]) and where they came from.

    ``provenance`` keys: source, loader, field, split, mode, seq_len, seed, requested_samples,
    num_samples, documents (read), corpus_tokens (tokens the part read yielded, separators
    included in concat mode), total_tokens (in the samples), tokenizer (name_or_path), sha256
    (:func:`token_sha256`); ``bos_token_id`` only when every sample begins with that BOS (the
    tokenizer adds one; its absence means no BOS, as in artifacts written before).  Only when the reading budget cut the source (module docstring):
    read_to_end (False), read_budget_tokens and read_characters (of the documents read); their
    absence means the source was read to its end (so the provenance, and the artifact, of such a
    source are those of a whole-file read).  All values are JSON-serialisable.

    ``coverage``: what the samples cover (mpq.calibration.coverage.data_coverage: lengths,
    documents cut, vocabulary share, script mix); empty for a set built by hand.
    """

    samples: list[torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)

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

    loader, location = detect_source(spec)
    read = SOURCES.get(loader)

    def open_items(paragraphs):
        extra = {} if paragraphs is None else {"paragraphs": paragraphs}
        return iter(read(location, field=field, split=split, **extra))

    prefix = token_conventions(tokenizer).prefix  # [BOS] where the tokenizer adds one
    body = seq_len - len(prefix)  # text tokens per sample
    budget = read_budget(num_samples, seq_len)
    floor = min(min_doc_tokens, body)
    separator = _separator(tokenizer, use_eos=loader != "text")
    got = tokenize_source(open_items, tokenizer, mode=mode, seq_len=body, budget=budget,
                          separator=separator, floor=floor)
    if not got.documents:
        raise CalibrationError(f"calibration source {spec} contains no text",
                               hint="pass a file with at least one non-empty document")
    corpus_tokens = got.corpus_tokens
    if mode == "concat":
        short = f"{corpus_tokens} tokens, fewer than one sample of seq_len={seq_len}" + (
            f" (BOS + {body} text tokens)" if prefix else "")
    else:
        short = f"no document with at least {floor} tokens"
    if not len(got):
        raise CalibrationError(f"calibration source {spec} is too short: {short}",
                               hint="pass more text, a smaller seq_len, or mode=concat")

    picked = _draw(len(got), num_samples, seed)
    if len(picked) < num_samples:
        logger.warning("calibration source %s gives only %d samples of %d requested (mode=%s, "
                       "seq_len=%d); using %d", spec, len(got), num_samples, mode, seq_len,
                       len(picked))
    samples = [torch.tensor(prefix + got.candidate(i), dtype=torch.long).unsqueeze(0)
               for i in picked]
    provenance = {
        "source": spec, "loader": loader, "field": field if loader in _FIELD_LOADERS else None,
        "split": split, "mode": mode, "seq_len": seq_len, "seed": seed,
        "requested_samples": num_samples, "num_samples": len(samples), "documents": got.documents,
        "corpus_tokens": corpus_tokens, "total_tokens": sum(s.shape[1] for s in samples),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "sha256": token_sha256(samples),
    }
    if prefix:  # recorded only when used: artifacts of tokenizers without BOS keep their bytes
        provenance["bos_token_id"] = prefix[0]
    if not got.complete:
        provenance.update(read_to_end=False, read_budget_tokens=budget,
                          read_characters=got.characters)
    if mode == "concat":
        cuts = concat_cuts(got.doc_starts, corpus_tokens, len(separator), body, picked)
    else:
        cuts = {"in_samples": len(picked), "cut": sum(got.truncated[i] for i in picked)}
    texts = tokenizer.batch_decode([s[0].tolist() for s in samples], skip_special_tokens=True)
    coverage = data_coverage(samples, texts, mode=mode, seq_len=seq_len,
                             vocab_size=len(tokenizer), documents=cuts)
    return CalibrationSet(samples=samples, provenance=provenance, coverage=coverage)


def _separator(tokenizer, use_eos: bool) -> list[int]:
    """Ids between two documents in concat mode: EOS for records, else the tokens of "\\n\\n"."""
    eos = getattr(tokenizer, "eos_token_id", None) if use_eos else None
    return [eos] if eos is not None else list(
        tokenizer("\n\n", add_special_tokens=False, return_attention_mask=False)["input_ids"])


def _draw(n_candidates: int, num_samples: int, seed: int) -> list[int]:
    """Sorted indices of min(num_samples, n_candidates) candidates chosen by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_candidates, generator=generator)[:num_samples]
    return sorted(perm.tolist())
