"""LoRA adapters through peft: only the adapters train, the base model doubles as the reference.

peft is an optional dependency (``pip install grpo-lab[lora]``), imported only when LoRA is on.
"""

from __future__ import annotations

from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def apply_lora(
    model: nn.Module,
    *,
    enabled: bool = False,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
) -> nn.Module:
    """The model wrapped with LoRA adapters (``policy.lora.*``), or the model as is when disabled.

    Only the adapter weights require grad afterwards; the base weights are frozen.
    dropout: 0 only. GRPOModule keeps the policy in eval mode (pi_old, pi_theta and pi_ref must be
    the same function of the weights), so LoRA dropout would never apply; 0 is still accepted
    because the saved configs of runs from before the key was removed hold it.
    """
    if dropout:
        raise ValueError(
            f"policy.lora.dropout={dropout} is not supported: LoRA dropout never applies, "
            "the policy stays in eval mode so that pi_old == pi_theta"
        )
    if not enabled:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(
            "policy.lora.enabled=true needs peft: pip install grpo-lab[lora]"
        ) from err
    if r < 1:
        raise ValueError(f"policy.lora.r={r} is invalid: expected an integer >= 1")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    """Whether the model carries peft adapters (whose base model can serve as the reference)."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")
