"""The char-level tokenizer loads offline through AutoTokenizer as a fast tokenizer and round-trips text."""

import pytest
from transformers import AutoTokenizer

from optimizer.zoo import zoo_models
from optimizer.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode, save_tokenizer

TEXTS = ["add:12345+678=", "rev:hello=", "sort:zyx=", "copy: a b=", "0123456789", ""]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_loads_as_fast_tokenizer_with_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_one_token_per_char(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids == [BOS_ID, *encode(text)]
    assert len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids[1:])) == text


def test_eos_is_dropped_when_decoding(tokenizer):
    assert tokenizer.decode([*encode("abc"), EOS_ID, PAD_ID], skip_special_tokens=True) == "abc"


def test_shipped_models_carry_the_same_tokenizer(tokenizer):
    for folder in zoo_models().values():
        shipped = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert shipped.get_vocab() == tokenizer.get_vocab()
