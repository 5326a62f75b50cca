"""Deterministic splits for data that has none.

An item's split is a function of its ``item_id`` alone: ``u = unit_interval("evalkit-split", item_id)``; the
item goes to ``train`` when ``u < 0.8``, to ``valid1`` when ``u < 0.9``, else to ``valid2``. So the same post is in the
same split in every run and on every machine, and adding data never moves an item. A split recorded with the data
(OpenAI's files, the released comparisons) always wins over the hash.
"""

from __future__ import annotations

from evalkit.artifacts import SPLITS
from evalkit.errors import EvalkitError
from evalkit.seeds import unit_interval

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid1": 0.1, "valid2": 0.1}
# names used by other releases of the same data
SPLIT_ALIASES = {"valid": "valid1", "validation": "valid1", "test": "valid2"}


def hash_split(item_id: str) -> str:
    u = unit_interval("evalkit-split", item_id)
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS.items():
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def check_split(split: str | None) -> str | None:
    if split is None:
        return None
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise EvalkitError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    return split
