"""render_prompts: chat templates applied (auto / true) or not (false), with a real tokenizer."""

from __future__ import annotations

import pytest

from grpo_lab.policy.tokenizer import char_tokenizer
from grpo_lab.tasks import render_prompts

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_auto_applies_the_template_with_a_generation_prompt(chat_tokenizer):
    got = render_prompts(chat_tokenizer, ["2+2=", "9.9 or 9.11?"], system_prompt="Be brief.")
    assert got == [
        "<|system|>Be brief.\n<|user|>2+2=\n<|assistant|>",
        "<|system|>Be brief.\n<|user|>9.9 or 9.11?\n<|assistant|>",
    ]
    assert render_prompts(chat_tokenizer, ["2+2="], system_prompt=None) == [
        "<|user|>2+2=\n<|assistant|>"
    ]


def test_auto_without_a_template_keeps_prompts_as_they_are():
    tok = char_tokenizer()
    assert not tok.chat_template
    assert render_prompts(tok, ["2+2="], system_prompt=None) == ["2+2="]
    assert render_prompts(tok, ["2+2="], system_prompt="Be brief.") == ["Be brief.\n2+2="]


def test_false_never_applies_the_template(chat_tokenizer):
    got = render_prompts(chat_tokenizer, ["2+2="], system_prompt=None, use_chat_template=False)
    assert got == ["2+2="]
    assert render_prompts(
        chat_tokenizer, ["2+2="], system_prompt=None, use_chat_template="false"
    ) == ["2+2="]


def test_true_requires_a_template(chat_tokenizer):
    assert render_prompts(chat_tokenizer, ["x"], system_prompt=None, use_chat_template=True) == [
        "<|user|>x\n<|assistant|>"
    ]
    with pytest.raises(
        ValueError, match="use_chat_template=true but the tokenizer .* has no chat_template"
    ):
        render_prompts(char_tokenizer(), ["x"], system_prompt=None, use_chat_template="true")


def test_unknown_mode_names_the_allowed_values(chat_tokenizer):
    with pytest.raises(
        ValueError, match=r"use_chat_template='always' is invalid; allowed: auto, true, false"
    ):
        render_prompts(chat_tokenizer, ["x"], system_prompt=None, use_chat_template="always")


def test_rendered_prompt_round_trips_through_the_tokenizer(chat_tokenizer):
    (text,) = render_prompts(chat_tokenizer, ["Use 3 7 25 to make 66:"], system_prompt="Solve.")
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.decode(ids) == text
