"""``grpo-lab train``: compose, build the parts, warm-start, fit, return the sweep objective."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from grpo_lab import sweep, tracking
from grpo_lab.config import validate
from grpo_lab.data import TaskDataModule
from grpo_lab.instantiate import instantiate
from grpo_lab.module import AlgoConfig, GRPOModule, OptimConfig
from grpo_lab.policy.build import Policy
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sft import warm_start

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    if cfg.paths.get("output_dir"):
        return Path(cfg.paths.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/adhoc")


def build_rewards(cfg: DictConfig) -> RewardSet:
    functions = {name: instantiate(spec) for name, spec in cfg.reward.functions.items()}
    return RewardSet(functions, OmegaConf.to_container(cfg.reward.get("weights") or {}))


def algo_config(cfg: DictConfig) -> AlgoConfig:
    """The module's knobs from the composed config (``kl=none`` forces beta to 0)."""
    estimator = cfg.kl.estimator
    beta = 0.0 if estimator == "none" else float(cfg.beta)
    if estimator == "none" and cfg.beta > 0:
        log.warning(
            "kl=none: no KL term and no reference model; beta=%s is ignored (effective beta 0)",
            cfg.beta,
        )
    if beta == 0 and cfg.train.ref_sync_every:
        log.warning(
            "train.ref_sync_every=%s has no effect: there is no reference model (beta=%s, kl=%s)",
            cfg.train.ref_sync_every,
            cfg.beta,
            estimator,
        )
    return AlgoConfig(
        G=cfg.G,
        epsilon_low=cfg.loss.epsilon_low,
        epsilon_high=cfg.loss.epsilon_high,
        beta=beta,
        mu=cfg.mu,
        kl_estimator="k3" if estimator == "none" else estimator,
        kl_mode=cfg.kl.mode,
        advantage_scale=cfg.advantage.scale,
        advantage_eps=cfg.advantage.eps,
        unbiased_std=cfg.advantage.unbiased_std,
        aggregation=cfg.loss.aggregation,
        ratio_level=cfg.loss.ratio_level,
        dual_clip=cfg.loss.dual_clip,
        entropy_coef=cfg.loss.entropy_coef,
        mask_truncated=cfg.loss.mask_truncated,
        minibatch_size=cfg.train.minibatch_size,
        num_minibatches=cfg.train.num_minibatches,
        microbatch_size=cfg.train.microbatch_size,
        max_grad_norm=cfg.train.max_grad_norm,
        max_consecutive_skipped_steps=cfg.train.max_consecutive_skipped_steps,
        ref_sync_every=cfg.train.ref_sync_every,
        ref_sync_mix=cfg.train.ref_sync_mix,
        dynamic_sampling=cfg.train.dynamic_sampling,
        dynamic_sampling_max_tries=cfg.train.dynamic_sampling_max_tries,
        seed=cfg.seed,
    )


def optimizer_steps(cfg: DictConfig) -> int:
    """Optimizer updates per run: rollouts x mu x mini-batches per rollout (what max_steps counts)."""
    n = cfg.train.prompts_per_step * cfg.G
    minibatches = cfg.train.num_minibatches or math.ceil(n / (cfg.train.minibatch_size or n))
    return cfg.train.rollouts * cfg.mu * minibatches


def build_policy(cfg: DictConfig, task: Any) -> tuple[Policy, Path | None]:
    """The policy to train: the SFT warm start when ``sft.enabled``, else the configured one."""
    if not cfg.sft.enabled or cfg.sft.steps == 0:
        return instantiate(cfg.policy), None
    spec = OmegaConf.to_container(cfg.policy, resolve=True)
    # SFT trains the full model; LoRA adapters (policy.lora) go on top of the warm start for
    # GRPO, so runs with and without LoRA share one warm start.
    full = {k: v for k, v in spec.items() if k != "lora"}
    key_parts = {
        "policy": full,
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "sft": {
            k: v
            for k, v in OmegaConf.to_container(cfg.sft, resolve=True).items()
            if k != "cache_dir"
        },
        "seed": cfg.seed,
    }
    path, trained = warm_start(
        lambda: instantiate(OmegaConf.create(full)),
        task,
        cache_dir=cfg.sft.cache_dir,
        key_parts=key_parts,
        steps=cfg.sft.steps,
        batch_size=cfg.sft.batch_size,
        lr=cfg.sft.lr,
        num_examples=cfg.sft.num_examples,
        seed=cfg.seed,
    )
    log.info("SFT warm start %s: %s", "trained" if trained else "reused from cache", path)
    spec["init_from"] = str(path)
    return instantiate(OmegaConf.create(spec)), path


def make_logger(cfg: DictConfig) -> MLFlowLogger:
    lcfg = cfg.logger
    tracking.ensure_experiment(lcfg.tracking_uri, lcfg.experiment_name)
    tags = {k: str(v) for k, v in (lcfg.get("tags") or {}).items()}
    sweep_name, sweep_tags = sweep.job_tags()  # parent run, sweep id, job number in a -m sweep
    tags.update(sweep_tags)
    run_name = lcfg.get("run_name") or sweep_name or tracking.run_name_from_overrides(cfg)
    logger = MLFlowLogger(
        experiment_name=lcfg.experiment_name,
        tracking_uri=lcfg.tracking_uri,
        run_name=run_name,
        tags=tags,
        log_model=False,
    )
    # mlflow_run.json beside checkpoints/: eval links a checkpoint to this run, the sweep finds it.
    sweep.write_run_file(output_dir(cfg), logger.run_id, logger.experiment_id, lcfg.tracking_uri)
    return logger


