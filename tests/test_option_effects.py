"""Every option is a claim: a one-step run with it and one without, on the same rollout.

Each test builds a real ``GRPOModule`` from the real config tree (Hydra compose, then
``train.build_module`` exactly as ``grpo-lab train`` does), feeds
it one fixed, hand-made rollout, and lets a real Lightning ``Trainer`` take the optimizer step.
What the step did (the gradient it left in ``p.grad``, the weights it moved, the AdamW state,
the learning rate) is compared with an independent float64 re-computation written here from
the formula, and every test also checks that the option's expected value differs from the
default's, so it fails if the option silently does what the default does.

The GRPO loss options at the level of the logged loss value are pinned in test_options.py;
here the same options are pinned at the level of the gradient, which is what training sees
(a loss value can be right while its gradient is cut: an entropy bonus or a KL term computed
on detached log-probs passes the value tests and fails these).

Options of the README's tables that are pinned elsewhere:
  G, advantage=group|group_mean|batch_std|rloo, advantage.unbiased_std, kl=none,
    kl.mode=reward (advantages), train.ref_sync_every / ref_sync_mix   -> test_options.py
  mu, train.minibatch_size / microbatch_size, train.dynamic_sampling*   -> test_options.py
  sampler.temperature / top_k / top_p / min_p / stop_strings, sampler=kv_cache
                                        -> test_sampling.py, test_kv_cache_sampler.py
  beta=0 builds no reference                                            -> test_train_cli.py
  policy=pretrained, policy.dtype                               -> test_pretrained_policy.py
  policy.lora.enabled, policy.lora.target_modules                            -> test_lora.py
  policy.use_chat_template, a task's system prompt  -> test_chat.py, test_prompt_rendering.py
  task=countdown|compare|jsonl|custom and their fields   -> test_tasks.py, test_arithmetic_task.py
  task=hf|gsm8k and their fields, a chat model with LoRA on and off        -> test_hf_task.py
  reward=accuracy|format|length|overlong|embedding|model|custom
                                              -> test_rewards_basic.py, test_rewards_extra.py
  reward=r1_format                                                         -> test_r1_format.py
  experiment=* composes to its settings                                 -> test_presets.py
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from grpo_lab.data import TaskDataModule
from grpo_lab.grpo.rollout import rollout_stats
from grpo_lab.grpo.types import Rollout
from grpo_lab.instantiate import instantiate
from grpo_lab.module import GRPOModule
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sampling.base import Completions
from grpo_lab.train import build_module, build_rewards
from helpers import FAST, compose, cpu_trainer
from one_step import LENGTHS as ONE_STEP_LENGTHS
from one_step import reference_rows

# The reference model is held in eval mode on purpose (it is never trained).
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")

G = 4
MAX_NEW = 5  # sampler.max_new_tokens, not the default 6: Dr. GRPO's constant must follow it
BASE = [
    f"G={G}",
    "train.prompts_per_step=1",  # one group: B*G = 4 completions, the hand rollout below
    "train.rollouts=1",
    "train.warmup_steps=0",
    "train.max_grad_norm=null",  # raw gradients in p.grad; max_grad_norm has its own test
    f"sampler.max_new_tokens={MAX_NEW}",
    "policy.hidden_size=32",
    "policy.intermediate_size=64",
    "policy.num_layers=1",
    "task.max_operand=9",
    "task.eval_size=20",
]


def cfg_of(*overrides: str):
    """The composed and validated config: BASE, then ``overrides``."""
    return compose(*BASE, *overrides)


def module_of(*overrides: str, rewards=None) -> GRPOModule:
    """A GRPOModule built from the composed config, as ``train._fit`` builds it."""
    return build_module(cfg_of(*overrides), rewards=rewards)


# --------------------------------------------------------------------------- the fixed rollout

LENGTHS = [1, 2, 3, MAX_NEW]  # the last hits max_new_tokens with no EOS: truncated
assert LENGTHS == ONE_STEP_LENGTHS  # one_step.reference_rows reads rows of these lengths
ADV = [2.0, 0.5, -1.0, -1.0]
# pi_theta / pi_old per token, chosen against the clip ranges the tests use (no value sits on
# a clip boundary):
#   row 0 (A=2):   1.5                       above every 1+eps_high: clipped
#   row 1 (A=.5):  1.25, 1.15                1.25 clipped by eps 0.2, not by 0.28; 1.15 by 0.1 only
#   row 2 (A=-1):  0.75, 0.85, 5.0           0.85 clipped by eps 0.1 only; 0.75 by 0.1 and 0.2,
#                                            not by eps_low 0.3; 5.0 only by the dual clip
#   row 3 (A=-1):  1, 0.6, 0.95, 1.05, 0.88  0.6 clipped by every eps_low, 0.88 by 0.1 only;
#                                            sequence ratio 0.88: clipped by GSPO's 3e-4, not 0.2
RHO = [[1.5], [1.25, 1.15], [0.75, 0.85, 5.0], [1.0, 0.6, 0.95, 1.05, 0.88]]
# log(pi_theta / pi_ref) per token for the KL options (k1, k2, k3 differ clearly at these)
REF_SHIFT = [[0.3], [-0.4, 0.2], [0.5, -0.1, 0.3], [0.2, -0.3, 0.6, 0.1, -0.5]]


def padded(rows: list[list[float]], log: bool) -> torch.Tensor:
    out = torch.zeros(G, MAX_NEW, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor([math.log(v) if log else v for v in row])
    return out


LOG_RHO = padded(RHO, log=True)
LOG_REF = padded(REF_SHIFT, log=False)


def fixed_rollout(module: GRPOModule, *, old: bool = False, ref: bool = False) -> Rollout:
    """One group of G completions of "3+4=" with LENGTHS tokens and advantages ADV.

    old: pi_old = pi_theta / RHO per token (as if sampled by an older policy);
    ref: pi_ref = pi_theta / exp(REF_SHIFT) per token.
    """
    tok = module.tokenizer
    prompt = tok(["3+4="] * G, return_tensors="pt", add_special_tokens=False)
    ids = torch.full((G, MAX_NEW), tok.pad_token_id)
    mask = torch.zeros((G, MAX_NEW), dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = torch.tensor(tok.convert_tokens_to_ids([str((i + t) % 10) for t in range(n)]))
        mask[i, :n] = 1
        if n < MAX_NEW:
            ids[i, n - 1] = tok.eos_token_id
    completions = Completions(
        prompt_ids=prompt["input_ids"],
        prompt_mask=prompt["attention_mask"],
        completion_ids=ids,
        completion_mask=mask,
        truncated=torch.tensor([n == MAX_NEW for n in LENGTHS]),
    )
    rewards = torch.tensor(ADV)
    rollout = Rollout(
        completions=completions,
        examples=[module.task.train()[0]] * G,
        texts=tok.batch_decode(ids, skip_special_tokens=True),
        rewards=rewards,
        per_fn={"fixed": rewards},
        reward_errors={},
        advantages=torch.tensor(ADV),
    )
    with torch.no_grad():
        logp, _ = completion_logprobs(module.policy, completions)
    return dataclasses.replace(
        rollout,
        stats=rollout_stats(rollout, G),
        old_logp=logp - LOG_RHO.float() if old else None,
        ref_logp=logp - LOG_REF.float() if ref else None,
    )


class LrLog(L.Callback):
    """The learning rate each optimizer step is about to use, and the ``lr`` the step logged."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.logged: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append(float(trainer.callback_metrics["lr"]))


