"""``grpo-lab train``: compose, build the parts, warm-start, fit, return the sweep objective."""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from grpo_lab import distributed, faults, locks, resume, store, sweep, tracking
from grpo_lab.callbacks import RNGStates, RolloutCheckpoint, RolloutProgressBar
from grpo_lab.config import validate
from grpo_lab.data import TaskDataModule
from grpo_lab.grpo.batching import Batching
from grpo_lab.instantiate import instantiate
from grpo_lab.module import GRPOModule
from grpo_lab.policy.build import Policy
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sft import examples_digest, warm_start

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    if cfg.paths.get("output_dir"):
        return Path(cfg.paths.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/adhoc")


def fixed_output_dir(cfg: DictConfig) -> bool:
    """Whether ``output_dir(cfg)`` is the same for every process started with this command line
    (``resume=auto`` needs it): ``paths.output_dir``, or Hydra's dir given on the command line."""
    if cfg.paths.get("output_dir") or not HydraConfig.initialized():
        return True
    hc = HydraConfig.get()
    key = "hydra.sweep.dir" if hc.mode == RunMode.MULTIRUN else "hydra.run.dir"
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in hc.overrides.hydra)


def _output_dir_key(cfg: DictConfig, in_sweep: bool) -> tuple[str, Any]:
    """The config key that chose ``output_dir(cfg)`` and its value, for an error about it."""
    if cfg.paths.get("output_dir"):
        return "paths.output_dir", cfg.paths.output_dir
    if in_sweep:
        return "hydra.sweep.dir", HydraConfig.get().sweep.dir
    return "hydra.run.dir", HydraConfig.get().run.dir if HydraConfig.initialized() else "?"


def build_rewards(cfg: DictConfig) -> RewardSet:
    functions = {name: instantiate(spec) for name, spec in cfg.reward.functions.items()}
    weights = OmegaConf.to_container(cfg.reward.get("weights") or {})
    return RewardSet(functions, weights, on_error=cfg.reward.get("on_error", "raise"))


def warn_on_inert_settings(cfg: DictConfig) -> None:
    """Settings that compose and validate but do nothing in this combination: say so."""
    if cfg.kl.get("estimator") == "none" and cfg.beta > 0:
        log.warning(
            "kl=none: no KL term and no reference model; beta=%s is ignored (effective beta 0)",
            cfg.beta,
        )
    surrogate = str(cfg.surrogate.get("_target_", ""))
    if not surrogate.endswith(".PPOClip") and _on_command_line("epsilon"):
        log.warning(
            "epsilon=%s has no effect with surrogate=%s: only ppo_clip's epsilon_low/high follow "
            "the top-level epsilon; set surrogate.* instead",
            cfg.epsilon,
            surrogate.rpartition(".")[2],
        )
    no_reference = cfg.kl.get("estimator") == "none" or not cfg.kl.get("beta")
    if no_reference and cfg.train.ref_sync_every:
        log.warning(
            "train.ref_sync_every=%s has no effect: there is no reference model (beta=%s, kl=%s)",
            cfg.train.ref_sync_every,
            cfg.kl.get("beta"),
            cfg.kl.get("estimator"),
        )


def _on_command_line(key: str) -> bool:
    """Whether ``key=...`` was given on this job's command line (or swept)."""
    if not HydraConfig.initialized():
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in HydraConfig.get().overrides.task)


def optimizer_steps(cfg: DictConfig) -> int:
    """Optimizer updates per run: rollouts x mu x mini-batches per rollout (what max_steps counts)."""
    return cfg.train.rollouts * Batching.from_config(cfg).steps_per_rollout(cfg.mu)


def build_module(
    cfg: DictConfig,
    policy: Policy | None = None,
    task: Any = None,
    rewards: RewardSet | None = None,
    sampler: Any = None,
    reference: Any = None,
) -> GRPOModule:
    """The GRPOModule of a composed config, each part built as ``grpo-lab train`` builds it (a
    part given here replaces the config's; ``reference``: a frozen pi_ref instead of a copy)."""
    task = task if task is not None else instantiate(cfg.task)
    return GRPOModule(
        cfg,
        policy=policy if policy is not None else instantiate(cfg.policy),
        task=task,
        rewards=rewards if rewards is not None else build_rewards(cfg),
        sampler=sampler if sampler is not None else instantiate(cfg.sampler),
        reference=reference,
    )


