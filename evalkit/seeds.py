"""Seeds derived from keys, never from the order in which a global RNG is consumed."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*keys: object) -> int:
    """A 63-bit seed that depends only on ``keys`` (e.g. ``derive_seed(study_id, item_id)``)."""
    text = "\x1f".join(str(k) for k in keys)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def rng_for(*keys: object) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(*keys))


def stable_hash(*keys: object, length: int = 16) -> str:
    """A short hex digest of ``keys``; used for content-derived ids."""
    text = "\x1f".join(str(k) for k in keys)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def unit_interval(*keys: object) -> float:
    """A number in [0, 1) that depends only on ``keys``; used for hash-based splits."""
    return derive_seed(*keys) / 2**63
