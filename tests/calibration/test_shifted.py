"""mpq.calibration.shifted: traffic that differs on purpose from English prose."""
from __future__ import annotations

import pytest

from mpq.calibration.shifted import SHIFT_KINDS, shifted_text, to_script

BASE = ("= Title =\n\nThe quick brown fox jumps over the lazy dog. It ran 3 miles.\n\n"
        "Anarchism is a political philosophy.\n\nSecond paragraph here, with words.\n\n"
        "Last one.\n")


def test_each_kind_in_turn_and_deterministic():
    text = shifted_text(BASE)
    docs = text.strip().split("\n\n")
    assert len(docs) == 5  # one document per paragraph
    assert docs[0] == "= Титле ="  # script: Cyrillic letters, the rest kept
    assert docs[1].startswith("def the_quick_0(") and "return None" in docs[1]  # code
    words = docs[2].split(" ")  # repeat: one word 200 times, then a run of one character
    assert len(set(words[:200])) == 1 and len(set(words[-1])) == 1 and len(words[-1]) == 400
    assert docs[3].splitlines()[0] == ",".join(str(ord(c)) for c in "Second")  # digits
    assert docs[4] == to_script("Last one.")  # the kinds cycle
    assert shifted_text(BASE) == text and shifted_text(BASE, seed=1) != text
    assert not any("a" <= c <= "z" for c in to_script("the lazy dog"))


def test_chosen_kinds_and_bad_input():
    only = shifted_text(BASE, ("digits",))
    assert all(set(line) <= set("0123456789,") for line in only.split())
    with pytest.raises(ValueError, match="unknown shift kind"):
        shifted_text(BASE, ("emoji",))
    with pytest.raises(ValueError, match="empty"):
        shifted_text("\n\n")
    assert set(SHIFT_KINDS) == {"script", "code", "repeat", "digits"}