def build_policy(cfg: DictConfig, task: Any) -> tuple[Policy, Path | None]:
    """The policy to train: the SFT warm start when ``sft.enabled``, else the configured one."""
    if not cfg.sft.enabled or cfg.sft.steps == 0:
        return instantiate(cfg.policy), None
    spec = OmegaConf.to_container(cfg.policy, resolve=True)
    # SFT trains the full model; LoRA adapters (policy.lora) go on top of the warm start for
    # GRPO, so runs with and without LoRA share one warm start.
    full = {k: v for k, v in spec.items() if k != "lora"}
    key_parts = {
        # model_impl changes only which code runs the forward, not what SFT learns
        "policy": {k: v for k, v in full.items() if k != "model_impl"},
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        # what SFT fits, not only where it came from: a data file rewritten in place, a hub
        # dataset's new revision or another reasoning-gym version trains a new warm start
        "data": examples_digest(task.train()),
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


def make_logger(cfg: DictConfig, run_id: str | None = None) -> MLFlowLogger:
    """The run's MLFlowLogger: a new MLflow run, or with ``run_id`` (a resume) that run again."""
    lcfg = cfg.logger
    # Under DDP every rank runs this; MLFlowLogger creates a run on rank 0 only (its run_id is
    # None elsewhere), so only rank 0 touches the store and writes mlflow_run.json.
    rank0 = distributed.launched_rank() == 0
    if rank0:
        # Before any compute: a store that cannot be reached is a clear error naming the key.
        store.open_experiment(lcfg.tracking_uri, lcfg.experiment_name)
    tags = {k: str(v) for k, v in (lcfg.get("tags") or {}).items()}
    sweep_name, sweep_tags = sweep.job_tags()  # parent run, sweep id, job number in a -m sweep
    tags.update(sweep_tags)
    run_name = lcfg.get("run_name") or sweep_name or sweep.run_name_from_overrides(cfg)
    # Retries on a locked store (parallel jobs share one); train() alone ends the run.
    logger = store.RunLogger(
        experiment_name=lcfg.experiment_name,
        tracking_uri=lcfg.tracking_uri,
        run_name=run_name,
        tags=tags,
        log_model=False,
        run_id=run_id,
    )
    if rank0 and run_id is not None:
        logger.experiment.update_run(run_id, status="RUNNING")  # it ended KILLED or FINISHED
        # this start's process and place in the sweep (a sweep's stop signal finds it by pid)
        tracking.set_tags(logger, sweep_tags)
    # mlflow_run.json beside checkpoints/: eval links a checkpoint to this run, the sweep finds it.
    if rank0:
        sweep.write_run_file(
            output_dir(cfg), logger.run_id, logger.experiment_id, lcfg.tracking_uri
        )
        sweep.note_started_run(logger.run_id)  # a failure from here on is this run's
    return logger


def train(cfg: DictConfig) -> float:
    """Run one GRPO experiment; returns ``cfg.train.objective`` at the end (for sweepers).

    The config is validated before any compute. The output dir is locked for the run's length
    (``locks.RUN_LOCK``): a second process writing it is refused. Once the MLflow run exists,
    any failure (SFT, a reward function, a NaN loss) marks it FAILED with the error; checkpoints
    already written stay on disk. With ``resume=auto`` a run already FINISHED with this config
    is not run again: its objective is read back from MLflow (a sweep run again skips its
    finished jobs).
    """
    validate(cfg)
    sweep.check_job_gpu(cfg)  # hydra/launcher=parallel_gpu: a job given a GPU has one
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r} does not exist; give a .ckpt written by a run"
        )
    out = output_dir(cfg)
    faults.check_writable_dir(out, "paths.output_dir", out)  # where the lock file goes
    # Only global rank 0 locks the dir and makes and writes the MLflow run; Lightning learns which
    # one that is (its rank_zero_only) only when the process group starts, after the run exists.
    rank0 = distributed.adopt_launched_rank() == 0
    lock = locks.OwnerLock(out / locks.RUN_LOCK, "output dir", "paths.output_dir", out)
    if rank0:  # the other ranks of a DDP run write through rank 0
        lock.acquire()
    try:
        return _train_in(cfg, out, rank0)
    finally:
        lock.release()


