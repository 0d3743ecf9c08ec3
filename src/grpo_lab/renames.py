"""Config names that moved when the GRPO step became parts (grpo_lab/grpo/), old -> new.

The ``loss`` group held the aggregation and the surrogate's knobs; ``advantage.scale`` picked the
advantage. Commands, sweeps and MLflow runs made with the old names keep working: the CLI rewrites
old overrides (and says so), a resume compares a run's old params under their new names, and the
report names a sweep's arms by the new keys.
"""

from __future__ import annotations

from collections.abc import Mapping

# option files of conf/advantage/ by the old advantage.scale value
_ADVANTAGE_BY_SCALE = {"group_std": "group", "batch_std": "batch_std", "none": "group_mean", "rloo": "rloo"}  # fmt: skip
_SURROGATE_BY_RATIO_LEVEL = {"token": "ppo_clip", "sequence": "gspo"}
_MOVED_KEYS = {
    "loss.aggregation": "aggregation",  # a group option now
    "loss.epsilon_low": "surrogate.epsilon_low",
    "loss.epsilon_high": "surrogate.epsilon_high",
    "loss.dual_clip": "surrogate.dual_clip",
}
_CLASS = {
    "aggregation": {
        "seq_mean_token_mean": "grpo_lab.grpo.aggregation.SeqMeanTokenMean",
        "token_mean": "grpo_lab.grpo.aggregation.TokenMean",
        "seq_mean_token_sum_norm": "grpo_lab.grpo.aggregation.SeqMeanTokenSumNorm",
    },
    "advantage": {
        "group_std": "grpo_lab.grpo.advantages.GroupZScore",
        "batch_std": "grpo_lab.grpo.advantages.BatchStd",
        "none": "grpo_lab.grpo.advantages.GroupMean",
        "rloo": "grpo_lab.grpo.advantages.RLOO",
    },
    "surrogate": {
        "token": "grpo_lab.grpo.surrogates.PPOClip",
        "sequence": "grpo_lab.grpo.surrogates.GSPO",
    },
}


def _split(override: str) -> tuple[str, str, str | None]:
    """``+loss.x=1`` -> ("+", "loss.x", "1"); ``~loss.x`` -> ("~", "loss.x", None)."""
    body = override.lstrip("+~")
    prefix = override[: len(override) - len(body)]
    key, eq, value = body.partition("=")
    return prefix, key, value if eq else None


def _map_values(value: str, table: Mapping[str, str]) -> str:
    """Map each value of a plain value or a comma sweep (``a,b``) through ``table``."""
    return ",".join(table.get(v.strip(), v.strip()) for v in value.split(","))


def rewrite_override(override: str) -> tuple[str, str | None]:
    """One command-line override under today's names, and a note when it was rewritten."""
    prefix, key, value = _split(override)
    new: str | None = None
    if key in ("loss", "loss.aggregation") and value is not None:
        new = f"{prefix}aggregation={value}"
    elif key in _MOVED_KEYS:
        new = f"{prefix}{_MOVED_KEYS[key]}" + (f"={value}" if value is not None else "")
    elif key == "advantage.scale" and value is not None:
        new = f"advantage={_map_values(value, _ADVANTAGE_BY_SCALE)}"
    elif key == "loss.ratio_level" and value is not None:
        new = f"surrogate={_map_values(value, _SURROGATE_BY_RATIO_LEVEL)}"
    if new is None:
        return override, None
    return new, f"{override} is now {new}"


# Before the parts, loss.ratio_level=sequence kept the loss's clip range (${epsilon} unless
# loss.epsilon_* said otherwise); conf/surrogate/gspo.yaml has GSPO's own 3e-4/4e-4.
_OLD_CLIP = ("surrogate.epsilon_low=${epsilon}", "surrogate.epsilon_high=${epsilon}")


def rewrite_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Every override under today's names, and a note for each one rewritten.

    An old ``loss.ratio_level=sequence`` also gets the clip range it had then (epsilon), for
    each surrogate.epsilon_* the command line does not give: the same numbers as before."""
    pairs = [rewrite_override(o) for o in overrides]
    out, notes = [o for o, _ in pairs], [n for _, n in pairs if n]
    given = {_split(o)[1] for o in out}
    for i, (old, new) in enumerate(zip(overrides, list(out))):
        if _split(old)[1] == "loss.ratio_level" and "gspo" in new:
            keep = [o for o in _OLD_CLIP if _split(o)[1] not in given]
            out[i + 1 : i + 1] = keep
            if keep:
                notes.append(
                    f"{old} kept the loss's clip range: {' '.join(keep)} (GSPO's own "
                    "range is surrogate.epsilon_low=3e-4 surrogate.epsilon_high=4e-4)"
                )
            break
    return out, notes


def new_key(key: str) -> str:
    """A swept key under today's name (``loss`` -> ``aggregation``)."""
    return _split(rewrite_override(f"{key}=x")[0])[1]


def new_params(params: Mapping[str, str]) -> dict[str, str]:
    """An MLflow run's params (flattened config) under today's names and values, for comparing
    a run logged before the parts with today's config (a resume)."""
    out = dict(params)
    aggregation = out.pop("loss.aggregation", None)
    if aggregation is not None:
        out.setdefault("aggregation._target_", _CLASS["aggregation"].get(aggregation, aggregation))
    level = out.pop("loss.ratio_level", None)
    if level is not None:
        out.setdefault("surrogate._target_", _CLASS["surrogate"].get(level, level))
    for old, new in _MOVED_KEYS.items():
        if old in out and old != "loss.aggregation":
            out.setdefault(new, out.pop(old))
    scale = out.pop("advantage.scale", None)
    if scale is not None:
        out.setdefault("advantage._target_", _CLASS["advantage"].get(scale, scale))
        if scale in ("none", "rloo"):  # these options have no eps or Bessel switch any more
            out.pop("advantage.eps", None)
            out.pop("advantage.unbiased_std", None)
    return out
