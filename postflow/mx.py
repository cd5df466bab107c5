"""MX ordering per RFC 5321 §5.1: pure, fed with records, no DNS."""

from __future__ import annotations

import random
from itertools import groupby

__all__ = ["order_mx"]


def order_mx(
    records: list[tuple[int, str]], rng: random.Random | None = None
) -> list[tuple[int, str]]:
    """Lower preference first; equal preferences shuffled ("MUST randomize", §5.1)."""
    rng = rng or random.Random()
    ordered: list[tuple[int, str]] = []
    for _, same in groupby(sorted(records, key=lambda r: r[0]), key=lambda r: r[0]):
        tier = list(same)
        rng.shuffle(tier)
        ordered.extend(tier)
    return ordered