def _train_in(cfg: DictConfig, out: Path, rank0: bool) -> float:
    """``train`` once the output dir is this process's."""
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep and sweep.sweep_stopping(HydraConfig.get().sweep.dir):
        # the launcher started this job while a signal stops the sweep: it never begins
        raise faults.Interrupted(signal.SIGTERM, "the sweep is stopping; this job did not start")
    params = tracking.config_params(cfg)
    if cfg.get("resume") == "auto":
        finished = resume.finished_run(out, cfg.logger.tracking_uri, params)
        if finished is not None:
            return _report_finished(cfg, finished, out)
    ckpt = resume.checkpoint_to_resume(cfg, out, fixed_output_dir(cfg))
    if rank0:
        resume.refuse_other_run_in(out, ckpt, *_output_dir_key(cfg, in_sweep))
    if cfg.get("resume") == "auto" and ckpt is None and rank0:
        # killed before its first checkpoint: nothing to continue, and its metrics would repeat
        resume.retire_unresumable_run(out, cfg.logger.tracking_uri)
    # A resume logs into the checkpoint's MLflow run: a config that run cannot take fails here.
    run, changed = resume.run_to_continue(ckpt, cfg.logger.tracking_uri, params)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(cfg.get("num_threads") or torch.get_num_threads())
    faults.check_writable_dir(out / "checkpoints", "paths.output_dir", out)

    # a stop signal while the run is made and noted stops it once it can end KILLED
    with faults.deferred_signals(faults.STOP_SIGNALS, final=False) as caught:
        logger = make_logger(cfg, run.info.run_id if run is not None else None)
    try:
        # Until the training loop takes over (StopOnSignal), a signal stops the run at once.
        with faults.signal_handlers(faults.raise_interrupted):
            if caught:
                raise faults.Interrupted(caught[0], "stopped as its run started")
            if in_sweep and sweep.sweep_stopping(HydraConfig.get().sweep.dir):
                # the sweep's stop came after this job's check above, before its run existed
                raise faults.Interrupted(signal.SIGTERM, "the sweep is stopping")
            if rank0:
                tracking.log_config(logger, cfg, run.data.params if run is not None else None)
            if run is None and rank0:
                # params hold "auto"; the tag says what it resolved to for this run
                shared = Batching.from_config(cfg).shared
                tracking.set_tags(logger, {"grpo_lab.shared_prefix": str(shared).lower()})
            if run is not None and rank0:
                tracking.note_resume(logger, ckpt, {k: now for k, (_, now) in changed.items()})
            objective = _fit(cfg, logger, out, str(ckpt) if ckpt else None)
    except faults.Interrupted as stop:
        # a repeated signal must not leave the run RUNNING or its sweep's parent unmarked
        signum, chained = stop.signum, stop.chained
        with faults.deferred_signals():
            logger.finalize("KILLED")
            faults.exit_interrupted(
                signum,
                f"MLflow run {logger.run_id} ended as KILLED. {stop.detail}".strip(),
                then=lambda: faults.after_preemption(signum, chained, rank0),
            )
    except BaseException as err:
        if rank0:
            sweep.record_failure(logger.experiment, logger.run_id, err)  # tag + traceback artifact
        logger.finalize("FAILED")
        raise
    logger.finalize("FINISHED")
    if not rank0:
        return objective  # rank 0 reports the run
    log.info("objective %s = %.4f", cfg.train.objective, objective)
    print(f"[grpo-lab] {cfg.train.objective} = {objective:.4f}  (run {logger.run_id})")
    print(f"[grpo-lab] checkpoints: {out / 'checkpoints'}")
    print(f"[grpo-lab] MLflow UI: {tracking.ui_command(cfg.logger.tracking_uri)}")
    print(
        f"[grpo-lab]   then open {tracking.runs_url(cfg.logger.tracking_uri, logger.experiment_id)}"
    )
    return objective


def _report_finished(cfg: DictConfig, run: Any, out: Path) -> float:
    """The objective of a run that already FINISHED with this config, as MLflow holds it."""
    metrics = run.data.metrics
    objective = metrics.get("objective", metrics.get(f"{cfg.train.objective}_final", math.nan))
    if distributed.launched_rank() == 0:
        print(
            f"[grpo-lab] already FINISHED (resume=auto): MLflow run {run.info.run_id} in {out}; "
            f"{cfg.train.objective} = {objective:.4f}. Nothing to do; raise train.rollouts to "
            "train it further"
        )
    return float(objective)


