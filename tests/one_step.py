"""One real GRPO optimizer step on a fixed, hand-made rollout, and a float64 reference for it.

A test of an algorithm part builds two modules from the composed config (the option, and the
default), gives both the same rollout, lets a real Lightning Trainer take one step, and compares
the gradient left in ``p.grad`` with one worked out here, in float64, from the paper's formula.
"""

from __future__ import annotations

import math

import torch

from grpo_lab.data import TaskDataModule
from grpo_lab.grpo.rollout import rollout_stats
from grpo_lab.grpo.types import Rollout
from grpo_lab.module import GRPOModule
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.sampling.base import Completions
from helpers import cpu_trainer, module_of

G = 4
MAX_NEW = 5
LENGTHS = [1, 2, 3, MAX_NEW]  # the last hits max_new_tokens with no EOS: truncated
ADV = [2.0, 0.5, -1.0, -1.0]
# pi_theta / pi_old per token, away from the clip boundaries the tests use
RHO = [[1.5], [1.25, 1.15], [0.75, 0.85, 5.0], [1.0, 0.6, 0.95, 1.05, 0.88]]
# pi_old / q per token (q: the sampler's distribution)
OLD_OVER_Q = [[0.5], [1.2, 1.9], [4.0, 1.0, 0.9], [1.1, 3.5, 0.7, 1.0, 2.2]]
# The options these tests compare: one group, raw gradients, no KL term.
BASE = [
    f"G={G}",
    "train.prompts_per_step=1",
    "train.rollouts=1",
    "train.warmup_steps=0",
    "train.max_grad_norm=null",
    "train.dynamic_sampling=false",
    f"sampler.max_new_tokens={MAX_NEW}",
    "policy.hidden_size=32",
    "policy.intermediate_size=64",
    "policy.num_layers=1",
    "task.max_operand=9",
    "task.eval_size=20",
    "kl=none",
]


def padded(rows: list[list[float]], log: bool) -> torch.Tensor:
    out = torch.zeros(G, MAX_NEW, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor([math.log(v) if log else v for v in row])
    return out


def module(*overrides: str) -> GRPOModule:
    return module_of(*BASE, *overrides)


def fixed_completions(module: GRPOModule) -> Completions:
    """One group of G completions of "3+4=" with LENGTHS tokens."""
    tok = module.tokenizer
    prompt = tok(["3+4="] * G, return_tensors="pt", add_special_tokens=False)
    ids = torch.full((G, MAX_NEW), tok.pad_token_id)
    mask = torch.zeros((G, MAX_NEW), dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = torch.tensor(tok.convert_tokens_to_ids([str((i + t) % 10) for t in range(n)]))
        mask[i, :n] = 1
        if n < MAX_NEW:
            ids[i, n - 1] = tok.eos_token_id
    return Completions(
        prompt_ids=prompt["input_ids"],
        prompt_mask=prompt["attention_mask"],
        completion_ids=ids,
        completion_mask=mask,
        truncated=torch.tensor([n == MAX_NEW for n in LENGTHS]),
    )


def fixed_rollout(module: GRPOModule, *, off_policy: bool, with_q: bool = False) -> Rollout:
    """The fixed completions with advantages ADV; ``off_policy``: pi_old = pi_theta / RHO per
    token; ``with_q``: the sampler's q = pi_old / OLD_OVER_Q per token."""
    c = fixed_completions(module)
    with torch.no_grad():
        logp, _ = completion_logprobs(module.policy, c)
    old = logp - padded(RHO, log=True).float() if off_policy else logp
    if with_q:
        c.sampling_logp = (old - padded(OLD_OVER_Q, log=True).float()) * c.completion_mask
    rewards = torch.tensor(ADV)
    rollout = Rollout(
        completions=c,
        examples=[module.task.train()[0]] * G,
        texts=module.tokenizer.batch_decode(c.completion_ids, skip_special_tokens=True),
        rewards=rewards,
        per_fn={"fixed": rewards},
        reward_errors={},
        advantages=torch.tensor(ADV),
        old_logp=old if off_policy else None,
    )
    return Rollout(**{**rollout.__dict__, "stats": rollout_stats(rollout, G)})


def one_step(module: GRPOModule, rollout: Rollout | None = None, sample=None) -> dict[str, float]:
    """A real Lightning fit of one GRPO step; ``rollout`` replaces steps 1-3 whole, ``sample``
    replaces only the sampling and scoring (the real pi_old, advantages and token selection run).
    Returns the logged metrics; the gradient stays in ``p.grad``."""
    if rollout is not None:
        module.make_rollout = lambda examples: rollout
    if sample is not None:
        module.sample_and_score = lambda examples: sample
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(module, datamodule=TaskDataModule(module.task, 1, 4, 4, seed=0))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def grads(module: GRPOModule) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten() for p in module.policy.parameters()])


def reference_rows(model: torch.nn.Module, completions: Completions):
    """(log pi, entropy) per completion token, each row alone and unpadded, in float64."""
    c = completions
    rows = []
    for i, n in enumerate(LENGTHS):
        prompt = c.prompt_ids[i][c.prompt_mask[i].bool()]
        tokens = c.completion_ids[i, :n]
        logits = model(torch.cat([prompt, tokens]).unsqueeze(0)).logits[0].double()
        logits = logits[len(prompt) - 1 : len(prompt) - 1 + n]  # (n, V): position t predicts t
        log_probs = torch.log_softmax(logits, dim=-1)
        logp = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        rows.append((logp, -(log_probs.exp() * log_probs).sum(-1)))
    return rows


def reference_grads(module: GRPOModule, completions: Completions, per_row) -> torch.Tensor:
    """The gradient of 1/G sum_i 1/|o_i| sum_t x_it (the paper's aggregation) in float64, where
    ``per_row(i, logp, entropy) -> x_i`` (n_i,) is the per-token loss written from the formula."""
    model64 = _float64_copy(module.policy)
    rows = reference_rows(model64, completions)
    loss = sum(per_row(i, logp, ent).sum() / len(logp) for i, (logp, ent) in enumerate(rows)) / G
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model64.parameters()])


def _float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    out = copy.deepcopy(model).double()
    out.zero_grad(set_to_none=True)
    return out
