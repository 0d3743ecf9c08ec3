"""benchmarks/speed.py: its FLOP count, and a --quick smoke run that writes a SPEED.md."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from grpo_lab.policy import tiny_llama
from helpers import ROOT, THREADS_PER_WORKER


def load_speed():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed"] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def test_forward_flops_match_torchs_count_of_the_models_matmuls():
    speed = load_speed()
    w = speed.Workload("t", layers=2, width=32, heads=2, mlp=64)
    model = tiny_llama(
        hidden_size=w.width,
        num_layers=w.layers,
        num_heads=w.heads,
        intermediate_size=w.mlp,
    ).model
    model.config._attn_implementation = "eager"  # attention as plain matmuls torch can count
    rows, prompt, completion = 3, 5, 4
    n = prompt + completion
    ids = torch.randint(4, model.config.vocab_size, (rows, n))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, logits_to_keep=completion)
    counted = counter.get_total_flops()
    # Eager attention multiplies the full (n x n) score matrix, masked or not: QK^T and AV are
    # 2 x (n x n x d) multiply-adds per layer. The benchmark counts only the causal half,
    # n(n+1)/2 pairs, which is what has to be computed.
    full_attention = 2 * rows * w.layers * 2 * n * n * w.width
    causal_attention = 2 * rows * w.layers * 2 * w.width * n * (n + 1) / 2
    expected = counted - full_attention + causal_attention
    got = speed.forward_flops(w, model.config.vocab_size, prompt, completion, rows)
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_quick_run_writes_a_speed_report_with_every_runner(tmp_path):
    pytest.importorskip("trl", reason="the benchmark compares with TRL: pip install -e '.[bench]'")
    pytest.importorskip(
        "datasets", reason="TRL's trainer needs datasets: pip install -e '.[bench]'"
    )
    out = tmp_path / "SPEED.md"
    speed = load_speed()
    runners = [*speed.GRPO_LAB_RUNNERS, "trl", "plain"]  # the default runners
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--quick",
            "--workloads",
            "tiny",
            "--runners",
            *runners,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS_PER_WORKER)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "Smoke run (`--quick`)" in text  # a smoke run says it is not the figures
    for line in ("- machine: ", "- versions: ", "- fp32 matmul rate: ", "- command: "):
        assert line in text, line

    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")}
    # | tiny | beta | runner | s/step | tokens/s | RSS | sample | reward | ref | old | update |
    row = r"^\| tiny \| ([\d.]+) \| (\S+) \| ([\d.e+-]+) \| ([\d.e+-]+) \|"
    rows = re.findall(row, sections["Seconds per step"], re.M)
    assert {(beta, runner) for beta, runner, *_ in rows} == {
        (beta, r) for beta in ("0.04", "0") for r in runners
    }, rows
    assert all(float(s) > 0 and float(tps) > 0 for *_, s, tps in rows), rows

    steps = {(beta, runner): float(s) for beta, runner, s, _ in rows}
    ratio_section = next(v for k, v in sections.items() if k.startswith("Ratios"))
    # | tiny | beta | grpo_lab runner | / TRL | / plain | / limit | / limit |
    ratios = re.findall(row, ratio_section, re.M)
    assert len(ratios) == 2 * (len(runners) - 2), ratios
    for beta, runner, over_trl, over_plain in ratios:
        # each value in the tables is rounded to 3 significant figures: 3 x 0.5% at most
        assert float(over_trl) == pytest.approx(steps[beta, runner] / steps[beta, "trl"], rel=0.02)
        assert float(over_plain) == pytest.approx(
            steps[beta, runner] / steps[beta, "plain"], rel=0.02
        )
    assert "## FLOP-bound limit" in text


def test_grpo_lab_runner_names_map_to_the_options_they_claim():
    speed = load_speed()
    assert speed.parse_grpo_lab_runner("grpo_lab[kv_cache]") == (
        "kv_cache",
        {"model_impl": "auto", "shared_prefix": True, "compile": False},
    )
    assert speed.parse_grpo_lab_runner("grpo_lab[kv_cache,transformers,unshared]") == (
        "kv_cache",
        {"model_impl": "transformers", "shared_prefix": False, "compile": False},
    )
    assert speed.parse_grpo_lab_runner("grpo_lab[generate,compile]")[1]["compile"] is True
    with pytest.raises(ValueError, match="unknown grpo_lab runner"):
        speed.parse_grpo_lab_runner("grpo_lab[kv_cache,fast]")
