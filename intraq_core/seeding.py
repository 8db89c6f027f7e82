"""Deterministic seed derivation, independent of how work is split across processes."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (e.g. run seed, purpose, index).

    Uses numpy's SeedSequence hashing, so nearby keys give unrelated seeds and the result
    does not depend on the order in which shards are processed.
    """
    if any(k < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# Purposes, so that seeds drawn for different things never collide.
PURPOSE_LABELS = 1
PURPOSE_IMAGE = 2
PURPOSE_SHARD = 3
PURPOSE_DISTILL = 4
PURPOSE_CALIBRATION = 5
