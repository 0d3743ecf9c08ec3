"""reward=math_verify: math-verify decides equality; every completion is bounded in time, from
the main thread, a worker thread and a spawned (DDP- or joblib-like) process alike."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
import threading
import time

import pytest

from grpo_lab.rewards import MathVerifyReward, RewardSet
from grpo_lab.tasks import Example

pytest.importorskip("math_verify")

SLOW = r"\boxed{9^{9^{9^{9}}}}"  # parses at once; sympy then works on 9^(9^387420489) for hours
TIMEOUT_S = 1.5

# (completion, gold, expected score). Expected values are what the mathematics says, with
# math-verify's documented rules where a rule decides: several \boxed{} in one completion form
# one set (so a completion that boxes 2 and then 3 matches neither 2 nor 3, only {2, 3}).
CASES = [
    # equivalent forms
    (r"The answer is \boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    ("so it is 1/2", r"\frac{1}{2}", 1.0),
    (r"$\frac{2}{4}$", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{\{1,2\}}", "{1,2}", 1.0),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    ("50%", r"50\%", 1.0),
    (r"\boxed{50\%}", r"50\%", 1.0),
    ("50", r"50\%", 1.0),  # a percentage gold accepts the bare number
    ("The total is 1,000", "1000", 1.0),
    ("The total is 1,234,567", "1234567", 1.0),
    (r"\boxed{1000}", "1,000", 1.0),
    (r"$\frac{6}{2}$", "3", 1.0),
    (r"\boxed{3.0}", "3", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{\frac{\pi}{2}}", r"\frac{\pi}{2}", 1.0),
    ("Final answer: 42", "42", 1.0),
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{(1,2)}", "(1,2)", 1.0),
    (r"\boxed{0.3333333333}", r"\frac{1}{3}", 1.0),
    # wrong answers
    (r"\boxed{0.6}", r"\frac{1}{2}", 0.0),
    (r"\boxed{\{1,3\}}", r"\{1,2\}", 0.0),
    (r"\boxed{\sqrt{7}}", r"2\sqrt{2}", 0.0),
    (r"\boxed{7}", "-7", 0.0),
    ("The total is 1,001", "1000", 0.0),
    (r"\boxed{x^2+1}", "(x+1)^2", 0.0),
    (r"\boxed{\frac{\pi}{3}}", r"\frac{\pi}{2}", 0.0),
    (r"\boxed{3.01}", "3", 0.0),
    # several boxed answers: one set of all of them
    (r"\boxed{2} then \boxed{3}", "3", 0.0),
    (r"\boxed{2} then \boxed{3}", "2", 0.0),
    (r"\boxed{2} then \boxed{3}", r"\{2,3\}", 1.0),
    # malformed LaTeX
    (r"\boxed{\frac{1}{", r"\frac{1}{2}", 0.0),
    (r"$\frac{1}{$", "1", 0.0),
    (r"\boxed{\sqrt{}}", "2", 0.0),
    (r"\boxed{}", "0", 0.0),
    (r"$$$\left( 3 \right", "3", 1.0),  # broken delimiters around a readable number: read
    (r"$$$\left( 3 \right", "4", 0.0),
    # no answer
    ("", "3", 0.0),
    ("I do not know.", "3", 0.0),
    ("   \n\n  ", "0", 0.0),
    ("<think>hmm</think>", "1", 0.0),
    # a gold answer math-verify cannot parse matches nothing
    ("3", r"\frac{", 0.0),
]
assert len(CASES) >= 40


@pytest.fixture(scope="module")
def reward():
    r = MathVerifyReward(timeout_s=5.0)
    yield r
    r.close()


def test_the_table_of_hand_made_cases(reward):
    completions = [c for c, _, _ in CASES]
    examples = [Example(prompt="q", answer=gold) for _, gold, _ in CASES]
    got = reward(completions, examples)
    wrong = [
        f"{c!r} vs gold {g!r}: got {s}, expected {e}" for (c, g, e), s in zip(CASES, got) if s != e
    ]
    assert not wrong, "\n".join(wrong)
    assert reward.pop_counts() == {"timeouts": 0.0}


def test_a_slow_completion_times_out_scores_zero_and_is_counted():
    reward = MathVerifyReward(timeout_s=TIMEOUT_S)
    try:
        examples = [Example(prompt="q", answer="3")] * 3
        reward(["3"], examples[:1])  # the worker is up: what follows times the parsing only
        t0 = time.perf_counter()
        scores = reward([r"\boxed{3}", SLOW, r"\boxed{3}"], examples)
        seconds = time.perf_counter() - t0
        # the slow one scores 0; the one after it is scored by the restarted worker
        assert scores == [1.0, 0.0, 1.0]
        assert reward.pop_counts() == {"timeouts": 1.0}
        assert reward.pop_counts() == {"timeouts": 0.0}  # popped: counted once
        # one deadline, plus a fresh worker's start for the last completion
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 30
    finally:
        reward.close()


def test_timeouts_reach_the_reward_set_as_a_count_beside_the_mean():
    reward = MathVerifyReward(timeout_s=TIMEOUT_S)
    try:
        rs = RewardSet({"math_verify": reward})
        out = rs([SLOW, "3"], [Example(prompt="q", answer="3")] * 2)
        assert out.per_fn["math_verify"].tolist() == [0.0, 1.0]
        assert out.counts == {"math_verify/timeouts": 1.0}
    finally:
        reward.close()


def test_scores_from_a_worker_thread(reward):
    """math-verify's own timeout (SIGALRM) raises outside the main thread; ours does not."""
    out: list = []
    examples = [Example(prompt="q", answer=r"\frac{1}{2}")] * 2
    thread = threading.Thread(target=lambda: out.append(reward(["0.5", r"\boxed{2}"], examples)))
    thread.start()
    thread.join(60)
    assert out == [[1.0, 0.0]]


