"""Same config, same seed, same CPU: the same metrics, whatever the SFT cache held."""

from __future__ import annotations

import math

import pytest

from helpers import FAST


def metric_histories(tracking_uri: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run name -> metric -> [(step, value)] in step order, timing metrics (perf/*) left out."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.status == "FINISHED"
        out[run.info.run_name] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
            if not key.startswith("perf/")
        }
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.slow
def test_two_runs_with_one_seed_log_the_same_metrics(run_cli, tracking_uri, tmp_path):
    """The first run trains the SFT warm start, the second finds it in the cache: a sweep's first
    job and its later jobs. Both must sample, score and step identically, to the last bit."""
    cache = {"GRPO_LAB_CACHE": str(tmp_path / "private-cache"), "OMP_NUM_THREADS": "1"}
    args = ["train", "seed=0", "num_threads=1", *FAST]
    first = run_cli(*args, "logger.run_name=first", env=cache)
    second = run_cli(*args, "logger.run_name=second", env=cache)
    assert "SFT warm start trained" in first.stderr + first.stdout
    assert "SFT warm start reused from cache" in second.stderr + second.stdout

    runs = metric_histories(tracking_uri)
    assert set(runs) == {"first", "second"}
    first_metrics, second_metrics = runs["first"], runs["second"]
    assert set(first_metrics) == set(second_metrics)
    for key in (
        "reward",
        "loss",
        "kl",
        "grad_norm",
        "eval/accuracy_final",
        "completions/mean_length",
    ):
        assert key in first_metrics  # what is compared includes the sampled and trained values
    differing = {
        key: (first_metrics[key], second_metrics[key])
        for key in first_metrics
        if len(first_metrics[key]) != len(second_metrics[key])
        or not all(
            s1 == s2 and same(v1, v2)
            for (s1, v1), (s2, v2) in zip(first_metrics[key], second_metrics[key])
        )
    }
    assert not differing, f"metrics that differ between the runs (first, second): {differing}"
