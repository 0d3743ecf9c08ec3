"""A reward for CLI tests of the update mechanics: it varies between any two different texts.

A few-step SFT warm start rarely answers right, so accuracy gives every completion of a group the
same reward, A = 0 and no update at all. Tests that check what an update does (pi_old, clipping,
mini-batches) load this as a custom reward (``conf/reward/custom.yaml``) through PYTHONPATH.
"""

from __future__ import annotations


def text_checksum(completions: list[str], examples, **ctx) -> list[float]:
    """A deterministic score in [0, 1) that differs for most pairs of distinct completions."""
    return [(sum(map(ord, text)) % 13) / 13 for text in completions]
