"""What a study is about, read from its spec and its folder: its items, its out-of-domain transfer items and its
collected judgments (a damaged judgments file is set aside, never lost)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from evalkit import artifacts
from evalkit.config import StudyConfig
from evalkit.data import load_items
from evalkit.errors import EvalkitError

log = logging.getLogger(__name__)


def study_items_of(cfg: StudyConfig) -> pd.DataFrame:
    """The items a study is about: its dataset split (the first ``n_items`` by id when set)."""
    items = load_items(cfg.data.dataset, cfg.data.split, cfg.data.path)
    if cfg.data.n_items:
        items = items.sort_values("item_id").head(cfg.data.n_items)
    return items.reset_index(drop=True)


def transfer_items_of(cfg: StudyConfig) -> pd.DataFrame:
    """The out-of-domain items the same policies summarise (``[data] transfer``), or an empty frame."""
    if not cfg.data.transfer:
        return artifacts.empty_table("items")
    items = load_items(cfg.data.transfer, cfg.data.transfer_split)
    if cfg.data.transfer_items:
        items = items.sort_values("item_id").head(cfg.data.transfer_items)
    return items.drop(columns=[c for c in items.columns if c == "source_id"]).reset_index(drop=True)


def read_judgments(target: Path) -> pd.DataFrame:
    """A study's judgments. A damaged file (unreadable Parquet) is kept, renamed ``judgments.parquet.corrupt``, with a
    warning, and the study continues without it: simulated answers are made again, the web app's can be collected
    again (`evalkit study collect`), and imported files imported again."""
    try:
        return artifacts.read_table(target, "judgments")
    except EvalkitError as exc:
        aside = target.with_name(target.name + ".corrupt")
        target.replace(aside)
        log.warning("%s; kept as %s. Answers collected by the web app can be collected again with `evalkit study "
                    "collect`; imported answer files must be imported again", exc, aside)
        return artifacts.empty_table("judgments")
