"""Traffic that differs on purpose from short English prose, built on the fly from a given text
(no downloads): the test data of ``mpq drift`` and benchmarks/drift_shift.py.

:func:`shifted_text` turns paragraphs of a base text (e.g. the shared enwiki excerpt) into
documents of these kinds (:data:`SHIFT_KINDS`), one kind per document, separated by blank lines
so that mpq's text loader reads each as a paragraph:

- ``script``: the paragraph transliterated letter by letter into Cyrillic (another Unicode
  script; a byte-level tokenizer sees multi-byte characters it met rarely in English);
- ``code``: Python source generated from the paragraph's words (identifiers, indentation,
  brackets, numeric literals, comments);
- ``repeat``: repeated tokens: one word of the paragraph repeated, then a run of one
  punctuation character (known to produce outsized activations);
- ``digits``: the paragraph's words as a table of numbers (their character codes, comma
  separated).

Long documents are a matter of length: run the result with a longer ``--seq-len`` than the
calibration used.  The output is deterministic for a given text, kinds and ``seed``.
"""
from __future__ import annotations

import random
import re

SHIFT_KINDS = ("script", "code", "repeat", "digits")

_LATIN = "abcdefghijklmnopqrstuvwxyz"
_CYRILLIC = "абцдефгхийклмнопярстужвьыз"  # a→а, b→б, ... z→з
_TO_CYRILLIC = str.maketrans(_LATIN + _LATIN.upper(), _CYRILLIC + _CYRILLIC.upper())


def _words(paragraph: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", paragraph) or ["value"]


def to_script(paragraph: str) -> str:
    return paragraph.translate(_TO_CYRILLIC)


def to_code(paragraph: str, rng: random.Random) -> str:
    words = [w.lower() for w in _words(paragraph)]
    lines = []
    for start in range(0, len(words), 6):
        chunk = words[start:start + 6]
        name = "_".join(chunk[:2])
        args = ", ".join(dict.fromkeys(chunk[2:5])) or "x"
        lines.append(f"def {name}_{start}({args}):")
        lines.append(f"    # {' '.join(chunk)}")
        lines.append(f"    result = [{', '.join(str(rng.randint(0, 4096)) for _ in range(4))}]")
        lines.append(f"    if len(result) > {rng.randint(1, 9)}:")
        lines.append(f"        return {{'{chunk[0]}': result[{rng.randint(0, 3)}]}}")
        lines.append("    return None")
    return "\n".join(lines)


def to_repeat(paragraph: str, rng: random.Random) -> str:
    word = rng.choice(_words(paragraph))
    return " ".join([word] * 200) + " " + rng.choice("!.-=*#") * 400


def to_digits(paragraph: str) -> str:
    rows = [",".join(str(ord(c)) for c in word) for word in _words(paragraph)]
    return "\n".join(rows)


def shifted_text(base: str, kinds: tuple[str, ...] = SHIFT_KINDS, *, seed: int = 0) -> str:
    """``base``'s paragraphs (split at blank lines, else at lines) each turned into a document
    of one of ``kinds`` in turn (module docstring), joined by blank lines.  ValueError for an
    unknown kind or a base without text."""
    unknown = [kind for kind in kinds if kind not in SHIFT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown shift kind(s) {unknown or kinds}; known: "
                         f"{', '.join(SHIFT_KINDS)}")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n" if "\n\n" in base else r"\n", base)
                  if p.strip()]
    if not paragraphs:
        raise ValueError("the base text is empty")
    rng = random.Random(seed)
    docs = []
    for index, paragraph in enumerate(paragraphs):
        kind = kinds[index % len(kinds)]
        if kind == "script":
            docs.append(to_script(paragraph))
        elif kind == "code":
            docs.append(to_code(paragraph, rng))
        elif kind == "repeat":
            docs.append(to_repeat(paragraph, rng))
        else:
            docs.append(to_digits(paragraph))
    return "\n\n".join(docs) + "\n"
