"""The training corpora's guard: no held-out (valid1/valid2) text in anything a stage trains on, and the
pretraining documents (TL;DR and CNN/DM ``train`` text, in a fixed shuffled order)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from evalkit.data import load_items
from evalkit.errors import EvalkitError
from evalkit.seeds import derive_seed
from evalkit.vocab import HELD_OUT_SPLITS


def assert_no_held_out(items: pd.DataFrame, what: str) -> None:
    """Refuse any valid1/valid2 item in a training corpus (by split and by id against every known held-out item)."""
    bad = items[items["split"].isin(HELD_OUT_SPLITS)]
    if len(bad):
        raise EvalkitError(f"{what}: item {bad['item_id'].iloc[0]} is in split {bad['split'].iloc[0]}; held-out text may not be trained on")
    held_out = set()
    for dataset in items["dataset"].unique():
        for split in HELD_OUT_SPLITS:
            held_out |= set(load_items(dataset, split)["item_id"])
    leaked = sorted(set(items["item_id"]) & held_out)
    if leaked:
        raise EvalkitError(f"{what}: item {leaked[0]} is held out (valid1/valid2) in the bundled data; it may not be trained on")


def pretraining_texts(max_items: int | None = None) -> list[str]:
    """Documents for pretraining: TL;DR ``train`` posts (title and post) and the CNN/DM ``train`` articles."""
    tldr = load_items("tldr", "train")
    cnndm = load_items("cnndm", "train")
    assert_no_held_out(pd.concat([tldr, cnndm]), "pretraining corpus")
    texts = [f"{t}\n\n{b}" for t, b in zip(tldr["title"], tldr["body"])] + list(cnndm["body"])
    order = np.random.default_rng(derive_seed("pretraining-corpus")).permutation(len(texts))
    texts = [texts[i] for i in order]
    return texts[:max_items] if max_items else texts
