"""Scoring a policy: greedy accuracy (and, for ``grpo-lab eval``, pass@k)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_lab.instantiate import instantiate
from grpo_lab.policy.build import Policy
from grpo_lab.tasks import chat
from grpo_lab.tasks.base import Example, Task

log = logging.getLogger(__name__)


def encode_prompts(policy: Policy, examples: list[Example], task: Task) -> dict[str, torch.Tensor]:
    """Left-padded prompts rendered as SFT and GRPO render them (chat template, system prompt)."""
    return chat.encode_prompts(policy.tokenizer, examples, task, policy.use_chat_template)


@torch.no_grad()
def greedy_accuracy(
    policy: Policy, examples: list[Example], task: Task, sampler, batch_size: int = 256
) -> float:
    """Fraction of examples whose greedy completion the task marks correct."""
    model, tok = policy.model, policy.tokenizer
    model.eval()
    sampler.configure(tok, policy.model_impl)
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        enc = encode_prompts(policy, batch, task)
        comp = sampler.sample(model, enc["input_ids"], enc["attention_mask"], 1, greedy=True)
        texts = tok.batch_decode(comp.completion_ids, skip_special_tokens=True)
        correct += sum(task.is_correct(t, ex) for t, ex in zip(texts, batch))
    return correct / max(1, len(examples))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, eq. 1) for one prompt: 1 - C(n-c, k) / C(n, k).

    n: samples drawn, c: how many of them are correct, k: the budget (1 <= k <= n). The chance
    that at least one of k samples drawn without replacement from the n is correct.
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is invalid: expected 1 <= k <= n (n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} is invalid: expected 0 <= c <= n (n={n})")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _run_dir(ckpt: Path) -> Path:
    """<run dir>/checkpoints/x.ckpt -> <run dir>."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _run_config(ckpt: Path) -> DictConfig | None:
    """The training run's composed config, saved by Hydra next to ``checkpoints/``."""
    path = _run_dir(ckpt) / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def command_line_keys() -> list[str]:
    """The keys (or groups) the user set on the command line, ``task.max_operand`` or ``task``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task]


def config_from_run(cfg: DictConfig, run: DictConfig | None, overridden: list[str]) -> DictConfig:
    """The eval config with the training run's policy, task, sampler and eval split.

    ``run``: the run's composed config (None for a checkpoint made elsewhere: ``cfg`` as it is).
    ``overridden``: keys set on the command line (``command_line_keys``); they win over the run.
    A group chosen on the command line (``task=countdown``) is taken whole from ``cfg``. The
    policy comes from the run only with ``policy_from_run=true``. ``eval.size`` and
    ``eval.batch_size`` left null are the run's ``train.eval_size`` and ``train.eval_batch_size``,
    so the prompts and batches are those of the run's own greedy eval.
    """
    cfg = cfg.copy()
    groups = ["task", "sampler"] + (["policy"] if cfg.get("policy_from_run", True) else [])
    if run is not None:
        for group in groups:
            if group in overridden:
                continue
            node = OmegaConf.create(OmegaConf.to_container(run[group], resolve=True))
            for key in overridden:
                if key.startswith(group + "."):
                    sub = key[len(group) + 1 :]
                    value = OmegaConf.select(cfg, key, default=None)
                    OmegaConf.update(node, sub, value, merge=False, force_add=True)
            cfg[group] = node
    eval_split = run.train if run is not None else {"eval_size": 200, "eval_batch_size": 64}
    if cfg.eval.get("size") is None:
        cfg.eval.size = eval_split["eval_size"]
    if cfg.eval.get("batch_size") is None:
        cfg.eval.batch_size = eval_split["eval_batch_size"]
    return cfg


def load_checkpoint_policy(cfg: DictConfig, ckpt: Path) -> Policy:
    """The policy a training checkpoint holds (``state_dict`` keys ``policy.*``), built from
    ``cfg.policy`` (``config_from_run`` puts the training run's there)."""
    spec = OmegaConf.to_container(cfg.policy, resolve=True)
    if "init_from" in spec:
        spec["init_from"] = None  # every weight comes from the checkpoint
    policy = instantiate(OmegaConf.create(spec))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not weights:
        raise ValueError(
            f"ckpt={str(ckpt)!r} holds no policy.* weights: give a .ckpt written by grpo-lab train"
        )
    missing, unexpected = policy.model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if policy.model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"ckpt={str(ckpt)!r} does not fit the policy {spec.get('_target_')}: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {unexpected[:5]}; set policy=... (and policy_from_run=false) to the architecture it was trained with"
        )
    return policy


