"""Reading calibration files in bounded pieces: bytes in chunks, strict UTF-8 with file byte
offsets in errors, and a text file split into documents exactly as a whole-file read splits it.

The ``text`` rule (mpq.calibration.sources.load_text), stated on the whole text: documents are the
blocks between blank lines (:data:`BLANK_LINE`), each stripped of ``\\r``/``\\n`` at both ends; a
file with no blank line at all is one document per line (``str.splitlines``).  Whitespace-only
documents are skipped.  :func:`text_documents` applies the rule while reading :data:`CHUNK_BYTES`
at a time and holding at most about :data:`PIECE_CHARS` characters of text (plus one chunk):

- a block (a line) is yielded once the blank line (line end) after it has been read;
- a block longer than :data:`PIECE_CHARS` characters comes in parts: every part but the last is an
  :class:`Unfinished`.  A part ends at a single space between two non-space characters, the last
  such space within the bound (there byte-level BPE tokenizers — GPT-2, Llama 3, Qwen, SmolLM — and
  Metaspace/SentencePiece ones start a new pre-token, so the parts' tokens are the whole block's);
  with no such space, between two non-space characters (tokens there may differ from the whole
  block's); else beside a character that no blank line holds (a run of only blank-line characters
  is held whole until it ends);
- whether the file has a blank line is known only once it was read: reading starts one document
  per line, and at the first blank line, if lines were already consumed, :class:`BlankLineFound`
  is raised; the caller reads again with ``paragraphs=True`` (so the documents are those of a
  whole-file read whenever the blank line lies within what the caller reads).
"""
from __future__ import annotations

import os
import re
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Iterator

from mpq.errors import CalibrationError

BLANK_LINE = re.compile(r"\r?\n[ \t\f\v\r]*\n")
CHUNK_BYTES = 1 << 16  # bytes read at a time
PIECE_CHARS = 1 << 17  # a longer block (line) is yielded in parts of at most this many characters
_BOM = b"\xef\xbb\xbf"
_BLANK_CHARS = frozenset(" \t\f\v\r\n")  # the characters a blank line (BLANK_LINE) is made of


class Unfinished(str):
    """A part of a document; the document goes on in the next item."""