def run_steps(module: GRPOModule, rollout: Rollout, steps: int = 1, callbacks=()) -> L.Trainer:
    """A real Lightning fit of ``steps`` GRPO steps, each on ``rollout`` instead of a sample."""
    module.make_rollout = lambda examples: copy.copy(rollout)
    trainer = cpu_trainer(max_steps=steps, callbacks=list(callbacks))
    trainer.fit(module, datamodule=TaskDataModule(module.task, 1, 4, 4, seed=0))
    return trainer


# --------------------------------------------------------------------------- float64 reference


def reference_loss(
    rows,
    *,
    old: bool = False,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    beta: float = 0.0,
    kl: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "seq_mean_token_mean",
    mask_truncated: bool = False,
) -> torch.Tensor:
    """-J written from the papers' formulas, one completion at a time."""
    sums, counts = [], []
    for i, (logp, entropy) in enumerate(rows):
        n, a = len(logp), ADV[i]
        log_rho = LOG_RHO[i, :n] if old else torch.zeros(n, dtype=torch.float64)
        if ratio_level == "token":  # rho_t = pi_theta / pi_old, pi_old fixed
            rho = torch.exp(log_rho + logp - logp.detach())
        else:  # GSPO-token: value s_i = exp(mean_t log rho_t), gradient of each own log pi
            rho = torch.exp(log_rho.mean()) * torch.exp(logp - logp.detach())
        surrogate = torch.minimum(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)
        if dual_clip is not None and a < 0:
            surrogate = torch.maximum(surrogate, torch.full_like(surrogate, dual_clip * a))
        x = -surrogate
        if beta:
            d = LOG_REF[i, :n] + logp - logp.detach()  # log pi_theta - log pi_ref
            x = x + beta * {"k1": d, "k2": 0.5 * d**2, "k3": torch.exp(-d) + d - 1}[kl]
        x = x - entropy_coef * entropy
        keep = not (mask_truncated and n == MAX_NEW)
        sums.append(x.sum() * keep)
        counts.append(n * keep)
    if aggregation == "seq_mean_token_mean":
        return sum(s / max(k, 1) for s, k in zip(sums, counts)) / G
    if aggregation == "token_mean":
        return sum(sums) / sum(counts)
    assert aggregation == "seq_mean_token_sum_norm"
    return sum(sums) / (G * MAX_NEW)


