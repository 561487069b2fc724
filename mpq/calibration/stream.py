"""Tokenizing a calibration source only as far as a run needs: the reading budget.

:func:`read_budget` and the rule are stated in mpq.calibration.dataset's docstring.  Documents come
from a loader (mpq.calibration.sources), long ones in parts (mpq.calibration.reading.Unfinished);
they are tokenized in calls of at most :data:`TOKENIZE_DOCS` items and :data:`TOKENIZE_CHARS`
characters, or one longer item (at most reading.PIECE_CHARS + reading.CHUNK_BYTES characters): a
call's transient memory grows with its tokens.  The ids are kept in ``array('i')`` (4 bytes a
token).  Reading stops after the call that brings the candidates to the budget.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterator

from mpq.calibration.reading import PIECE_CHARS, BlankLineFound, Unfinished

CANDIDATE_FACTOR = 16  # candidates read per requested sample
MIN_READ_TOKENS = 1 << 20  # ... but at least this many tokens (= 16 × the default 128 × 512)
TOKENIZE_DOCS = 256
TOKENIZE_CHARS = PIECE_CHARS


def read_budget(num_samples: int, seq_len: int) -> int:
    """Tokens a run reads at most (before the source's end): candidates for
    ``CANDIDATE_FACTOR × num_samples`` samples, and at least :data:`MIN_READ_TOKENS`."""
    return max(CANDIDATE_FACTOR * num_samples * seq_len, MIN_READ_TOKENS)


@dataclass
class Tokenized:
    """What reading gave: concat mode's token ``stream`` or document mode's ``docs`` (each cut to
    seq_len, long enough to be candidates), and how much was read.  Reading stops once the
    candidates hold the budget's tokens: the stream's length, the documents' summed lengths."""

    mode: str
    seq_len: int
    stream: array = field(default_factory=lambda: array("i"))
    docs: list[array] = field(default_factory=list)
    documents: int = 0  # documents read (a document cut by the budget counts)
    corpus_tokens: int = 0  # tokens read: the stream's length (concat), the documents' (document)
    characters: int = 0  # characters of the documents read
    complete: bool = True  # the source was read to its end
    # what cutting did to the documents (mpq.calibration.coverage): concat mode, the offset in
    # ``stream`` of each document's first token; document mode, per kept document in ``docs``,
    # whether it had text past seq_len tokens
    doc_starts: array = field(default_factory=lambda: array("q"))
    truncated: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stream) // self.seq_len if self.mode == "concat" else len(self.docs)

    def candidate(self, i: int) -> list[int]:
        if self.mode == "concat":
            return self.stream[i * self.seq_len:(i + 1) * self.seq_len].tolist()
        return self.docs[i].tolist()


def tokenize_source(open_items: Callable[[bool | None], Iterator[str]], tokenizer, *, mode: str,
                    seq_len: int, budget: int, separator: list[int], floor: int) -> Tokenized:
    """Tokenize the documents of ``open_items(paragraphs)`` until the candidates reach ``budget``
    tokens (see the module docstring).  A text file first read line by line that turns out to have
    blank lines (BlankLineFound) is read again as paragraphs.  ``separator``: ids put between
    documents (concat); ``floor``: the fewest tokens of a document candidate."""
    try:
        return _Reader(tokenizer, mode, seq_len, budget, separator, floor).read(open_items(None))
    except BlankLineFound:
        return _Reader(tokenizer, mode, seq_len, budget, separator, floor).read(open_items(True))


class _Reader:
    def __init__(self, tokenizer, mode, seq_len, budget, separator, floor):
        self.tokenizer, self.separator, self.floor = tokenizer, separator, floor
        self.out = Tokenized(mode=mode, seq_len=seq_len)
        self.budget = budget
        self.kept = 0  # document mode: tokens of the candidates
        self.batch: list[tuple[bool, bool, str]] = []  # (starts a document, ends it, text)
        self.chars = 0
        self.current = array("i")  # document mode: the ids of the document being read
        self.starts = True  # the next item starts a document
        self.joined = False  # concat: a document is in the stream (the next one needs a separator)
        self.cut = False  # document mode: the document being read has text past seq_len tokens

    def read(self, items: Iterator[str]) -> Tokenized:
        for item in items:
            starts, ends = self.starts, not isinstance(item, Unfinished)
            self.starts = ends
            self.out.characters += len(item)
            if starts:
                self.out.documents += 1
            if not starts and self.out.mode == "document":
                self.flush()  # the ids so far tell whether this part is needed
                if len(self.current) >= self.out.seq_len:
                    self.cut = True  # text past seq_len tokens, read past untokenized
                    if ends:
                        self.end_document()
                    continue
            if self.batch and self.chars + len(item) > TOKENIZE_CHARS:
                self.flush()
                if self.full():
                    return self.finish(items, pending=(starts, ends, str(item)))
            self.batch.append((starts, ends, str(item)))
            self.chars += len(item)
            if len(self.batch) >= TOKENIZE_DOCS:
                self.flush()
                if self.full():
                    return self.finish(items)
        self.flush()
        return self.out

    def flush(self) -> None:
        if not self.batch:
            return
        texts = [text for _, _, text in self.batch]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 verbose=False)["input_ids"]
        out = self.out
        for (starts, ends, _), ids in zip(self.batch, encoded):
            if out.mode == "concat":
                if starts and self.joined:
                    out.stream.extend(self.separator)
                if starts:
                    out.doc_starts.append(len(out.stream))
                self.joined = True
                out.stream.extend(ids)
                out.corpus_tokens = len(out.stream)
            else:
                out.corpus_tokens += len(ids)
                room = max(0, out.seq_len - len(self.current))
                self.cut = self.cut or len(ids) > room
                self.current.extend(ids[:room])
                if ends:
                    self.end_document()
        self.batch, self.chars = [], 0

    def end_document(self) -> None:
        if len(self.current) >= self.floor:
            self.out.docs.append(self.current)
            self.out.truncated.append(self.cut)
            self.kept += len(self.current)
        self.current, self.cut = array("i"), False

    def full(self) -> bool:
        if self.out.mode == "concat":
            return len(self.out.stream) >= self.budget
        return self.kept >= self.budget

    def finish(self, items: Iterator[str], pending=None) -> Tokenized:
        """Stop at the budget: whether anything follows (``pending``: an item already taken but
        not tokenized), and the candidates cut to the budget."""
        if pending is not None:  # counted when it came
            self.out.characters -= len(pending[2])
            self.out.documents -= pending[0]
        try:
            self.out.complete = pending is None and next(items, None) is None
        except BlankLineFound:
            self.out.complete = False
        if not self.out.complete:
            del self.out.stream[self.budget:]
            kept, docs = 0, self.out.docs
            for n, ids in enumerate(docs, start=1):
                kept += len(ids)
                if kept >= self.budget:
                    del docs[n:]
                    del self.out.truncated[n:]
                    break
        return self.out
