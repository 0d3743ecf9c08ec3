"""policy=pretrained: a save_pretrained directory loads in the configured dtype and trains via the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from mlflow import MlflowClient

from grpo_lab.config import FLOAT16_INSTEAD, FLOAT16_WHY, ConfigError, validate
from grpo_lab.paths import config_dir
from grpo_lab.policy import load_pretrained, tiny_llama
from grpo_lab.policy.build import check_trainable_dtype
from grpo_lab.sampling import KVCacheSampler
from helpers import FAST, compose, points_of


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama and its char tokenizer written by save_pretrained."""
    path = tmp_path_factory.mktemp("pretrained") / "tiny"
    tiny_llama(hidden_size=32, intermediate_size=64, seed=3).save(path)
    return path


def test_dtype_bfloat16_loads_every_parameter_in_bf16(saved):
    policy = load_pretrained(str(saved), dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    assert policy.model.config._attn_implementation == "eager"
    default = load_pretrained(str(saved))
    assert {p.dtype for p in default.model.parameters()} == {torch.float32}
    # the same weights, rounded to bf16
    w32 = default.model.model.embed_tokens.weight
    torch.testing.assert_close(policy.model.model.embed_tokens.weight, w32.to(torch.bfloat16))
    # and a bf16 policy samples (the sampler works on float32 logits)
    enc = policy.tokenizer(["1+2=", "33+4="], return_tensors="pt", padding=True)
    c = KVCacheSampler(max_new_tokens=3).sample(
        policy.model, enc["input_ids"], enc["attention_mask"], 2
    )
    assert c.completion_ids.shape[0] == 4 and c.sampling_logp.dtype == torch.float32


def test_an_unknown_dtype_names_the_allowed_values(saved):
    with pytest.raises(ValueError, match="policy.dtype='float8'; allowed: float32, bfloat16"):
        load_pretrained(str(saved), dtype="float8")


@pytest.mark.slow
def test_one_training_run_from_a_saved_directory_logs_to_mlflow(run_cli, tracking_uri, saved):
    overrides = [o for o in FAST if not o.startswith(("policy.", "sft.", "train.rollouts"))]
    run_cli(
        "train",
        *overrides,
        "policy=pretrained",
        f"policy.name_or_path={saved}",
        "sft.enabled=false",
        "train.rollouts=1",
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["policy._target_"] == "grpo_lab.policy.load_pretrained"
    assert params["policy.name_or_path"] == str(saved)
    assert "reward" in run.data.metrics and "eval/accuracy_final" in run.data.metrics


# --------------------------------------------------------------------------- float16

FLOAT16_REFUSED = (
    "invalid config:\n"
    f"  policy.dtype=float16 is invalid for training: {FLOAT16_WHY}; {FLOAT16_INSTEAD}. "
    "(grpo-lab eval takes policy.dtype=float16, and so does training LoRA adapters, "
    "policy.lora.enabled=true, without the SFT warm start)\n"
)


@pytest.mark.slow
@pytest.mark.parametrize(("command", "model_impl"), [("train", "auto"), ("sft", "transformers")])
def test_float16_training_is_refused_before_any_compute(
    run_cli, tmp_path, tracking_uri, cache_dir, saved, command, model_impl
):
    """Without the check, AdamW on float16 weights made the GRPO loss NaN at rollout 2 (with
    either policy.model_impl), after the MLflow run, the warm start and an eval had run."""
    cached = set(cache_dir.rglob("*"))
    proc = run_cli(
        command,
        *(o for o in FAST if not o.startswith("policy.")),
        "policy=pretrained",
        f"policy.name_or_path={saved}",
        "policy.dtype=float16",
        f"policy.model_impl={model_impl}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == FLOAT16_REFUSED
    # nothing trained or logged: no MLflow experiment, no checkpoint, no warm start cached
    assert MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name("grpo_lab") is None
    assert not list(tmp_path.glob("outputs/**/*.ckpt"))
    assert set(cache_dir.rglob("*")) == cached


def eval_config(tmp_path, *overrides: str):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")  # the config check wants an existing file; nothing reads it here
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return hydra_compose("eval", overrides=[f"ckpt={ckpt}", *overrides])


def test_float16_is_refused_only_where_float16_weights_would_train(tmp_path):
    pretrained = ["policy=pretrained", "policy.name_or_path=some/model", "policy.dtype=float16"]
    with pytest.raises(ConfigError) as err:
        validate(compose(*pretrained, check=False))
    assert str(err.value) + "\n" == FLOAT16_REFUSED
    # LoRA keeps its adapters in float32: fine without the warm start, which trains everything
    lora = [*pretrained, "policy.lora.enabled=true"]
    compose(*lora, "sft.enabled=false")
    with pytest.raises(ConfigError, match=r"policy.dtype=float16 with sft.enabled=true is invalid"):
        validate(compose(*lora, check=False))
    # Lightning's true half precision casts the float32 weights to float16
    with pytest.raises(ConfigError, match=r"trainer.precision=16-true is invalid for training"):
        validate(compose("trainer.precision=16-true", check=False))
    compose("trainer.precision=16-mixed")  # float32 weights, float16 compute
    compose(*pretrained[:2], "policy.dtype=bfloat16")
    validate(eval_config(tmp_path, *pretrained))  # eval trains nothing


def test_a_policy_with_float16_trainable_weights_is_refused(saved):
    """What policy.dtype=auto loads from a float16 checkpoint, which the config cannot know."""
    half = tiny_llama(hidden_size=32, intermediate_size=64, seed=0).model.half()
    with pytest.raises(ConfigError, match=r"policy.dtype=auto gave the policy float16 weights"):
        check_trainable_dtype(half, "auto")
    check_trainable_dtype(tiny_llama(hidden_size=32, intermediate_size=64, seed=0).model, "auto")
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    adapted = load_pretrained(str(saved), dtype="float16", lora=lora).model
    assert {p.dtype for p in adapted.parameters() if not p.requires_grad} == {torch.float16}
    check_trainable_dtype(adapted, "float16")  # float32 adapters on a float16 model train


@pytest.mark.slow
def test_lora_adapters_on_a_float16_model_train_to_finite_losses(run_cli, tracking_uri, saved):
    overrides = [o for o in FAST if not o.startswith(("policy.", "sft.", "train.rollouts"))]
    run_cli(
        "train",
        *overrides,
        "policy=pretrained",
        f"policy.name_or_path={saved}",
        "policy.dtype=float16",
        "policy.lora.enabled=true",
        "sft.enabled=false",
        "reward=length",  # rewards that differ within a group: the adapters get gradients
        "train.rollouts=4",
        "train.warmup_steps=0",
        "train.lr=1e-2",
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    assert run.info.status == "FINISHED"
    points = points_of(client, run.info.run_id)
    assert [s for s, _ in points["loss"]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "kl", "entropy"):
        assert all(math.isfinite(v) for _, v in points[key]), (key, points[key])
    assert max(v for _, v in points["grad_norm"]) > 0  # it trained, not a run of zero gradients
    assert max(v for _, v in points["kl"]) > 0  # and the adapters moved off the reference