def reference_grads(model64: torch.nn.Module, rollout: Rollout, **formula) -> dict:
    model64.zero_grad(set_to_none=True)
    rows = reference_rows(model64, rollout.completions)  # the same LENGTHS as one_step's
    reference_loss(rows, **formula).backward()
    return {n: p.grad.clone() for n, p in model64.named_parameters() if p.grad is not None}


def flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].double().flatten() for n in names])


# --------------------------------------------------------------------------- loss options

# (overrides, the formula's values for them, what the rollout needs: pi_old "old" or pi_ref
# "ref", and the formula the step would follow if the option silently did the default)
LOSS_OPTIONS = [
    (["epsilon=0.1"], dict(eps_low=0.1, eps_high=0.1), "old", {}),
    (["surrogate.epsilon_low=0.3"], dict(eps_low=0.3), "old", {}),
    (["surrogate.epsilon_high=0.28"], dict(eps_high=0.28), "old", {}),
    (["surrogate.dual_clip=3"], dict(dual_clip=3.0), "old", {}),
    # GSPO's sequence ratio with the token-level default's clip range 0.2
    (
        ["surrogate=gspo", "surrogate.epsilon_low=0.2", "surrogate.epsilon_high=0.2"],
        dict(ratio_level="sequence"),
        "old",
        {},
    ),
    # a random policy is near the entropy maximum, where H's gradient is small: a large coef
    (["loss.entropy_coef=5"], dict(entropy_coef=5.0), "", {}),
    (["kl=k1", "beta=0.5"], dict(beta=0.5, kl="k1"), "ref", dict(beta=0.5, kl="k3")),
    (["kl=k2", "beta=0.5"], dict(beta=0.5, kl="k2"), "ref", dict(beta=0.5, kl="k3")),
    (["kl=k3", "beta=0.5"], dict(beta=0.5, kl="k3"), "ref", dict(beta=0.04, kl="k3")),
    # kl.mode=reward: the KL enters the rewards (make_rollout), never the loss
    (["kl=k3", "beta=0.5", "kl.mode=reward"], dict(), "ref", dict(beta=0.5, kl="k3")),
    (["aggregation=token_mean"], dict(aggregation="token_mean"), "", {}),
    (
        ["aggregation=seq_mean_token_sum_norm"],
        dict(aggregation="seq_mean_token_sum_norm"),
        "",
        {},
    ),
    (["loss.mask_truncated=true"], dict(mask_truncated=True), "", {}),
    (
        ["aggregation=token_mean", "loss.mask_truncated=true"],
        dict(aggregation="token_mean", mask_truncated=True),
        "",
        dict(aggregation="token_mean"),
    ),
    # presets, on a rollout whose advantages are given (their advantage options and dynamic
    # sampling act in make_rollout: test_options.py and test_presets.py)
    (["experiment=dapo"], dict(eps_high=0.28, aggregation="token_mean"), "old", {}),
    (["experiment=dr_grpo"], dict(aggregation="seq_mean_token_sum_norm"), "", {}),
    (
        [
            "experiment=gspo",
            "train.num_minibatches=1",
        ],  # one optimizer step on this fixed rollout of 4
        dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4),
        "old",
        {},
    ),
]


