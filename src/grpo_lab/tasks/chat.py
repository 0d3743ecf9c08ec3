"""Rendering task prompts for the policy: through the tokenizer's chat template, or as is."""

from __future__ import annotations

from typing import Any

_CHOICES = {"auto": "auto", "true": True, "false": False, True: True, False: False}


def render_prompts(
    tokenizer: Any,
    prompts: list[str],
    *,
    system_prompt: str | None,
    use_chat_template: str | bool = "auto",
) -> list[str]:
    """The text the policy continues for each prompt.

    use_chat_template: "auto" applies the tokenizer's chat template when it has one; true
    always does (an error when it has none); false never does. With a template, each prompt
    is one user message (after a system message when ``system_prompt`` is given), rendered
    with ``add_generation_prompt=True``. Without one, the system prompt and a newline come
    before the prompt.
    """
    key = use_chat_template.lower() if isinstance(use_chat_template, str) else use_chat_template
    if key not in _CHOICES:
        raise ValueError(
            f"use_chat_template={use_chat_template!r} is invalid; allowed: auto, true, false"
        )
    mode = _CHOICES[key]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode is True and not has_template:
        raise ValueError(
            f"use_chat_template=true but the tokenizer ({type(tokenizer).__name__}) has no chat_template; "
            "use a chat model's tokenizer, set tokenizer.chat_template, or use_chat_template=auto/false"
        )
    if mode is False or not has_template:
        return [f"{system_prompt}\n{p}" if system_prompt else p for p in prompts]
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(
            [*head, {"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def encode_prompts(
    tokenizer: Any, examples: list[Any], task: Any, use_chat_template: Any
) -> dict[str, Any]:
    """Left-padded prompt ids and attention mask (B, P) of the examples, rendered as SFT, GRPO and
    eval render them (chat template, the task's system prompt)."""
    texts = render_prompts(
        tokenizer,
        [ex.prompt for ex in examples],
        system_prompt=getattr(task, "system_prompt", None),
        use_chat_template=use_chat_template,
    )
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
