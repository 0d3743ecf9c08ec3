"""The character tokenizer and the save / load_pretrained round trip of a policy."""

from __future__ import annotations

import string

import pytest
import torch

from grpo_lab.policy import Policy, char_tokenizer, load_pretrained, tiny_llama
from grpo_lab.policy.tokenizer import CHARSET, UNK

PRINTABLE = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
TEXTS = [
    "37+45=82",
    "12 * 3 = 36?\n",
    "a, b. c - d\n\n\nnext line",
    "  leading and trailing spaces  ",
    "\n\n",
    "",
    PRINTABLE,
    PRINTABLE[::-1],
]


def roundtrip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text))


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode_one_token_per_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)  # no BOS/EOS added, no merges, no dropped whitespace
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_every_printable_character_has_its_own_token(tokenizer):
    assert set(CHARSET) == set(PRINTABLE)
    ids = [tokenizer.encode(c) for c in PRINTABLE]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(PRINTABLE)
    assert len(tokenizer) == len(PRINTABLE) + 4  # plus <pad>, <s>, </s>, <unk>


def test_unknown_characters_become_one_unk_each(tokenizer):
    ids = tokenizer.encode("1\t2é3")
    unk = tokenizer.unk_token_id
    assert ids == [
        tokenizer.encode("1")[0],
        unk,
        tokenizer.encode("2")[0],
        unk,
        tokenizer.encode("3")[0],
    ]
    assert tokenizer.decode(ids) == f"1{UNK}2{UNK}3"


def test_special_tokens_are_distinct_and_prompts_pad_on_the_left(tokenizer):
    special = {
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    }
    assert len(special) == 4
    batch = tokenizer(["1+2=", "10+20="], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny policy written by Policy.save, and where it went."""
    policy = tiny_llama(hidden_size=32, intermediate_size=64, seed=3)
    path = tmp_path_factory.mktemp("policy") / "saved"
    policy.save(path)
    return policy, path


@pytest.fixture(scope="module")
def loaded(saved):
    """The saved policy read back through the real from_pretrained path."""
    return load_pretrained(str(saved[1]))


@pytest.mark.parametrize("text", TEXTS)
def test_loaded_tokenizer_still_round_trips(saved, loaded, text):
    original, _ = saved
    assert loaded.tokenizer.encode(text) == original.tokenizer.encode(text)
    assert roundtrip(loaded.tokenizer, text) == text


def test_loaded_policy_keeps_special_tokens_padding_side_and_logits(saved, loaded):
    original, _ = saved
    assert isinstance(loaded, Policy)
    tok, ref_tok = loaded.tokenizer, original.tokenizer
    assert tok.padding_side == "left"
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(tok, name) == getattr(ref_tok, name), name
    assert tok.encode("é") == [ref_tok.unk_token_id]

    batch = ref_tok(["37+45=", "1*2="], padding=True, return_tensors="pt")
    original.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        expected = original.model(**batch).logits
        got = loaded.model(**batch).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_load_pretrained_of_a_missing_directory_names_the_config_key(tmp_path):
    missing = tmp_path / "no-such-policy"
    with pytest.raises(FileNotFoundError, match="policy.name_or_path") as err:
        load_pretrained(str(missing))
    assert str(missing) in str(err.value)


def test_load_pretrained_rejects_an_unknown_dtype(saved):
    _, path = saved
    with pytest.raises(ValueError, match="policy.dtype='float8'.*allowed"):
        load_pretrained(str(path), dtype="float8")