@pytest.mark.parametrize(
    ("overrides", "formula", "needs", "silent"),
    LOSS_OPTIONS,
    ids=["+".join(o).replace("=", ":") for o, *_ in LOSS_OPTIONS],  # "=" cannot go in -k
)
def test_loss_option_changes_the_step_gradient_as_its_formula_says(
    overrides, formula, needs, silent
):
    # kl=none unless the option is about the KL, so that only the option differs from the
    # default formula (with pi_ref = pi_theta the default k3 term has zero gradient anyway).
    extra = [] if any(o.startswith("kl=") for o in overrides) else ["kl=none"]
    module = module_of(*extra, *overrides)
    model64 = copy.deepcopy(module.policy).double()
    rollout = fixed_rollout(module, old=needs == "old", ref=needs == "ref")
    run_steps(module, rollout)

    old = needs == "old"
    expected = reference_grads(model64, rollout, old=old, **formula)
    if_silent = reference_grads(model64, rollout, old=old, **silent)
    names = sorted(expected)
    got = {n: p.grad for n, p in module.policy.named_parameters() if p.grad is not None}
    assert sorted(got) == names
    exp, alt, got = flat(expected, names), flat(if_silent, names), flat(got, names)
    # the option moves the gradient far more than the tolerance below: the test can fail
    assert (exp - alt).norm() / exp.norm() > 0.02
    assert (got - exp).norm() / exp.norm() < 1e-4, float((got - exp).norm() / exp.norm())


# --------------------------------------------------------------------------- optimizer options

ADAM_EPS = 1e-8  # torch's AdamW default


@pytest.mark.parametrize(
    ("overrides", "lr", "weight_decay"),
    [
        ([], 3e-4, 0.0),  # the default lr, no warmup (BASE)
        (["train.lr=3e-3"], 3e-3, 0.0),
        (["train.lr=3e-3", "train.weight_decay=0.5"], 3e-3, 0.5),
        (["train.lr=3e-3", "train.warmup_steps=4"], 3e-3 / 4, 0.0),  # step 1 of 4: lr/4
        (["train.warmup_steps=10"], 3e-4 / 10, 0.0),  # the default warmup
    ],
    ids=["default_lr", "lr", "weight_decay", "warmup", "default_warmup"],
)
def test_lr_weight_decay_and_warmup_set_the_first_adamw_step(overrides, lr, weight_decay):
    # AdamW's first step: m_hat = g, v_hat = g^2, so each weight moves by
    # -lr * g / (|g| + eps) after the decoupled decay p <- p (1 - lr * weight_decay).
    module = module_of("kl=none", *overrides)
    before = {n: p.detach().double().clone() for n, p in module.policy.named_parameters()}
    run_steps(module, fixed_rollout(module))
    moved = 0.0
    for name, p in module.policy.named_parameters():
        g = p.grad.double()
        expected = before[name] * (1 - lr * weight_decay) - lr * g / (g.abs() + ADAM_EPS)
        torch.testing.assert_close(p.detach().double(), expected, atol=lr * 1e-4, rtol=1e-6)
        moved = max(moved, float((p.detach().double() - before[name]).abs().max()))
    assert moved > 0.9 * lr  # the step happened: the test can tell lr from lr/4 or 3e-4


