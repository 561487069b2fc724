"""Tokenizer conventions read from the tokenizer itself: does it add BOS, append EOS."""
from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from mpq.calibration.conventions import TokenConventions, bos_note, eval_bos, token_conventions
from mpq.errors import OptionError
from tests.helpers import BOS_ID, bos_tokenizer, byte_tokenizer


def declared_bos_only():
    """A BOS token declared but never added (as GPT-2's tokenizer does)."""
    return PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer().backend_tokenizer,
                                   unk_token="<0>", eos_token="<1>", bos_token="<2>")


def test_a_tokenizer_that_adds_bos():
    assert token_conventions(bos_tokenizer()) == TokenConventions(bos_id=BOS_ID,
                                                                 appends_eos=False)
    assert bos_tokenizer()("ab")["input_ids"] == [BOS_ID, 97, 98]


def test_a_tokenizer_that_adds_bos_and_appends_eos():
    conventions = token_conventions(bos_tokenizer(appends_eos=True))
    assert conventions == TokenConventions(bos_id=BOS_ID, appends_eos=True)
    assert conventions.prefix == [BOS_ID]  # the EOS is never part of what mpq puts in


@pytest.mark.parametrize("make", [byte_tokenizer, declared_bos_only])
def test_tokenizers_that_add_none(make):
    conventions = token_conventions(make())
    assert conventions == TokenConventions(bos_id=None, appends_eos=False)
    assert conventions.prefix == []


def test_a_saved_and_reloaded_tokenizer_keeps_its_convention(tmp_path):
    from mpq.models.source import load_tokenizer

    bos_tokenizer().save_pretrained(tmp_path)
    assert token_conventions(load_tokenizer(tmp_path)).bos_id == BOS_ID


def test_eval_bos_follows_the_tokenizer_unless_overridden():
    assert eval_bos(bos_tokenizer(), None) == BOS_ID
    assert eval_bos(bos_tokenizer(), False) is None
    assert eval_bos(byte_tokenizer(), None) is None
    assert eval_bos(declared_bos_only(), True) == BOS_ID  # forced: the declared BOS
    with pytest.raises(OptionError, match="--bos: the model's tokenizer has no BOS token"):
        eval_bos(byte_tokenizer(), True)


def test_bos_note():
    assert bos_note({"sha256": "x"}) == ""
    assert bos_note({"bos_token_id": 2}) == ", each sample begins with BOS (id 2)"
