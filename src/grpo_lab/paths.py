"""Where the config tree is: ``conf/`` at the top of a checkout, or inside an installed wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "conf"  # a wheel ships conf/ inside the package
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"  # src layout: <root>/src/grpo_lab
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"grpo_lab's config tree is missing: looked in {packaged} and {checkout}"
    )
