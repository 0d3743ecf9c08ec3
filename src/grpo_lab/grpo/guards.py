"""What a GRPO step does with non-finite numbers: a NaN loss stops the run (it names what to
check); a finite loss with a non-finite gradient skips that optimizer step, and too many skips
in a row stop the run. Checkpoints already written are kept either way."""

from __future__ import annotations

from torch import Tensor

_WHAT_TO_CHECK = (
    "check the rewards (reward.weights, each rewards/<fn>/mean) and sampler.temperature"
)


def check_finite_loss(loss: Tensor, rollout: int) -> None:
    """Raise FloatingPointError when the loss of rollout ``rollout`` (1-based) is NaN or inf."""
    if not loss.isfinite():
        raise FloatingPointError(
            f"GRPO loss is {loss.item()} at rollout {rollout}; lower train.lr or {_WHAT_TO_CHECK}. "
            "Checkpoints saved so far are kept."
        )


class SkippedSteps:
    """Counts optimizer steps skipped for a non-finite gradient norm.

    A finite loss can carry a NaN or inf gradient (0 x inf in a backward); applying it would ruin
    the weights and Adam's moments for good, so the step is skipped. ``limit`` skips in a row stop
    the run (``train.max_consecutive_skipped_steps``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.consecutive = 0

    def stepped(self) -> None:
        self.consecutive = 0

    def skipped(self, grad_norm: float, rollout: int) -> None:
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"{self.consecutive} optimizer steps in a row had a non-finite gradient norm "
                f"({grad_norm}), the last at rollout {rollout}; each was skipped, and "
                f"train.max_consecutive_skipped_steps={self.limit} stops the run here. Try a "
                "lower train.lr, or check the rewards, sampler.temperature and the policy's "
                "dtype. Checkpoints saved so far are kept."
            )
