"""How a rollout of N = B*G completions is cut for the updates: the one place that knows.

mini-batch: completions per optimizer step (``train.minibatch_size``, or N / ``train.num_minibatches``;
N when neither is set). micro-batch: completions per forward/backward (``train.microbatch_size``,
dividing the mini-batch; gradients accumulate over a mini-batch's micro-batches). The config check,
``max_steps`` and the step all read their sizes from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Batching:
    """B prompts x G completions per rollout, and the mini/micro-batch settings of ``train.*``.

    shared_prefix: "auto", True or False as configured; ``shared`` is what it resolves to.
    """

    B: int
    G: int
    minibatch_size: int | None = None
    num_minibatches: int | None = None
    microbatch_size: int | None = None
    shared_prefix: Any = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> Batching:
        t = cfg.train
        return cls(
            B=t.prompts_per_step,
            G=cfg.G,
            minibatch_size=t.minibatch_size,
            num_minibatches=t.num_minibatches,
            microbatch_size=t.microbatch_size,
            shared_prefix=t.get("shared_prefix", "auto"),
        )

    @property
    def rollout_size(self) -> int:
        return self.B * self.G

    def minibatch(self, n: int | None = None) -> int:
        """Completions per optimizer step for a rollout of n completions (default B*G)."""
        n = self.rollout_size if n is None else n
        if self.num_minibatches:
            return n // self.num_minibatches
        return self.minibatch_size or n

    def microbatch(self, n: int | None = None) -> int:
        return self.microbatch_size or self.minibatch(n)

    def steps_per_rollout(self, mu: int, n: int | None = None) -> int:
        """mu x mini-batches: how many times the policy moves on one rollout."""
        n = self.rollout_size if n is None else n
        return mu * math.ceil(n / self.minibatch(n))

    @property
    def shared(self) -> bool:
        """Whether each forward runs a group's prompt once for its G completions: as configured,
        or under auto when every mini- and micro-batch holds whole groups."""
        if self.shared_prefix != "auto":
            return bool(self.shared_prefix)
        return self.minibatch() % self.G == 0 and self.microbatch() % self.G == 0

    def order(self, n: int, shuffle: bool, device: Any = "cpu") -> Tensor:
        """The order rows are visited in, (n,). With the shared prefix whole groups are shuffled
        (their G rows stay together), so every micro-batch holds whole groups."""
        import torch  # here, not at the top: the config check imports this module before torch

        if not shuffle:
            return torch.arange(n, device=device)
        if not self.shared:
            return torch.randperm(n, device=device)
        G = self.G
        groups = torch.randperm(n // G, device=device)
        return (groups.unsqueeze(1) * G + torch.arange(G, device=device)).reshape(-1)

    def errors(self) -> list[str]:
        """What is wrong with these settings, each naming the keys and what would fit."""
        out = []
        n, mini, parts, micro = (
            self.rollout_size,
            self.minibatch_size,
            self.num_minibatches,
            self.microbatch_size,
        )
        B, G = self.B, self.G
        if mini is not None and parts is not None:
            out.append(
                f"train.num_minibatches={parts} and train.minibatch_size={mini} are both set: "
                "give one of them and set the other to null"
            )
        if mini is not None and n % mini:
            out.append(
                f"train.minibatch_size={mini} is invalid: it must divide the rollout batch "
                f"train.prompts_per_step * G = {B} * {G} = {n} (e.g. {_divisors(n)})"
            )
        if parts is not None and n % parts:
            out.append(
                f"train.num_minibatches={parts} is invalid: it must divide the rollout batch "
                f"train.prompts_per_step * G = {B} * {G} = {n} (e.g. {_divisors(n)})"
            )
        step = mini or (n // parts if parts and not n % parts else n)
        if micro is not None and step % micro:
            out.append(
                f"train.microbatch_size={micro} is invalid: it must divide the mini-batch of "
                f"{step} completions (e.g. {_divisors(step)})"
            )
        # The shared-prefix forward runs a prompt once for its G rows: a forward needs them all.
        if self.shared_prefix is True:
            sizes = []
            if mini is not None:
                sizes.append((f"train.minibatch_size={mini}", mini))
            elif parts is not None:
                sizes.append((f"train.num_minibatches={parts} (mini-batches of {step})", step))
            if micro is not None:
                sizes.append((f"train.microbatch_size={micro}", micro))
            for name, size in sizes:
                if size % G:
                    out.append(
                        f"{name} is invalid with train.shared_prefix=true: completions per "
                        f"batch must be a multiple of G={G} (whole groups); or set "
                        "train.shared_prefix=false"
                    )
        return out


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
