"""Building and loading the policy (model + tokenizer)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from grpo_lab.config import FLOAT16_INSTEAD, FLOAT16_WHY, ConfigError
from grpo_lab.policy.lora import apply_lora
from grpo_lab.policy.tokenizer import char_tokenizer


@dataclass
class Policy:
    """A causal LM and the tokenizer that goes with it.

    use_chat_template: how prompts are rendered (``tasks.chat.render_prompts``): auto | true | false.
    model_impl: whose forward runs the model in sampling and training: "auto" = grpo_lab's own
    (``sampling.native``) where the architecture is supported, else transformers';
    "transformers" = always transformers'. The same numbers up to float rounding.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    use_chat_template: str | bool = "auto"
    model_impl: str = "auto"

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Sampling pads prompts on the left so every row's completion starts at the same column.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


MODEL_IMPLS = ("auto", "transformers")


def _finish(
    policy: Policy,
    lora: Mapping[str, Any] | None,
    use_chat_template: str | bool,
    model_impl: str = "auto",
) -> Policy:
    """Apply the ``policy.lora`` adapters (when enabled), the prompt-rendering mode and
    ``policy.model_impl``."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"policy.model_impl={model_impl!r}; allowed: {', '.join(MODEL_IMPLS)}")
    policy.model = apply_lora(policy.model, **dict(lora or {}))
    policy.use_chat_template = use_chat_template
    policy.model_impl = model_impl
    return policy


def tiny_llama(
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 128,
    seed: int = 0,
    init_from: str | None = None,
    lora: Mapping[str, Any] | None = None,
    use_chat_template: str | bool = "auto",
    model_impl: str = "auto",
) -> Policy:
    """A small Llama-architecture model with the character tokenizer, built in code.

    init_from: a directory written by ``Policy.save`` (e.g. the SFT warm start); when given,
    the weights and tokenizer are loaded from there instead of initialised.
    lora: ``apply_lora`` keywords (``enabled``, ``r``, ``alpha``, ``dropout``, ``target_modules``).
    model_impl: see ``Policy``.
    """
    if init_from:
        return load_pretrained(
            init_from, lora=lora, use_chat_template=use_chat_template, model_impl=model_impl
        )
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    policy = Policy(model=model, tokenizer=_prepare_tokenizer(tokenizer))
    return _finish(policy, lora, use_chat_template, model_impl)


_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def load_pretrained(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    init_from: str | None = None,
    lora: Mapping[str, Any] | None = None,
    use_chat_template: str | bool = "auto",
    model_impl: str = "auto",
) -> Policy:
    """Any ``from_pretrained`` path or hub id (offline: a local directory).

    init_from: a directory written by ``Policy.save`` (the SFT warm start) to load instead of
    ``name_or_path``. lora: ``apply_lora`` keywords; use_chat_template, model_impl: see ``Policy``.
    """
    name_or_path = init_from or name_or_path
    if dtype not in _DTYPES:
        raise ValueError(f"policy.dtype={dtype!r}; allowed: {', '.join(_DTYPES)}")
    local = Path(name_or_path)
    if name_or_path.startswith((".", "/")) and not local.is_dir():
        raise FileNotFoundError(
            f"policy.name_or_path={name_or_path!r} is not a directory; give a directory written "
            "by save_pretrained (e.g. the SFT warm start) or a model hub id"
        )
    kwargs = dict(model_kwargs or {})
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    policy = Policy(model=model, tokenizer=_prepare_tokenizer(tokenizer))
    return _finish(policy, lora, use_chat_template, model_impl)


def check_trainable_dtype(model: nn.Module, dtype_setting: Any) -> None:
    """Refuse float16 trainable weights (``config.float16_training_errors`` says why). The config
    check catches ``policy.dtype=float16``; this catches the weights ``policy.dtype=auto`` loads
    from a float16 checkpoint (or a custom policy builds)."""
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise ConfigError(
            f"invalid config:\n  policy.dtype={dtype_setting} gave the policy float16 weights, "
            f"which cannot be trained: {FLOAT16_WHY}; {FLOAT16_INSTEAD}"
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, eval-mode copy of a model for the reference policy."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def reference_policy(
    policy: nn.Module, given: nn.Module | None, kl_active: bool, ref_sync_every: int
) -> nn.Module | None:
    """pi_ref for the KL term: ``given``, or a frozen copy of the policy; None without a KL term,
    and None with LoRA, whose reference is the policy with its adapters disabled (no copy)."""
    from grpo_lab.policy.lora import is_lora

    lora_base = given is None and is_lora(policy)
    if kl_active and lora_base and ref_sync_every:
        raise ValueError(
            f"train.ref_sync_every={ref_sync_every} needs a separate reference model; with "
            "policy.lora.enabled=true the reference is the frozen base model: set "
            "train.ref_sync_every=0"
        )
    if not kl_active or lora_base:
        return None
    return given if given is not None else frozen_copy(policy)


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, local_files_only: bool = False
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer``, except that a directory saved from a generic fast tokenizer (such as
    our char tokenizer) loads as one: transformers 5 may otherwise rebuild it as the model
    type's own class and silently drop characters (PITFALLS)."""
    cfg = Path(name_or_path) / "tokenizer_config.json"
    generic = ('"PreTrainedTokenizerFast"', '"TokenizersBackend"')
    if cfg.is_file() and any(g in cfg.read_text() for g in generic):
        return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, local_files_only=local_files_only
    )
