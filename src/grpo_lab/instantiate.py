"""The one place that turns ``_target_`` configs into objects (an allow-list goes here)."""

from __future__ import annotations

from typing import Any

import hydra.utils


def instantiate(spec: Any, **kwargs: Any) -> Any:
    return hydra.utils.instantiate(spec, **kwargs)