def test_max_grad_norm_clips_the_gradient_adamw_sees_and_logs_the_norm_before():
    module = module_of("kl=none", "train.max_grad_norm=0.5")
    model64 = copy.deepcopy(module.policy).double()
    rollout = fixed_rollout(module)
    trainer = run_steps(module, rollout)
    raw = reference_grads(model64, rollout)
    names = sorted(raw)
    norm = flat(raw, names).norm()
    assert norm > 1.0  # above both 0.5 and the default 1.0: either clip would act
    scaled = {n: g * 0.5 / (norm + 1e-6) for n, g in raw.items()}  # torch's clip_grad_norm_
    params = dict(module.policy.named_parameters())
    got = flat({n: params[n].grad for n in names}, names)
    torch.testing.assert_close(got, flat(scaled, names), atol=1e-7, rtol=1e-4)
    # AdamW's first moment after one step is (1 - beta1) times the clipped gradient
    state = trainer.optimizers[0].state
    first_moment = flat({n: state[params[n]]["exp_avg"] for n in names}, names)
    torch.testing.assert_close(first_moment, 0.1 * flat(scaled, names), atol=1e-8, rtol=1e-4)
    assert float(trainer.callback_metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-4)


@pytest.mark.parametrize(
    ("overrides", "factors"),
    [
        (["train.scheduler=constant"], [1, 1, 1, 1]),
        # cosine over total_steps = train.rollouts = 4: (1 + cos(pi t / 4)) / 2
        (["train.scheduler=cosine"], [1, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2]),
        (["train.scheduler=linear"], [1, 0.75, 0.5, 0.25]),  # 1 - t / 4
        # 2 warmup steps (t+1)/2, then linear over the 2 left: 1 - (t-2)/2
        (["train.scheduler=linear", "train.warmup_steps=2"], [0.5, 1, 1, 0.5]),
    ],
    ids=["constant", "cosine", "linear", "warmup_linear"],
)
def test_scheduler_and_warmup_give_each_step_its_learning_rate(overrides, factors):
    module = module_of("kl=none", "train.lr=1e-3", "train.rollouts=4", *overrides)
    lrs = LrLog()
    run_steps(module, fixed_rollout(module), steps=4, callbacks=[lrs])
    assert lrs.lrs == pytest.approx([1e-3 * f for f in factors], rel=1e-9)
    # The metric is the rate the rollout's update used, not the next update's.
    assert lrs.logged == pytest.approx([1e-3 * f for f in factors], rel=1e-6)


# --------------------------------------------------------------------------- advantage.eps


def fixed_scores(completions, examples, **ctx) -> list[float]:
    return [1.0, 0.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.0][: len(completions)]