class BlankLineFound(Exception):
    """A file read one document per line has a blank line after lines already consumed."""


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """The file opened for reading bytes, or CalibrationError (missing, unreadable)."""
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise missing_file(str(path)) from None
    except OSError as e:
        raise unreadable(path, e) from None


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, or CalibrationError."""
    with open_binary(path) as handle:
        try:
            return handle.read()
        except OSError as e:
            raise unreadable(path, e) from None


def missing_file(path: str) -> CalibrationError:
    return CalibrationError(f"calibration file {path} does not exist",
                            hint="check the path; for a Hugging Face Hub dataset write "
                                 "hf:NAME[:CONFIG]")


def unreadable(path, e: OSError) -> CalibrationError:
    return CalibrationError(f"cannot read calibration file {path}: {e.strerror or e}")


def decode(data: bytes, path, offset: int = 0) -> str:
    """Strict UTF-8; a BOM at file offset 0 is dropped; errors name the file byte offset."""
    if offset == 0 and data.startswith(_BOM):
        data, offset = data[3:], 3
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte "
                               f"offset {offset + e.start}",
                               hint="re-encode the file as UTF-8") from None


def decoded_chunks(path, chunk_bytes: int | None = None) -> Iterator[tuple[str, bool]]:
    """``(text, at_end)`` for successive chunks of the file, decoded as :func:`decode` decodes the
    whole file (a character split between two reads is decoded with the later one)."""
    size = chunk_bytes or CHUNK_BYTES
    with open_binary(path) as handle:
        offset, carry = 0, b""
        while True:
            try:
                data = handle.read(size)
            except OSError as e:
                raise unreadable(path, e) from None
            at_end = not data
            data = carry + data
            cut = len(data) if at_end else _utf8_boundary(data)
            text = decode(data[:cut], path, offset) if cut else ""
            offset, carry = offset + cut, data[cut:]
            yield text, at_end
            if at_end:
                return


def _utf8_boundary(data: bytes) -> int:
    """Where the last complete UTF-8 sequence of ``data`` ends (an invalid tail is kept: decoding
    it raises the same error a whole-file decode would)."""
    end = start = len(data)
    while start > 0 and end - start < 3 and data[start - 1] & 0xC0 == 0x80:
        start -= 1
    if start == 0:
        return end
    lead = data[start - 1]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 \
        else 1
    return start - 1 if need > end - (start - 1) else end


def text_documents(path, *, paragraphs: bool | None = None, piece_chars: int | None = None,
                   chunk_bytes: int | None = None) -> Iterator[str]:
    """The documents of a text file (module docstring), long ones in parts.  ``paragraphs``:
    True for blank-line blocks, False for lines, None to decide by the blank lines read."""
    limit = piece_chars or PIECE_CHARS
    splitter = _Splitter(paragraphs)
    pending, tail = "", ""  # text not split yet; the last 2 characters split before it
    for text, at_end in decoded_chunks(path, chunk_bytes):
        pending += text
        while True:
            if splitter.paragraphs is None and BLANK_LINE.search(tail + pending):
                if splitter.consumed:
                    raise BlankLineFound(str(path))
                splitter.paragraphs = True
            end = len(pending) if at_end else _complete_end(pending, splitter.paragraphs)
            cut = end == 0 and len(pending) > limit
            if cut:
                end = _cut_point(pending, limit)
            if not end:
                break
            yield from splitter.split(pending[:end], finished=not cut)
            tail, pending = pending[max(0, end - 2):end], pending[end:]
        if at_end:  # a cut leaves text behind, so the last split closed any open document
            return


def _complete_end(text: str, paragraphs: bool | None) -> int:
    """The end of the last block (line) of ``text`` that nothing read later can change."""
    if paragraphs:
        end = 0
        for match in BLANK_LINE.finditer(text):
            end = match.end()
        return end
    return text.rfind("\n") + 1


def _cut_point(text: str, limit: int) -> int:
    """Where a part of an over-long block ends (module docstring), 0 < result < len(text); 0 when
    ``text`` is one run of blank-line characters that a later newline could still make a blank
    line (nothing is cut then: the run is held until it ends)."""
    hi = min(limit, len(text) - 2)
    at = text.rfind(" ", 1, hi + 1)
    while at > 0:
        if not text[at - 1].isspace() and not text[at + 1].isspace():
            return at
        at = text.rfind(" ", 1, at)
    for at in range(hi, 0, -1):
        if not text[at - 1].isspace() and not text[at].isspace():
            return at
    # no blank line (nor a \r\n pair) can span a cut beside a character outside it
    for at in chain(range(hi, 0, -1), range(hi + 1, len(text))):
        if text[at - 1] not in _BLANK_CHARS or text[at] not in _BLANK_CHARS:
            return at
    return 0


class _Splitter:
    """Splits text already read into documents, remembering a document left open by a part."""

    def __init__(self, paragraphs: bool | None):
        self.paragraphs = paragraphs
        self.consumed = False  # some text was split (a blank line found now means a restart)
        self.open = False  # the last item yielded was Unfinished
        self.held = ""  # the whitespace-only start of a document that goes on

    def split(self, text: str, finished: bool) -> Iterator[str]:
        """Documents of ``text``; ``finished``: its last block ends with it (else it goes on)."""
        self.consumed = True
        blocks = BLANK_LINE.split(text) if self.paragraphs else text.splitlines()
        if not blocks or (not self.paragraphs and not finished
                          and (text[-1:] + "x").splitlines()[-1] == "x"):
            blocks.append("")  # text ends with a line end: the next line starts after it
        if self.held:
            blocks[0], self.held = self.held + blocks[0], ""
        for i, block in enumerate(blocks):
            starts = not (i == 0 and self.open)
            ends = finished or i < len(blocks) - 1
            if starts:
                block = block.lstrip("\r\n")
            if ends:
                block = block.rstrip("\r\n")
            if not ends and starts and not block.strip():
                self.held = block  # only later parts tell whether the document is empty
            elif not ends:
                self.open = True
                yield Unfinished(block)
            elif not starts:
                self.open = False
                yield block  # the last part of a document (may be empty)
            elif block.strip():
                yield block


def join_parts(items: Iterator[str]) -> Iterator[str]:
    """Whole documents from items where long ones come in :class:`Unfinished` parts."""
    parts: list[str] = []
    for item in items:
        parts.append(str(item))
        if not isinstance(item, Unfinished):
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)


def file_size(path) -> int | None:
    """Size in bytes of a local file, None if it is not one."""
    try:
        return Path(path).stat().st_size if Path(path).is_file() else None
    except OSError:
        return None
