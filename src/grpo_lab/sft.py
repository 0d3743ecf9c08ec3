"""Supervised warm start: GRPO begins from an SFT model, as in the paper.

A policy trained from scratch never samples a correct answer, so every group has zero
reward variance and GRPO has no signal. ``warm_start`` fits the policy to task
demonstrations (loss on completion tokens only) and caches the result by the hash of
everything it depends on, so every job of a sweep starts from the same weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from grpo_lab.policy.build import Policy, load_pretrained
from grpo_lab.tasks.base import Example, Task
from grpo_lab.tasks.chat import render_prompts

log = logging.getLogger(__name__)

# Part of the cache key: bump when the warm-start recipe changes so stale caches are not reused.
RECIPE_VERSION = 2


def demonstration_batch(
    policy: Policy, examples: list[Example], system_prompt: str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+target+EOS with labels only on target and EOS tokens.

    Prompts are rendered as GRPO and eval render them (``render_prompts``: chat template
    per ``policy.use_chat_template``, system prompt).
    """
    tok = policy.tokenizer
    prompts = render_prompts(
        tok,
        [ex.prompt for ex in examples],
        system_prompt=system_prompt,
        use_chat_template=policy.use_chat_template,
    )
    rows, labels = [], []
    for ex, prompt in zip(examples, prompts):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def fit_demonstrations(
    policy: Policy,
    task: Task,
    steps: int,
    batch_size: int,
    lr: float,
    num_examples: int | None,
    seed: int,
) -> list[float]:
    """AdamW on the demonstrations of the first ``num_examples`` training examples."""
    rng = random.Random(seed)
    pool = list(task.train())
    rng.shuffle(pool)
    pool = pool[:num_examples] if num_examples else pool
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses = []
    for step in range(steps):
        batch = demonstration_batch(
            policy,
            rng.sample(pool, min(batch_size, len(pool))),
            system_prompt=getattr(task, "system_prompt", None),
        )
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("sft step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()
    return losses


def examples_digest(examples: list[Example]) -> str:
    """A digest of the (prompt, SFT target) pairs, in order: the data a warm start is fitted to."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.target]).encode())
    return h.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_start(
    build_policy,
    task: Task,
    *,
    cache_dir: str | Path,
    key_parts: dict[str, Any],
    steps: int,
    batch_size: int,
    lr: float,
    num_examples: int | None,
    seed: int,
) -> tuple[Path, bool]:
    """Directory of the SFT warm start for this configuration, trained once and then reused.

    build_policy: () -> Policy, the untrained policy. Returns (path, trained_now).
    A file lock makes concurrent sweep jobs train it once and wait for each other.
    """
    out = Path(cache_dir) / f"sft-{cache_key({**key_parts, 'recipe': RECIPE_VERSION})}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out, False
        torch.manual_seed(seed)
        policy = build_policy()
        fit_demonstrations(policy, task, steps, batch_size, lr, num_examples, seed)
        tmp = out.with_name(out.name + ".tmp")
        policy.save(tmp)
        (tmp / "sft_config.json").write_text(json.dumps(key_parts, indent=2, default=str))
        tmp.rename(out)
        return out, True


__all__ = [
    "demonstration_batch",
    "examples_digest",
    "fit_demonstrations",
    "load_pretrained",
    "warm_start",
]
