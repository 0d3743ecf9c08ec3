"""A run over 2 processes (DDP, gloo, CPU) computes what one process computes.

The equivalence runs use a scripted sampler: each prompt's G completions come from a fixed
table, so a DDP run over 2 ranks of B prompts and a single process over the same 2B prompts see
the same completions, and any difference in the weights comes from how the ranks combine their
losses. The rest is real: a tiny Llama, the arithmetic task, the accuracy+format rewards,
Lightning's DDP (forked processes for the in-test runs; the CLI run re-runs the command).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from grpo_lab import distributed
from grpo_lab.callbacks import RNGStates, saved_states_of_rank
from grpo_lab.config import ConfigError, validate
from grpo_lab.data import TaskDataModule
from grpo_lab.module import GRPOModule
from grpo_lab.policy import tiny_llama
from grpo_lab.sampling import GenerateSampler
from grpo_lab.sampling.base import Completions
from grpo_lab.tasks import ArithmeticTask
from grpo_lab.tasks.base import Example
from helpers import (
    FAST,
    LEARNING,
    cli_env,
    compose,
    cpu_trainer,
    module_of,
    points_of,
    runs_of,
    wait_for,
)

# The reference model is held in eval mode on purpose (it is never trained).
pytestmark = [
    pytest.mark.xdist_group("processes"),  # see pyproject's addopts
    pytest.mark.filterwarnings(
        "ignore:Found .* module\\(s\\) in eval mode", "ignore:.*does not have many workers"
    ),
]

G = 4
B = 2  # prompts per rank per rollout
WORLD = 2
ROLLOUTS = 3
TASK = ArithmeticTask(max_operand=9, eval_size=20, seed=0)
# Completions of different lengths (1 to 4 characters, then EOS), some numbers, some not: the
# rewards vary within a group (nonzero advantages) and token_mean differs from a row mean. About
# one completion in three is the true sum.
TABLE = ["7", "12", "x", "9 ", "13", "abcd", "1", "18", "5x", "10", "3", "zz", "11", " 6 "]


def table_completion(prompt: str, j: int) -> str:
    """Completion j of "a+b=": a function of the prompt text alone (the same in any process)."""
    code = sum(map(ord, prompt)) + 5 * j
    if code % 3 == 0:
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b))
    return TABLE[code % len(TABLE)]


class TableSampler:
    """A sampler that writes each prompt's completions from TABLE instead of sampling them."""

    temperature = 1.0
    max_new_tokens = 6

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def configure(self, tokenizer, model_impl: str) -> None:
        self.tokenizer = tokenizer

    def weights_changed(self) -> None:
        """The table does not depend on the weights."""

    def sample(self, model, prompt_ids, prompt_mask, num_samples, *, greedy=False) -> Completions:
        tok = self.tokenizer
        prompts = tok.batch_decode(prompt_ids, skip_special_tokens=True)
        rows = [
            tok(table_completion(p, j), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for p in prompts
            for j in range(num_samples)
        ]
        ids = torch.full((len(rows), self.max_new_tokens), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return Completions(
            prompt_ids=prompt_ids.repeat_interleave(num_samples, 0),
            prompt_mask=prompt_mask.repeat_interleave(num_samples, 0),
            completion_ids=ids,
            completion_mask=mask,
            truncated=torch.zeros(len(rows), dtype=torch.bool),
        )


def _as_is(batch):
    return batch


class FixedPrompts(TaskDataModule):
    """Rollout s uses steps[s]: split between the ranks (rank r takes its r-th slice), or, with
    ``same_on_every_rank``, all of steps[s] on every rank."""

    def __init__(self, steps: list[list[Example]], same_on_every_rank: bool = False) -> None:
        super().__init__(TASK, len(steps[0]), eval_size=7, eval_batch_size=2)
        self.steps = steps
        self.same_on_every_rank = same_on_every_rank

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.same_on_every_rank:
            rank, world = 0, 1
        per_rank = len(self.steps[0]) // world
        batches = [s[rank * per_rank : (rank + 1) * per_rank] for s in self.steps]
        return DataLoader(batches, batch_size=None, collate_fn=_as_is)


class Record(L.Callback):
    """Writes, per rank, the completion rows it trained on, its final weights and eval metrics."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[list[tuple[str, str]]] = []
        self.eval_prompts: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_rollout
        self.rows.append([(ex.prompt, t) for ex, t in zip(r.examples, r.texts)])

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}
        torch.save(
            {"rows": self.rows, "state": state}, self.out / f"train-rank{trainer.global_rank}.pt"
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.eval_prompts += [ex.prompt for ex in batch]

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["prompts"] = self.eval_prompts
        (self.out / f"eval-rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


def make_module(aggregation: str, sampler=None) -> GRPOModule:
    policy = tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, seed=0)
    return module_of(
        f"G={G}",
        "beta=0.04",
        f"aggregation={aggregation}",
        "train.max_grad_norm=1.0",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        f"train.rollouts={ROLLOUTS}",
        "train.dynamic_sampling=false",
        "train.shared_prefix=false",
        "sampler.max_new_tokens=6",  # TableSampler's
        # the config's rewards: the default accuracy + format
        policy=policy,
        task=TASK,
        sampler=sampler or TableSampler(policy.tokenizer),
    )


def run(module: GRPOModule, data: FixedPrompts, out: Path, devices: int, validate_only=False):
    """A real Lightning fit (or validate) on ``devices`` CPU processes, one thread each."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked ranks inherit it; 2 shared cores
    trainer = cpu_trainer(
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_steps=len(data.steps),
        limit_val_batches=1.0 if validate_only else 0,
        # Training prompts come from FixedPrompts; eval is left to Lightning's default (which
        # would put a padding DistributedSampler on the eval prompts) and data.EvalShard.
        use_distributed_sampler=validate_only,
        callbacks=[Record(out), RNGStates(seed=0)],
    )
    try:
        if validate_only:
            trainer.validate(module, datamodule=data, verbose=False)
        else:
            trainer.fit(module, datamodule=data)
    finally:
        torch.set_num_threads(threads)


def prompt_steps() -> list[list[Example]]:
    """ROLLOUTS steps of WORLD * B distinct prompts."""
    pool = TASK.train()
    return [pool[s * WORLD * B : (s + 1) * WORLD * B] for s in range(ROLLOUTS)]


# --------------------------------------------------------------------------- pure helpers


def test_rank_seeds_are_distinct_and_rank_zero_keeps_the_seed():
    assert distributed.rank_seed(5, 0) == 5  # a one-process run samples as before
    seeds = [distributed.rank_seed(5, r) for r in range(16)]
    assert len(set(seeds)) == 16
    assert distributed.rank_seed(5, 1) != distributed.rank_seed(6, 1)
    # a resumed run's ranks do not replay their first samples
    assert distributed.rank_seed(5, 1, step=10) != distributed.rank_seed(5, 1)
    assert distributed.rank_seed(5, 0, step=10) != 5
    assert all(0 <= s < 2**32 for s in seeds)


def test_each_rank_finds_its_own_rng_states_in_a_checkpoint():
    saved = RNGStates(seed=0).state_dict()  # one process: a list of one rank's states
    assert len(saved["ranks"]) == 1 and torch.equal(
        saved_states_of_rank(saved, 0)["torch"], torch.get_rng_state()
    )
    two = {"ranks": [{"torch": "rank 0"}, {"torch": "rank 1"}]}
    assert saved_states_of_rank(two, 1) == {"torch": "rank 1"}
    assert saved_states_of_rank(two, 2) is None  # resumed on more ranks: rank 2 reseeds
    # written before per-rank states: rank 0's alone, at the top level
    old = {"torch": "rank 0", "numpy": {}, "python": ()}
    assert saved_states_of_rank(old, 0) is old
    assert saved_states_of_rank(old, 1) is None


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),  # one process
        # torchrun: RANK is the global rank, whatever the node and local ranks
        ({"RANK": "0", "GROUP_RANK": "1", "LOCAL_RANK": "0"}, 0),
        ({"RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1"}, 3),
        # Lightning's launcher: the user starts node n with NODE_RANK=n and no LOCAL_RANK
        ({"NODE_RANK": "0"}, 0),
        ({"NODE_RANK": "1"}, 2),
        ({"NODE_RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, 3),
        ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, 1),  # the rank it starts beside rank 0
        ({"GROUP_RANK": "1"}, 2),
        # inside a Slurm allocation that did not start the ranks: Lightning's vars decide
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1", "NODE_RANK": "0"}, 1),
        ({"SLURM_PROCID": "0", "SLURM_NODEID": "1", "LOCAL_RANK": "0"}, 2),
        # srun started every rank
        ({"SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_LOCALID": "0"}, 0),
        ({"SLURM_PROCID": "5", "SLURM_NODEID": "2", "SLURM_LOCALID": "1"}, 5),
        ({"JSM_NAMESPACE_RANK": "2"}, 2),
        ({"NODE_RANK": ""}, 0),  # set but empty: unset
    ],
)
def test_the_launched_rank_is_zero_on_one_process_of_the_job_only(env, rank):
    assert distributed.launched_rank(env, devices_per_node=2) == rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 7, 8])
