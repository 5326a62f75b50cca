"""Datasets (TL;DR, CNN/DM), released human comparisons and query formatting.

``DATASETS`` is the registry: a plain dict from dataset name to its loader.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from evalkit.data.bundled import COMPARISON_BATCHES, bundled_path, comparison_batch, load_gpt2_tokenizer
from evalkit.data.cnndm import load_cnndm
from evalkit.data.openai import (
    load_openai_comparisons,
    openai_policy_info,
    preferred_to_reference,
    read_openai_comparisons,
    tldr_item_id,
)
from evalkit.data.query import (
    CNNDM_TRANSFER_FORMAT,
    MAX_QUERY_TOKENS,
    MAX_SUMMARY_TOKENS,
    QUERY_FORMATS,
    TLDR_FORMAT,
    format_query,
    format_summary,
    parse_tldr_query,
)
from evalkit.data.splits import SPLIT_FRACTIONS, hash_split
from evalkit.data.tldr import OPENAI_PPO_POLICY, load_llm_judgments, load_openai_ppo_summaries, load_tldr
from evalkit.errors import EvalkitError

DATASETS = {"tldr": load_tldr, "cnndm": load_cnndm}


def load_items(dataset: str, split: str | None = None, path: str | Path | None = None) -> pd.DataFrame:
    """The ``items`` table of one dataset (bundled unless ``path`` names a user's file), optionally one split."""
    if dataset not in DATASETS:
        raise EvalkitError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    items = DATASETS[dataset](split=split, path=path)
    if items.empty:
        raise EvalkitError(f"dataset {dataset!r} has no items in split {split!r}")
    return items


__all__ = [
    "CNNDM_TRANSFER_FORMAT", "COMPARISON_BATCHES", "DATASETS", "MAX_QUERY_TOKENS", "MAX_SUMMARY_TOKENS",
    "OPENAI_PPO_POLICY", "QUERY_FORMATS", "SPLIT_FRACTIONS", "TLDR_FORMAT", "bundled_path", "comparison_batch",
    "format_query", "format_summary", "hash_split", "load_cnndm", "load_gpt2_tokenizer", "load_items", "load_llm_judgments",
    "load_openai_comparisons", "load_openai_ppo_summaries", "load_tldr", "openai_policy_info", "parse_tldr_query",
    "preferred_to_reference", "read_openai_comparisons", "tldr_item_id",
]
