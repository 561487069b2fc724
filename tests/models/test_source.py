"""mpq.models.source: a tokenizer.json the tokenizers library cannot parse is one ModelError naming
the file; any other failure type keeps its traceback (a bug, not a bad input)."""
from __future__ import annotations

import json

import pytest

from mpq.errors import ModelError
from mpq.models.source import load_tokenizer
from tests.helpers import write_tokenizer


def test_a_corrupt_tokenizer_json_names_the_file(tmp_path):
    write_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["type"] = "NoSuchModel"  # valid JSON, not a tokenizer the library knows
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=f"{tmp_path}/tokenizer.json is not a valid tokenizer: "
                                         "data did not match any variant") as info:
        load_tokenizer(tmp_path)
    assert "restore tokenizer.json" in info.value.one_line()


def test_other_failures_are_not_reworded(tmp_path, monkeypatch):
    write_tokenizer(tmp_path)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", broken)
    with pytest.raises(ZeroDivisionError):
        load_tokenizer(tmp_path)