S3 = math.sqrt(3.0)
CENTRED = [0.5, -0.5, -0.5, 0.5, 3.0, -1.0, -1.0, -1.0]  # r - mean of its group
GROUP_STD = [0.5] * 4 + [S3] * 4  # group 1 [1,0,0,1]: std .5; group 2 [4,0,0,0]: std sqrt(3)
BATCH_STD = math.sqrt(13.5 / 8)  # population std of all 8 rewards around their mean 0.75


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], [c / (s + 1e-6) for c, s in zip(CENTRED, GROUP_STD)]),  # the default eps
        (["advantage.eps=0.5"], [c / (s + 0.5) for c, s in zip(CENTRED, GROUP_STD)]),
        (["advantage=batch_std", "advantage.eps=0.5"], [c / (BATCH_STD + 0.5) for c in CENTRED]),
    ],
    ids=["default", "group", "batch_std"],
)
def test_advantage_eps_is_added_to_the_std_it_divides_by(overrides, expected):
    module = module_of("kl=none", *overrides, rewards=RewardSet({"fixed": fixed_scores}))
    rollout = module.make_rollout(module.task.train()[:2])
    # float64 check on the rollout's own rewards: they are the scripted ones
    assert rollout.rewards.tolist() == fixed_scores([None] * 8, None)
    torch.testing.assert_close(
        rollout.advantages.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------- reward options


def test_reward_weights_and_function_options_reach_the_scores_through_the_config():
    cfg = cfg_of(
        "reward=[accuracy,format,length,overlong]",
        "reward.weights.format=0.5",  # default 0.1
        "reward.functions.length.target=2",  # default 0
        "reward.functions.length.scale=0.25",  # default 0.01
        "reward.functions.overlong.max_len=4",  # default: sampler.max_new_tokens (5 here)
        "reward.functions.overlong.cache=2",  # default: max_len // 5
        "reward.functions.format.pattern='^[a-z]+$'",  # default: the task's integer format
    )
    rewards = build_rewards(cfg)
    task = instantiate(cfg.task)
    ex = task.train()[0]
    texts = ["ab", str(ex.answer), "x1", "abc", "abcd"]
    lengths = [1, 2, 3, 4, 5]  # completion tokens, EOS included
    out = rewards(
        texts,
        [ex] * 5,
        task=task,
        truncated=[False, False, False, False, True],
        lengths=lengths,
        max_new_tokens=MAX_NEW,
    )
    accuracy = [0, 1, 0, 0, 0]
    fmt = [1, 0, 0, 1, 0]  # lowercase letters only, and not truncated
    length = [0, 0, -0.25, -0.5, -0.75]  # -0.25 * max(0, L - 2)
    overlong = [0, 0, -0.5, -1, -1]  # 0 up to 4 - 2 = 2, then (2 - L) / 2, -1 from L = 4
    for name, want in (
        ("accuracy", accuracy),
        ("format", fmt),
        ("length", length),
        ("overlong", overlong),
    ):
        assert out.per_fn[name].tolist() == pytest.approx(want), name
    total = [a + 0.5 * f + n + o for a, f, n, o in zip(accuracy, fmt, length, overlong)]
    assert out.total.tolist() == pytest.approx(total)


# --------------------------------------------------------------------------- policy options


LORA_ON = ["kl=none", "policy.lora.enabled=true", "policy.lora.target_modules=[q_proj,v_proj]"]


def lora_grads(*overrides: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    module = module_of(*LORA_ON, *overrides)
    run_steps(module, fixed_rollout(module))
    return {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}


def test_lora_r_sets_the_adapter_size_and_alpha_over_r_scales_its_gradient():
    low = lora_grads("policy.lora.r=2", "policy.lora.alpha=4")  # scaling alpha / r = 2
    high = lora_grads("policy.lora.r=2", "policy.lora.alpha=8")  # scaling 4
    # one layer, q_proj and v_proj (32 -> 32 each): A (r, 32) and B (32, r) per module
    assert sorted(".".join(n.split(".")[-4:-2]) for n in low) == [
        "q_proj.lora_A",
        "q_proj.lora_B",
        "v_proj.lora_A",
        "v_proj.lora_B",
    ]
    assert sum(g.numel() for g in low.values()) == 2 * (2 * 32 + 32 * 2)  # r = 2, not the 8
    # B starts at 0, so A gets no gradient and B's is scaling * dL/dh (A x): twice as large
    for name, g in low.items():
        if "lora_B" in name:
            assert g.abs().max() > 0
            torch.testing.assert_close(high[name], 2 * g, rtol=1e-5, atol=1e-9)
        else:
            assert g.abs().max() == 0


def test_seed_sets_the_policy_init_and_the_task_split():
    weights = {}
    splits = {}
    for seed in (0, 1, 0):
        cfg = cfg_of(f"seed={seed}")
        weights.setdefault(seed, []).append(instantiate(cfg.policy).model.state_dict())
        splits.setdefault(seed, []).append([e.prompt for e in instantiate(cfg.task).eval()])
    same, other = weights[0], weights[1][0]
    for name, w in same[0].items():
        torch.testing.assert_close(same[1][name], w)  # the same seed: the same weights
    assert not torch.equal(same[0]["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert splits[0][0] == splits[0][1] and splits[0][0] != splits[1][0]


def test_sft_enabled_and_steps_decide_whether_grpo_starts_from_a_warm_start(tmp_path):
    from grpo_lab.train import build_policy

    sft = ["sft.steps=3", "sft.batch_size=4", "sft.num_examples=8", f"sft.cache_dir={tmp_path}"]
    init = instantiate(cfg_of(*sft).policy).model.state_dict()
    for overrides, warm in (([], True), (["sft.enabled=false"], False), (["sft.steps=0"], False)):
        cfg = cfg_of(*sft, *overrides)
        policy, path = build_policy(cfg, instantiate(cfg.task))
        weights = policy.model.state_dict()
        moved = any(not torch.equal(weights[n], w) for n, w in init.items())
        assert (path is not None, moved) == (warm, warm), overrides


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_cli_prompts_per_step_rollouts_and_lr_reach_the_run(run_cli, tracking_uri, tmp_path):
    keep = [o for o in FAST if not o.startswith(("train.rollouts=", "train.prompts_per_step="))]
    run_cli(
        "train",
        *keep,
        "train.rollouts=3",  # default 400
        "train.prompts_per_step=3",  # B, default 16
        "train.lr=1e-3",  # default 1e-4 ...
        "train.warmup_steps=0",  # ... after 10 warmup steps
        "train.scheduler=constant",
        "train.num_samples_logged=100",  # more than B*G: the table holds the whole rollout
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    rid = run.info.run_id
    assert [m.value for m in client.get_metric_history(rid, "rollout")] == [1.0, 2.0, 3.0]
    assert [m.value for m in client.get_metric_history(rid, "lr")] == pytest.approx([1e-3] * 3)
    tables = sorted(a.path for a in client.list_artifacts(rid, "completions"))
    assert len(tables) == 3
    table = json.loads(Path(client.download_artifacts(rid, tables[0], str(tmp_path))).read_text())
    prompts = [row[table["columns"].index("prompt")] for row in table["data"]]
    # B = 3 prompts, each repeated G = 4 times in a row: 12 completions per rollout
    assert len(prompts) == 3 * 4
    assert [len(set(prompts[i : i + 4])) for i in range(0, 12, 4)] == [1, 1, 1]
    assert len(set(prompts)) == 3


@pytest.mark.parametrize(("value", "expected"), [("null", "sdpa"), ("eager", "eager")])
def test_pretrained_attn_implementation_picks_the_attention_kernel(tmp_path, value, expected):
    instantiate(cfg_of().policy).save(tmp_path)
    cfg = compose(
        "policy=pretrained",
        f"policy.name_or_path={tmp_path}",
        f"policy.attn_implementation={value}",
    )
    assert instantiate(cfg.policy).model.config._attn_implementation == expected


def digitwise_sum(a: int, b: int) -> int:
    """a + b without carries, written out digit by digit: 38 + 45 -> 73."""
    digits = [(int(x) + int(y)) % 10 for x, y in zip(f"{a:02d}", f"{b:02d}")]
    return int("".join(map(str, digits)))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_flawed_demo_fraction_sets_the_share_of_carry_dropping_demonstrations(fraction):
    task = instantiate(cfg_of(f"task.flawed_demo_fraction={fraction}").task)
    carries = flawed = 0
    for ex in task.train():
        a, b = map(int, ex.prompt[:-1].split("+"))
        assert ex.answer == str(a + b)  # rewards and eval always check the true sum
        if a % 10 + b % 10 >= 10:
            carries += 1
            flawed += ex.target != ex.answer
            assert ex.target in (ex.answer, str(digitwise_sum(a, b)))
        else:
            assert ex.target == ex.answer  # without a carry there is nothing to drop
    assert carries > 20
    if fraction in (0.0, 1.0):
        assert flawed == fraction * carries
    else:  # each example is flawed with probability 1/2: about half, not none or all
        assert 0.25 * carries < flawed < 0.75 * carries
