"""Typed schemas of the swappable algorithm parts (``kl``, ``advantage``, ``loss``) and the
algorithm's top-level and ``train.*`` keys.

``config.validate`` merges each composed node into ``OmegaConf.structured(<schema>)``, so a
value of the wrong type (``G=abc``, ``loss.dual_clip=foo``), an option outside an enum
(``kl.estimator=k4``), a missing key or an unknown key (``+loss.foo=1``) fails before any
compute, naming the key, the value and what is allowed. Ranges (``G >= 2``, ``0 < ref_sync_mix
<= 1``) are ``config.RULES``, which also types and bounds every other numeric key of ``conf/``.
The YAML files in ``conf/{kl,advantage,loss}/`` give the values; these classes only say what
each value may be.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional  # OmegaConf's structured configs read Optional, not X | None


class KLEstimator(str, Enum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"
    none = "none"


class KLMode(str, Enum):
    loss = "loss"
    reward = "reward"


class AdvantageScale(str, Enum):
    group_std = "group_std"
    batch_std = "batch_std"
    none = "none"
    rloo = "rloo"


class Aggregation(str, Enum):
    seq_mean_token_mean = "seq_mean_token_mean"
    token_mean = "token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"


class RatioLevel(str, Enum):
    token = "token"
    sequence = "sequence"


class RewardOnError(str, Enum):
    raise_ = "raise"
    zero = "zero"


class Scheduler(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


@dataclass
class KLSchema:
    """conf/kl/*: which per-token KL estimator, and where it enters (loss or reward)."""

    estimator: KLEstimator
    mode: KLMode


@dataclass
class AdvantageSchema:
    """conf/advantage/*: how rewards become advantages."""

    scale: AdvantageScale
    eps: float
    unbiased_std: bool


@dataclass
class LossSchema:
    """conf/loss/*: aggregation and the surrogate's knobs."""

    aggregation: Aggregation
    epsilon_low: float
    epsilon_high: float
    ratio_level: RatioLevel
    dual_clip: Optional[float]  # noqa: UP045
    entropy_coef: float
    mask_truncated: bool


@dataclass
class TopSchema:
    """The paper's symbols at the top level of conf/config.yaml."""

    G: int
    epsilon: float
    beta: float
    mu: int
    seed: int
    num_threads: Optional[int]  # noqa: UP045


@dataclass
class TrainSchema:
    """The keys of ``train.*`` and their types (their ranges: ``config.RULES``)."""

    rollouts: int
    prompts_per_step: int
    minibatch_size: Optional[int]  # noqa: UP045
    num_minibatches: Optional[int]  # noqa: UP045
    microbatch_size: Optional[int]  # noqa: UP045
    shared_prefix: Any  # auto | true | false (config.RULES checks it)
    compile: bool
    lr: float
    weight_decay: float
    warmup_steps: int
    scheduler: Scheduler
    max_grad_norm: Optional[float]  # noqa: UP045
    max_consecutive_skipped_steps: int
    eval_every: int
    eval_size: int
    eval_batch_size: int
    checkpoint_every: int
    log_samples_every: int
    num_samples_logged: int
    objective: str
    ref_sync_every: int
    ref_sync_mix: float
    dynamic_sampling: bool
    dynamic_sampling_max_tries: int


# config path -> (schema, strict). Strict: every key of the schema is required and no other key
# is allowed (a config group the schema owns); not strict: only the keys present are typed.
SCHEMAS: dict[str, tuple[type, bool]] = {
    "": (TopSchema, False),
    "kl": (KLSchema, True),
    "advantage": (AdvantageSchema, True),
    "loss": (LossSchema, True),
    "train": (TrainSchema, False),
}