@torch.no_grad()
def score(
    policy: Policy, examples: list[Example], task: Task, sampler, n: int, k: int, batch_size: int
) -> dict[str, Any]:
    """Greedy accuracy and pass@k over ``examples``; per-example rows for the completions table."""
    model, tok = policy.model, policy.tokenizer
    model.eval()
    sampler.configure(tok, policy.model_impl)
    rows: dict[str, list] = {
        "prompt": [],
        "answer": [],
        "greedy": [],
        "greedy_correct": [],
        "samples": [],
        "correct_of_n": [],
        f"pass_at_{k}": [],
    }
    lengths = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        enc = encode_prompts(policy, batch, task)
        greedy = sampler.sample(model, enc["input_ids"], enc["attention_mask"], 1, greedy=True)
        lengths += greedy.lengths.tolist()
        greedy_texts = tok.batch_decode(greedy.completion_ids, skip_special_tokens=True)
        sampled = sampler.sample(model, enc["input_ids"], enc["attention_mask"], n)
        texts = tok.batch_decode(
            sampled.completion_ids, skip_special_tokens=True
        )  # (B*n,) grouped by prompt
        for j, ex in enumerate(batch):
            group = texts[j * n : (j + 1) * n]
            c = sum(task.is_correct(t, ex) for t in group)
            rows["prompt"].append(ex.prompt)
            rows["answer"].append(ex.answer)
            rows["greedy"].append(greedy_texts[j])
            rows["greedy_correct"].append(bool(task.is_correct(greedy_texts[j], ex)))
            rows["samples"].append(" | ".join(group[:4]))
            rows["correct_of_n"].append(c)
            rows[f"pass_at_{k}"].append(pass_at_k(n, c, k))
    m = max(1, len(examples))
    metrics = {
        "eval/accuracy": sum(rows["greedy_correct"]) / m,
        f"eval/pass_at_{k}": sum(rows[f"pass_at_{k}"]) / m,
        "eval/pass_at_1": sum(pass_at_k(n, c, 1) for c in rows["correct_of_n"]) / m,
        "eval/mean_length": sum(lengths) / max(1, len(lengths)),
    }
    return {"metrics": metrics, "rows": rows}


def evaluate(cfg: DictConfig) -> float:
    """``grpo-lab eval``: score ``cfg.ckpt``, log an MLflow run linked to the training run; returns greedy accuracy."""
    from grpo_lab import store, tracking
    from grpo_lab.sweep.run_files import read_run_file

    ckpt = Path(str(cfg.ckpt))
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"ckpt={str(ckpt)!r} does not exist: give a .ckpt written by grpo-lab train, "
            "e.g. outputs/<date>/<time>/checkpoints/last.ckpt"
        )
    n, k = int(cfg.eval.n), int(cfg.eval.k)
    if not 1 <= k <= n:
        raise ValueError(f"eval.k={k} is invalid: expected 1 <= eval.k <= eval.n (eval.n={n})")
    cfg = config_from_run(cfg, _run_config(ckpt), command_line_keys())
    torch.manual_seed(cfg.seed)
    task = instantiate(cfg.task)
    sampler = instantiate(cfg.sampler)
    policy = load_checkpoint_policy(cfg, ckpt)
    examples = task.eval()[: cfg.eval.size]
    result = score(policy, examples, task, sampler, n, k, cfg.eval.batch_size)

    uri, lcfg = cfg.logger.tracking_uri, cfg.logger
    client = store.client(uri)
    train_run = read_run_file(_run_dir(ckpt)) or {}
    train_run_id = cfg.get("run_id") or train_run.get("run_id")
    train_name = None
    if train_run_id:
        try:
            train_name = client.get_run(train_run_id).info.run_name
        except Exception:  # the training run lives in another store: keep the id as a link
            log.warning("training run %s is not in %s; linking by id only", train_run_id, uri)
    exp_id = store.ensure_experiment(uri, lcfg.experiment_name)
    tags = {str(k_): str(v) for k_, v in (lcfg.get("tags") or {}).items()}
    tags.update({"grpo_lab.role": "eval", "grpo_lab.checkpoint": str(ckpt.resolve())})
    if train_run_id:
        tags["grpo_lab.train_run_id"] = str(train_run_id)
    name = lcfg.get("run_name") or f"eval {train_name or _run_dir(ckpt).name}"
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    params = {
        "ckpt": str(ckpt),
        "eval.n": n,
        "eval.k": k,
        "eval.size": len(examples),
        "eval.batch_size": cfg.eval.batch_size,
        "seed": cfg.seed,
        # what was scored: the run's task and sampler unless overridden (config_from_run)
        **tracking.flatten(OmegaConf.to_container(cfg.task, resolve=True), "task."),
        **tracking.flatten(OmegaConf.to_container(cfg.sampler, resolve=True), "sampler."),
    }
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in result["metrics"].items():
        client.log_metric(run_id, key, value)
    rows = {c: v[: cfg.eval.table_rows] for c, v in result["rows"].items()}
    client.log_table(run_id, data=rows, artifact_file="eval/completions.json")
    client.set_terminated(run_id, "FINISHED")

    for key, value in result["metrics"].items():
        print(f"[grpo-lab] {key} = {value:.4f}")
    print(
        f"[grpo-lab] eval run {run_id} (training run {train_run_id or 'unknown'}), {len(examples)} prompts, n={n}"
    )
    print(f"[grpo-lab]   open {tracking.runs_url(uri, exp_id)}")
    return result["metrics"]["eval/accuracy"]