def train(cfg: DictConfig) -> float:
    """Run one GRPO experiment; returns ``cfg.train.objective`` at the end (for sweepers).

    The config is validated before any compute. Once the MLflow run exists, any failure (SFT,
    a reward function, a NaN loss) marks it FAILED with the error; checkpoints already written
    stay on disk.
    """
    validate(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r} does not exist; give a .ckpt written by a run"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(cfg.get("num_threads") or torch.get_num_threads())
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    logger = make_logger(cfg)
    try:
        tracking.log_config(logger, cfg)
        objective = _fit(cfg, logger, out, ckpt_path)
    except BaseException as err:
        sweep.record_failure(logger.experiment, logger.run_id, err)  # tag + traceback artifact
        logger.finalize("FAILED")
        raise
    logger.finalize("FINISHED")
    log.info("objective %s = %.4f", cfg.train.objective, objective)
    print(f"[grpo-lab] {cfg.train.objective} = {objective:.4f}  (run {logger.run_id})")
    print(f"[grpo-lab] checkpoints: {out / 'checkpoints'}")
    print(f"[grpo-lab] MLflow UI: {tracking.ui_command(cfg.logger.tracking_uri)}")
    print(
        f"[grpo-lab]   then open {tracking.runs_url(cfg.logger.tracking_uri, logger.experiment_id)}"
    )
    return objective


def _fit(cfg: DictConfig, logger: MLFlowLogger, out: Path, ckpt_path: str | None) -> float:
    """Build the parts, evaluate the start, fit, evaluate the end; returns the objective."""
    task = instantiate(cfg.task)
    rewards = build_rewards(cfg)
    sampler = instantiate(cfg.sampler)
    policy, sft_path = build_policy(cfg, task)
    if sft_path is not None:
        logger.experiment.set_tag(logger.run_id, "grpo_lab.sft_warm_start", str(sft_path))
    module = GRPOModule(
        policy=policy,
        task=task,
        rewards=rewards,
        sampler=sampler,
        algo=algo_config(cfg),
        optim=OptimConfig(
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_steps=cfg.train.warmup_steps,
            scheduler=cfg.train.scheduler,
            total_steps=optimizer_steps(cfg),
        ),
    )
    datamodule = TaskDataModule(
        task, cfg.train.prompts_per_step, cfg.train.eval_size, cfg.train.eval_batch_size, cfg.seed
    )
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="rollout-{step}",
        save_last=True,
        every_n_train_steps=cfg.train.checkpoint_every,
        save_top_k=-1 if cfg.train.checkpoint_every else 0,
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_steps=cfg.trainer.get("max_steps") or optimizer_steps(cfg),
        val_check_interval=cfg.train.eval_every,
        check_val_every_n_epoch=None,
        logger=logger,
        callbacks=[
            checkpoint,
            tracking.CompletionTable(cfg.train.log_samples_every, cfg.train.num_samples_logged),
        ],
        default_root_dir=str(out),
    )
    if not ckpt_path:
        start = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        logger.log_metrics({"eval/accuracy_start": start["eval/accuracy"]}, step=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    logger.log_metrics(
        {f"{k}_final": v for k, v in final.items() if k.startswith("eval/")},
        step=trainer.global_step,
    )
    return float(
        final.get(cfg.train.objective, trainer.callback_metrics.get(cfg.train.objective, math.nan))
    )


def silence_noise() -> None:
    """Drop log lines and warnings that say nothing to a grpo_lab user."""
    import warnings

    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # Lightning adds its own console handler; Hydra's root handler already prints (and files) it.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
    # Logger filters see only records logged to that very logger, so filter where the tip is made.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())
    for pattern in (
        r".*LeafSpec.*",  # torch pytree deprecation inside Lightning
        r".*Using ModelCheckpoint with manual optimization.*",  # we checkpoint after whole rollouts
        r".*does not have many workers.*",  # prompts are a list in memory; workers would not help
        r".*module\(s\) in eval mode at the start of training.*",  # dropout off by design (module.py)
    ):
        warnings.filterwarnings("ignore", message=pattern)


def sft_only(cfg: DictConfig) -> float:
    """``grpo-lab sft``: train (or find in the cache) the warm start and report its accuracy."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = instantiate(cfg.task)
    policy, path = build_policy(cfg, task)
    if path is None:
        raise ValueError("sft.enabled=false or sft.steps=0: there is no warm start to train")
    from grpo_lab.evaluate import greedy_accuracy

    acc = greedy_accuracy(
        policy, task.eval()[: cfg.train.eval_size], task, instantiate(cfg.sampler)
    )
    print(f"[grpo-lab] SFT warm start: {path}")
    print(f"[grpo-lab] greedy eval accuracy of the warm start: {acc:.4f}")
    return acc
