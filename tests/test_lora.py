"""LoRA through peft: only adapters train, and the base model (adapters off) is the reference."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.config import ConfigError
from grpo_lab.data import TaskDataModule
from grpo_lab.module import GRPOModule
from grpo_lab.policy import tiny_llama
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sampling import KVCacheSampler
from grpo_lab.tasks import ArithmeticTask
from grpo_lab.train import build_module
from helpers import FAST, compose, cpu_trainer, module_of

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
G = 4


def count_ones(completions, examples, **ctx) -> list[float]:
    """A reward with variance inside every group even for an untrained model."""
    return [float(c.count("1") + c.count("2")) for c in completions]


def lora_policy(seed: int = 0):
    return tiny_llama(hidden_size=32, intermediate_size=64, seed=seed, lora=LORA)


# The old AlgoConfig(G=4, max_grad_norm=None) / OptimConfig(lr=1e-2) of these tests.
BASE = (
    f"G={G}",
    "train.max_grad_norm=null",
    "train.dynamic_sampling=false",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "train.prompts_per_step=2",
    "sampler.max_new_tokens=6",
    "policy.lora.enabled=true",
)


def make_module(policy, *overrides: str, beta: float = 0.04) -> GRPOModule:
    return module_of(
        *BASE,
        f"beta={beta}",
        *overrides,
        policy=policy,
        task=ArithmeticTask(max_operand=9, eval_size=20, seed=0),
        rewards=RewardSet({"ones": count_ones}),
        sampler=KVCacheSampler(max_new_tokens=6, temperature=1.0),
    )


def test_only_the_adapter_weights_require_grad():
    model = lora_policy().model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("embed_tokens.weight") for n in frozen)
    assert any(n.endswith("q_proj.base_layer.weight") for n in frozen)
    assert not any("lora_" in n for n in frozen)


def test_disabled_lora_leaves_the_plain_model():
    model = tiny_llama(hidden_size=32, intermediate_size=64, lora={**LORA, "enabled": False}).model
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config")


def test_the_reference_is_the_base_model_with_adapters_disabled_and_no_copy():
    plain = tiny_llama(hidden_size=32, intermediate_size=64, seed=0).model.eval()  # same init
    policy = lora_policy(seed=0)
    with torch.no_grad():  # non-zero adapters, so the policy differs from its base
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    module = make_module(policy, beta=0.04)
    assert module.reference_model is None and module.algo.kl.active
    assert sum(1 for _ in module.modules() if isinstance(_, torch.nn.Embedding)) == 1
    torch.manual_seed(0)
    rollout = module.make_rollout(module.task.train()[:3])
    c = rollout.completions
    base_logp, _ = completion_logprobs(plain, c)
    policy_logp, _ = completion_logprobs(module.policy, c)
    mask = c.completion_mask.bool()
    torch.testing.assert_close(rollout.ref_logp[mask], base_logp[mask], atol=1e-5, rtol=0)
    assert (policy_logp[mask] - base_logp[mask]).abs().max() > 1e-2, "adapters must matter"
    # the adapters are switched back on afterwards
    again, _ = completion_logprobs(module.policy, c)
    torch.testing.assert_close(again, policy_logp)


def test_ref_sync_is_refused_with_lora():
    # the config check refuses it before any compute ...
    with pytest.raises(ConfigError, match="train.ref_sync_every=2 is invalid with policy.lora"):
        make_module(lora_policy(), "train.ref_sync_every=2", beta=0.04)
    # ... and so does the module, built from a config that skipped the check
    cfg = compose(*BASE, "beta=0.04", "train.ref_sync_every=2", check=False)
    with pytest.raises(ValueError, match="train.ref_sync_every=2 needs a separate reference"):
        build_module(cfg, policy=lora_policy(), rewards=RewardSet({"ones": count_ones}))


def test_one_grpo_step_moves_the_adapters_and_not_the_base_weights():
    module = make_module(lora_policy(), beta=0.04)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = cpu_trainer(max_steps=1)
    torch.manual_seed(0)
    trainer.fit(module, datamodule=TaskDataModule(module.task, 2, 4, 4, seed=0))
    assert module.rollouts_done == 1
    assert module.last_rollout.advantages.abs().sum() > 0, "the step must carry a signal"
    after = dict(module.policy.named_parameters())
    for name, old in before.items():
        moved = not torch.equal(after[name], old)
        if "lora_B" in name:  # B starts at 0, so only B gets a gradient on the first step
            assert moved, f"{name} did not change"
        elif "lora_" not in name:
            assert not moved, f"base weight {name} changed"


@pytest.mark.slow
def test_one_training_run_with_lora_logs_to_mlflow(run_cli, tracking_uri):
    from mlflow import MlflowClient

    overrides = [o for o in FAST if not o.startswith(("train.rollouts", "train.eval_every"))]
    run_cli("train", *overrides, "policy.lora.enabled=true", "train.rollouts=1")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["policy.lora.enabled"] == "True"
    assert "reward" in run.data.metrics and "kl" in run.data.metrics
