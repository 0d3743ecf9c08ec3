"""Length shaping: a linear length penalty and DAPO's overlong soft penalty.

Both read ``lengths`` (completion tokens, EOS included) from the reward context.
"""

from __future__ import annotations

from typing import Any

from grpo_lab.tasks.base import Example


def length_penalty(
    completions: list[str],
    examples: list[Example],
    *,
    lengths: list[int],
    target: int = 0,
    scale: float = 0.01,
    **_: Any,
) -> list[float]:
    """r_i = -scale * max(0, |o_i| - target): linear in the tokens beyond ``target``.

    target: tokens allowed for free (0 = every token costs); scale: reward per extra token.
    """
    if target < 0 or scale < 0:
        raise ValueError(
            f"length_penalty: target={target}, scale={scale}; allowed: target >= 0 and scale >= 0"
        )
    return [-scale * max(0, n - target) for n in lengths]


def overlong_penalty(
    completions: list[str],
    examples: list[Example],
    *,
    lengths: list[int],
    max_new_tokens: int,
    max_len: int | None = None,
    cache: int | None = None,
    **_: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L = ``lengths[i]``:

        R(L) = 0                                  if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                                 if L > L_max

    max_len: L_max (null = the sampler's max_new_tokens); cache: L_cache, the soft window
    (null = L_max // 5, at least 1; DAPO uses 4096 of 20480).
    """
    L_max = max_new_tokens if max_len is None else max_len
    L_cache = max(1, L_max // 5) if cache is None else cache
    if L_max < 1 or not 0 < L_cache <= L_max:
        raise ValueError(
            f"overlong_penalty: max_len={L_max}, cache={L_cache}; allowed: 0 < cache <= max_len"
        )
    soft_start = L_max - L_cache
    out = []
    for n in lengths:
        if n <= soft_start:
            out.append(0.0)
        elif n <= L_max:
            out.append((soft_start - n) / L_cache)
        else:
            out.append(-1.0)
    return out
