"""policy=pretrained: a save_pretrained directory loads in the configured dtype and trains via the CLI."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from grpo_lab.policy import load_pretrained, tiny_llama
from grpo_lab.sampling import KVCacheSampler
from helpers import FAST


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
