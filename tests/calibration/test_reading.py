"""Chunked reading of text files: the same documents as a whole-file read, in bounded parts."""
from __future__ import annotations

import random
import re

import pytest

from mpq.calibration import reading
from mpq.calibration.reading import Unfinished, join_parts, text_documents
from mpq.calibration.sources import load_documents
from mpq.errors import CalibrationError


def whole_file_documents(text: str) -> list[str]:
    """The text loader's rule applied to the whole text at once (as it was read before)."""
    blocks = re.split(r"\r?\n[ \t\f\v\r]*\n", text)
    if len(blocks) == 1:
        blocks = text.splitlines()
    return [b.strip("\r\n") for b in blocks if b.strip("\r\n").strip()]


ALPHABET = ["ab", "c", " ", " ", "\n", "\n", "\r", "\r\n", "\t", "\f", "\v", "é", "€", "𝄞",
            "\u2028", "\x85", "  "]


@pytest.mark.parametrize("seed", range(60))
def test_chunked_read_matches_whole_file_read(tmp_path, seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 400)))
    if seed % 3 == 0:  # no blank line: one document per line
        text = re.sub(r"\n[ \t\f\v\r]*\n", "\n", text)
    path = tmp_path / "t.txt"
    path.write_bytes(("\ufeff" if seed % 5 == 0 else "").encode() + text.encode("utf-8"))
    expected = whole_file_documents(text)
    chunk, piece = rng.randrange(1, 9), rng.randrange(6, 40)
    for paragraphs in (None, True):
        try:
            items = list(text_documents(path, paragraphs=paragraphs, piece_chars=piece,
                                        chunk_bytes=chunk))
        except reading.BlankLineFound:
            assert paragraphs is None and expected != text.splitlines()
            continue
        if paragraphs is None or re.search(r"\r?\n[ \t\f\v\r]*\n", text):
            assert list(join_parts(iter(items))) == expected


def test_long_line_comes_in_parts_cut_between_words(tmp_path):
    words = " ".join(f"w{i}" for i in range(3000))
    path = tmp_path / "one.txt"
    path.write_text(words, encoding="utf-8")
    items = list(text_documents(path, piece_chars=1000, chunk_bytes=256))
    assert len(items) > 10 and all(isinstance(i, Unfinished) for i in items[:-1])
    assert max(len(i) for i in items) <= 1000
    assert not isinstance(items[-1], Unfinished) and "".join(items) == words
    assert all(part.startswith(" w") for part in items[1:])  # cut before the space of a word


def test_blank_line_after_the_first_chunk_rereads_as_paragraphs(tmp_path):
    text = "line one\nline two\n" * 50 + "\nlast paragraph\n"
    path = tmp_path / "late.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(reading.BlankLineFound):
        list(text_documents(path, chunk_bytes=64))
    assert load_documents(str(path))[1] == whole_file_documents(text)


def test_invalid_utf8_named_at_its_file_offset_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK_BYTES", 7)
    path = tmp_path / "bad.txt"
    good = "fine text ✓ and more\n".encode()
    path.write_bytes(good + b"caf\xe9 x\n")
    with pytest.raises(CalibrationError, match=f"byte 0xe9 at byte offset {len(good) + 3}"):
        load_documents(str(path))