def _fit(cfg: DictConfig, logger: MLFlowLogger, out: Path, ckpt_path: str | None) -> float:
    """Build the parts, evaluate the start, fit, evaluate the end; returns the objective."""
    task = instantiate(cfg.task)
    if distributed.launched_rank() == 0:  # the run's Datasets panel: what it trains and scores on
        tracking.log_datasets(logger, task, cfg.train.eval_size)
    rewards = build_rewards(cfg)
    sampler = instantiate(cfg.sampler)
    policy, sft_path = build_policy(cfg, task)
    if sft_path is not None and distributed.launched_rank() == 0:
        logger.experiment.set_tag(logger.run_id, "grpo_lab.sft_warm_start", str(sft_path))
    warn_on_inert_settings(cfg)
    module = build_module(cfg, policy=policy, task=task, rewards=rewards, sampler=sampler)
    datamodule = TaskDataModule(
        task, cfg.train.prompts_per_step, cfg.train.eval_size, cfg.train.eval_batch_size, cfg.seed
    )
    stop = faults.StopOnSignal()
    per_rollout = optimizer_steps(cfg) // cfg.train.rollouts  # mu x mini-batches
    checkpoint = RolloutCheckpoint(
        dirpath=out / "checkpoints",
        filename="rollout-{step}",
        save_last=True,
        # checkpoint_every counts rollouts; Lightning counts optimizer steps (global_step)
        every_n_train_steps=cfg.train.checkpoint_every * per_rollout,
        save_top_k=-1,
    )
    max_steps = cfg.trainer.get("max_steps") or optimizer_steps(cfg)
    callbacks = [
        checkpoint,
        RNGStates(cfg.seed),
        tracking.CompletionTable(cfg.train.log_samples_every, cfg.train.num_samples_logged),
        stop,
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RolloutProgressBar(math.ceil(max_steps / per_rollout)))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        val_check_interval=cfg.train.eval_every,
        check_val_every_n_epoch=None,
        logger=logger,
        callbacks=callbacks,
        plugins=[faults.AtomicCheckpointIO()],
        default_root_dir=str(out),
        # The prompt sampler (data.PromptBatches) splits the prompts between ranks itself.
        use_distributed_sampler=False,
    )
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    distributed.check_launch(trainer, multirun, cfg.trainer.strategy, cfg.trainer.devices)
    # The GRPO stage starts from the seed's RNG state whether the warm start was trained just now
    # or read from the cache (training it draws random numbers), so both runs sample alike.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if not ckpt_path:
        start = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        logger.log_metrics({"eval/accuracy_start": start["eval/accuracy"]}, step=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if stop.signum is not None:
        path = out / "checkpoints" / "last.ckpt"
        with faults.deferred_signals():  # a second signal must not cut the save short
            trainer.save_checkpoint(path)
        stop.release()
        again = (
            "run the same command again to resume (resume=auto)"
            if cfg.get("resume") == "auto"
            else f"resume with ckpt_path={path}"
        )
        raise faults.Interrupted(
            stop.signum, f"Checkpoint of step {trainer.global_step}; {again}", stop.chained
        )
    if module.last_eval is not None and module.last_eval[0] == module.rollouts_done:
        final = dict(module.last_eval[1])  # the last rollout was just evaluated
    else:
        final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    # Stepped by rollout, as every other metric (global_step counts optimizer updates).
    logger.log_metrics(
        {f"{k}_final": v for k, v in final.items() if k.startswith("eval/")},
        step=module.rollouts_done,
    )
    objective = float(
        final.get(cfg.train.objective, trainer.callback_metrics.get(cfg.train.objective, math.nan))
    )
    # what a sweeper maximises, on the run: a sweep run again reads it back for finished jobs
    logger.log_metrics({"objective": objective}, step=module.rollouts_done)
    return objective


def silence_noise() -> None:
    """Drop log lines and warnings that say nothing to a grpo_lab user."""
    import warnings

    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # task=hf; read at import
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