def test_eval_shards_score_every_prompt_exactly_once(world_size, n):
    shards = [list(distributed.EvalShard(range(n), r, world_size)) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # no padding, no repeats
    assert [len(distributed.EvalShard(range(n), r, world_size)) for r in range(world_size)] == [
        len(s) for s in shards
    ]


def test_helpers_are_the_identity_in_one_process():
    x = torch.tensor([3.0, 4.0])
    assert torch.equal(distributed.sum_over_ranks(x), x)
    # token_mean: the local count (over 1 rank) is the whole count
    assert distributed.token_mean_denominator(torch.tensor(17)) == 17.0
    assert distributed.mean_over_ranks({"reward": 0.5}) == {"reward": 0.5}


def test_rank_metrics_combine_as_means_maxima_and_minima():
    per_rank = [
        {"reward": 0.25, "completions/max_length": 4.0, "completions/min_length": 2.0,
         "sampling/logp_difference/max": 0.5, "rewards/format/mean": 1.0},
        {"reward": 0.75, "completions/max_length": 6.0, "completions/min_length": 1.0,
         "sampling/logp_difference/max": 0.125},
    ]  # fmt: skip
    assert distributed.combine_rank_metrics(per_rank) == {
        "reward": 0.5,  # (0.25 + 0.75) / 2
        "completions/max_length": 6.0,
        "completions/min_length": 1.0,
        "sampling/logp_difference/max": 0.5,
        "rewards/format/mean": 1.0,  # only rank 0 had completions this reward applied to
    }


@pytest.mark.parametrize("option", ["cpu", "gpu", "ddp", "ddp_spawn", "fsdp", "deepspeed"])
def test_trainer_options_compose(option):
    cfg = compose(
        f"trainer={option}", "trainer.precision=bf16-mixed", "trainer.devices=4", check=False
    )
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 4
    expected = {"cpu": "auto", "gpu": "auto", "deepspeed": "deepspeed_stage_2"}.get(option, option)
    assert cfg.trainer.strategy == expected
    assert cfg.trainer.max_epochs == -1  # the rest comes from trainer/default
    if option == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            with pytest.raises(
                ConfigError, match="trainer.strategy='deepspeed_stage_2'.*deepspeed"
            ):
                validate(cfg)
            return
        # installed or not, the GRPO step's clipping and gradient guard cannot see ZeRO's grads
        with pytest.raises(ConfigError, match="deepspeed_stage_2 is not supported yet"):
            validate(cfg)
        return
    if option == "fsdp":
        # Lightning's FSDP precision plugin refuses to clip by norm: say so before compute
        with pytest.raises(ConfigError, match=r"train.max_grad_norm=1.0 is invalid with trainer"):
            validate(cfg)
        cfg.train.max_grad_norm = None
    validate(cfg)


def test_unknown_precision_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' is invalid: expected one of "):
        validate(compose("trainer.precision=fp8", check=False))


@pytest.mark.parametrize(
    ("strategy", "devices", "refused"),
    [("ddp", 2, True), ("ddp", 1, False), ("ddp_spawn", 2, False), ("auto", 1, False)],
)
def test_a_sweep_refuses_a_strategy_that_re_runs_the_command(strategy, devices, refused):
    trainer = cpu_trainer(devices=devices, strategy=strategy)
    # a single run may re-run its command
    distributed.check_launch(trainer, False, strategy, devices)
    if refused:
        with pytest.raises(
            ConfigError,
            match="trainer.strategy='ddp' with trainer.devices=2 .* inside a -m sweep.*ddp_spawn",
        ):
            distributed.check_launch(trainer, True, strategy, devices)
    else:
        distributed.check_launch(trainer, True, strategy, devices)


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_ddp_over_two_ranks_ends_with_the_weights_of_one_process(tmp_path, aggregation):
    steps = prompt_steps()
    run(make_module(aggregation), FixedPrompts(steps), tmp_path / "ddp", devices=WORLD)
    run(make_module(aggregation), FixedPrompts(steps), tmp_path / "one", devices=1)
    ranks = [torch.load(tmp_path / "ddp" / f"train-rank{r}.pt") for r in range(WORLD)]
    one = torch.load(tmp_path / "one" / "train-rank0.pt")

    # Same completions: per rollout, the ranks' rows together are the single process's rows,
    # and no row is on two ranks.
    assert len(one["rows"]) == ROLLOUTS
    for s in range(ROLLOUTS):
        per_rank = [set(r["rows"][s]) for r in ranks]
        assert not per_rank[0] & per_rank[1]
        assert sorted(ranks[0]["rows"][s] + ranks[1]["rows"][s]) == sorted(one["rows"][s])

    start = make_module(aggregation).policy.state_dict()
    moved = 0.0
    for name, w in one["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(
            ranks[0]["state"][name], w, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved = max(moved, (w - start[name]).abs().max().item())
    assert moved > 1e-3  # the weights did move: the comparison is not between two starts


@pytest.mark.slow
def test_ranks_sample_different_completions_for_the_same_prompt(tmp_path):
    # Both ranks get the same prompts; with one seed for all ranks they drew the same samples.
    module = make_module("seq_mean_token_mean", sampler=GenerateSampler(max_new_tokens=6))
    run(module, FixedPrompts(prompt_steps()[:1], same_on_every_rank=True), tmp_path, WORLD)
    rows = [torch.load(tmp_path / f"train-rank{r}.pt")["rows"][0] for r in range(WORLD)]
    assert [p for p, _ in rows[0]] == [p for p, _ in rows[1]]
    assert [c for _, c in rows[0]] != [c for _, c in rows[1]]


@pytest.mark.slow
def test_eval_accuracy_is_over_every_rank_s_prompts(tmp_path):
    module = make_module("seq_mean_token_mean")
    data = FixedPrompts(prompt_steps())  # eval_size=7: shards of 4 and 3 prompts
    run(module, data, tmp_path, WORLD, validate_only=True)
    # Independently: the greedy completion is the table's first, scored on all 7 prompts.
    examples = TASK.eval()[:7]
    correct = sum(TASK.is_correct(table_completion(ex.prompt, 0), ex) for ex in examples)
    assert 0 < correct < 7  # a fraction that no single shard reproduces by chance
    metrics = [json.loads((tmp_path / f"eval-rank{r}.json").read_text()) for r in range(WORLD)]
    # The ranks split the work: each prompt scored once, on one rank.
    assert sorted(metrics[0]["prompts"] + metrics[1]["prompts"]) == sorted(
        e.prompt for e in examples
    )
    for r in range(WORLD):  # 3/7, where the shards alone score 1/4 and 2/3
        assert metrics[r]["eval/accuracy"] == pytest.approx(correct / 7, abs=1e-6), r


@pytest.mark.slow
def test_cli_ddp_run_logs_one_mlflow_run_with_eval_metrics(run_cli, tracking_uri, tmp_path):
    proc = run_cli(
        "train",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "num_threads=1",
        *FAST,
        env={"OMP_NUM_THREADS": "1"},
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 made no run of its own
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    for key in ("eval/accuracy", "eval/accuracy_start", "eval/accuracy_final", "reward", "loss"):
        assert key in run_.data.metrics, key
    # One run dir for both ranks (Lightning passes rank 0's hydra.run.dir to rank 1).
    assert len(list(tmp_path.glob("outputs/*/*"))) == 1
    (run_file,) = list(tmp_path.glob("outputs/*/*/mlflow_run.json"))
    assert json.loads(run_file.read_text())["run_id"] == run_.info.run_id
    output = proc.stdout + proc.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    # Rank 0 trains the warm start (or finds it cached) before rank 1 starts; rank 1 reuses it.
    assert output.count("SFT warm start trained") <= 1
    assert "SFT warm start reused from cache" in output


# 2 CPU ranks of the real CLI, one thread each; dynamic sampling on, so each rank also draws
# fresh prompts from its own stream (LEARNING's warm start leaves some groups dead).
DDP_CLI = [
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "num_threads=1",
    *(o for o in LEARNING if not o.startswith(("train.rollouts=", "train.dynamic_sampling="))),
    "train.dynamic_sampling=true",
    "train.rollouts=6",
    "resume=auto",
]


@pytest.mark.slow
def test_a_ddp_run_killed_midway_resumes_exactly_on_every_rank(
    run_cli, start_cli, tmp_path, tracking_uri
):
    """2 ranks, SIGTERM to the launching process once rollout 2 is checkpointed, then the same
    command again: every metric at every step equals an undisturbed 2-rank run's. The logged
    metrics are means over both ranks, so rank 1 drawing other samples after the resume (other
    completions, other fresh prompts) shows in reward, loss, kl and the lengths."""
    run_cli("train", *DDP_CLI, f"paths.output_dir={tmp_path / 'clean'}")
    out = tmp_path / "run"
    proc = start_cli("train", *DDP_CLI, f"paths.output_dir={out}")
    wait_for(proc, lambda: (out / "checkpoints" / "rollout-step=2.ckpt").is_file() or None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert 2 <= saved["grpo_rollouts_done"] < 6  # killed midway: rollouts are left to resume

    run_cli("train", *DDP_CLI, f"paths.output_dir={out}")
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id, clean_id = (
        json.loads((d / "mlflow_run.json").read_text())["run_id"] for d in (out, tmp_path / "clean")
    )
    assert client.get_run(run_id).info.status == "FINISHED"
    resumed, clean = points_of(client, run_id), points_of(client, clean_id)
    assert resumed.keys() == clean.keys()
    assert [s for s, _ in clean["rollout"]] == list(range(1, 7))
    # after the stop, some rank resampled dead groups: the fresh-prompt streams were drawn from
    resumed_at = saved["grpo_rollouts_done"]
    assert max(v for s, v in clean["dynamic_sampling/tries"] if s > resumed_at) > 1
    assert len({v for _, v in clean["loss"]}) > 1 and len({v for _, v in clean["reward"]}) > 1
    for key in clean:
        assert [s for s, _ in resumed[key]] == [s for s, _ in clean[key]], key
        if not key.startswith("perf/"):
            assert [v for _, v in resumed[key]] == pytest.approx([v for _, v in clean[key]]), key


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_nodes(tmp_path: Path, env: dict, command) -> list[subprocess.CompletedProcess]:
    """``command(node)`` on two "nodes" of one process each on this machine, started together
    with ``env`` plus NODE_RANK; both must exit 0 within 5 minutes."""
    procs = []
    for node in (0, 1):
        procs.append(
            subprocess.Popen(
                command(node),
                cwd=tmp_path,
                env={**env, "NODE_RANK": str(node), "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    try:
        for node, proc in enumerate(procs):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, (
                f"node {node} exited {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
            )
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def train_on_node(tmp_path: Path, node: int) -> list[str]:
    """The arguments of ``grpo-lab train`` on node ``node`` of 2 (one CPU process each)."""
    return [
        "train",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        "num_threads=1",
        *FAST,
        f"paths.output_dir={tmp_path / f'node{node}'}",  # as on machines of their own
    ]


def assert_one_finished_run(tracking_uri: str, tmp_path: Path, rank0_node: int = 0) -> None:
    """One MLflow run, FINISHED, with the run's metrics; noted and checkpointed on the node of
    global rank 0 (``rank0_node``) alone."""
    client, exp, runs = runs_of(tracking_uri)
    assert len(runs) == 1, [r.info.run_name for r in runs]  # node 1 made no run of its own
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert run_.data.params["trainer.num_nodes"] == "2"
    for key in ("eval/accuracy_start", "eval/accuracy_final", "reward", "loss"):
        assert key in run_.data.metrics, key
    assert [s for s, _ in points_of(client, run_.info.run_id)["rollout"]] == [1, 2]
    # only the node of global rank 0 notes the run beside its checkpoints and writes them
    noted = [
        d for d in (tmp_path / "node0", tmp_path / "node1") if (d / "mlflow_run.json").exists()
    ]
    assert noted == [tmp_path / f"node{rank0_node}"]
    assert json.loads((noted[0] / "mlflow_run.json").read_text())["run_id"] == run_.info.run_id
    assert (noted[0] / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / f"node{1 - rank0_node}").glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_two_nodes_under_lightning_s_launcher_log_one_mlflow_run(tmp_path, tracking_uri, cache_dir):
    """Lightning's own launcher over 2 nodes: the user starts the same command on each node with
    NODE_RANK and the rendezvous address; node 1's process has no LOCAL_RANK or RANK."""
    env = {**cli_env(tracking_uri, cache_dir), "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    for var in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "SLURM_PROCID"):
        env.pop(var, None)
    procs = run_two_nodes(
        tmp_path,
        env,
        lambda node: [sys.executable, "-m", "grpo_lab.cli", *train_on_node(tmp_path, node)],
    )
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in procs[1].stdout + procs[1].stderr
    assert_one_finished_run(tracking_uri, tmp_path)


@pytest.mark.slow
def test_two_nodes_under_torchrun_log_one_mlflow_run(tmp_path, tracking_uri, cache_dir):
    """torchrun on each of 2 nodes with a c10d rendezvous: it sets RANK, GROUP_RANK and
    LOCAL_RANK for the process it starts, and the rendezvous decides which node gets rank 0."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = cli_env(tracking_uri, cache_dir)
    for var in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    procs = run_two_nodes(
        tmp_path,
        env,
        lambda node: [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "-m",
            "grpo_lab.cli",
            *train_on_node(tmp_path, node),
        ],
    )
    # the node whose process printed the run's summary holds global rank 0
    (rank0_node,) = [n for n, p in enumerate(procs) if "[grpo-lab] checkpoints:" in p.stdout]
    assert_one_finished_run(tracking_uri, tmp_path, rank0_node)