def test_a_slow_completion_times_out_in_a_worker_thread_too():
    reward = MathVerifyReward(timeout_s=TIMEOUT_S)
    out: list = []
    try:
        thread = threading.Thread(
            target=lambda: out.append(reward([SLOW], [Example(prompt="q", answer="3")]))
        )
        thread.start()
        thread.join(60)
        assert out == [[0.0]] and reward.pop_counts() == {"timeouts": 1.0}
    finally:
        reward.close()


def _score_in_child(reward_bytes: bytes, queue) -> None:
    reward = pickle.loads(reward_bytes)
    examples = [Example(prompt="q", answer="3")] * 2
    queue.put((reward([r"\boxed{3}", SLOW], examples), reward.pop_counts()))
    reward.close()


def test_scores_in_a_daemonic_spawned_process_as_ddp_and_sweep_workers_do():
    """DDP spawn ranks and joblib's workers get the reward pickled into a daemonic process,
    where multiprocessing may not start children; the worker is a subprocess, which may."""
    reward = MathVerifyReward(timeout_s=TIMEOUT_S)
    reward([r"\boxed{3}"], [Example(prompt="q", answer="3")])  # a live worker is not pickled
    try:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_score_in_child, args=(pickle.dumps(reward), queue), daemon=True)
        proc.start()
        scores, counts = queue.get(timeout=120)
        proc.join(30)
        assert scores == [1.0, 0.0] and counts == {"timeouts": 1.0}
    finally:
        reward.close()


def test_a_worker_killed_between_calls_is_replaced(reward):
    examples = [Example(prompt="q", answer="3")]
    assert reward(["3"], examples) == [1.0]
    reward._worker.proc.kill()
    reward._worker.proc.wait()
    assert reward(["3"], examples) == [1.0]
    assert reward.pop_counts() == {"timeouts": 0.0}


def test_a_restarted_worker_that_dies_before_it_is_ready_is_replaced(reward):
    """After a timeout the fresh worker is started at once and waited for at the next call. On
    Linux it dies with the thread that started it: a call from a thread that ends just after
    its timeout leaves a worker dead before its "ready", and the next call (another thread)
    starts a new one instead of failing as if math-verify could not be imported."""
    examples = [Example(prompt="q", answer="3")]
    assert reward(["3"], examples) == [1.0]
    reward._worker.stop()
    reward._worker = reward._start()  # as after a timeout: not yet waited for
    reward._worker.proc.kill()  # its starting thread ended before it said ready
    reward._worker.proc.wait()
    assert reward(["3"], examples) == [1.0]


def test_a_worker_that_never_starts_is_an_error_naming_the_extra(monkeypatch):
    import grpo_lab.rewards.math_verify as mv

    monkeypatch.setattr(mv, "_RUN_WORKER", "import sys; sys.exit(1)")  # math-verify is broken
    reward = MathVerifyReward()
    with pytest.raises(RuntimeError, match=r"did not start.*pip install 'grpo-lab\[math\]'"):
        reward(["3"], [Example(prompt="q", answer="3")])
    reward.close()


def test_bad_timeout_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"reward.functions.math_verify.timeout_s=0 is invalid"):
        MathVerifyReward(timeout_s=0)


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "math_verify" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'grpo-lab\[math\]'"):
        MathVerifyReward()


def test_per_completion_overhead_is_small(reward):
    """One round trip per batch: 64 distinct short answers cost milliseconds each at most."""
    completions = [rf"\boxed{{{i}}}" for i in range(64)]
    examples = [Example(prompt="q", answer=str(i)) for i in range(64)]
    reward(completions[:1], examples[:1])
    t0 = time.perf_counter()
    assert reward(completions, examples) == [1.0] * 64
    per_completion = (time.perf_counter() - t0) / 64
    assert per_completion < 0.05, per_completion


@pytest.mark.slow
def test_cli_logs_math_verify_alone_with_its_timeouts(run_cli, tracking_uri):
    """Through the real CLI, with dynamic sampling on (several scoring rounds per rollout)."""
    from mlflow import MlflowClient

    from helpers import FAST

    overrides = [o for o in FAST if o != "train.dynamic_sampling=false"]
    run_cli(
        "train",
        *overrides,
        "reward=[accuracy,math_verify]",
        "train.dynamic_sampling=true",
        "train.dynamic_sampling_max_tries=2",
    )
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert 0.0 <= m["rewards/math_verify/mean"] <= 1.0
    assert m["rewards/math_verify/timeouts"] == 0.0
    history = client.get_metric_history(run.info.run_id, "rewards/math_verify/timeouts")
    assert [h.step for h in history] == [1, 2]  # one value per rollout


ORPHAN_SCRIPT = r"""
from grpo_lab.rewards import MathVerifyReward
from grpo_lab.tasks import Example

r = MathVerifyReward(timeout_s=600)
r(["1"], [Example("q", "1")])
print(r._worker.proc.pid, flush=True)
r([r"\boxed{9^{9^{9^{9}}}}"], [Example("q", "3")])
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has stopped working
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_parent_killed_mid_parse_leaves_no_worker_behind():
    """The worker may sit in one long big-integer operation that no thread of its own can
    interrupt: the kernel kills it with its parent (PR_SET_PDEATHSIG)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(parent.stdout.readline())
        time.sleep(1.0)  # inside the slow completion now
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
