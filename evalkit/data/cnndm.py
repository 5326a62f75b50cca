"""CNN/DailyMail articles as ``items`` rows: the bundled 1,000 validation articles or a user's CSV/JSON Lines file
with ``article``, ``highlights`` and ``id`` fields. The highlights (one sentence a line) are the reference, joined with
spaces. CNN/DM carries no evalkit split of its own: items are split by ``hash_split`` unless a split is declared, so
the ``train`` part can enter a pretraining corpus while ``valid1``/``valid2`` stay held out.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from evalkit.artifacts import conform
from evalkit.data.bundled import CNNDM_CSV, bundled_path
from evalkit.data.io import iter_jsonl, read_csv_columns, require_keys
from evalkit.data.openai import cnndm_item_id
from evalkit.data.splits import check_split, hash_split
from evalkit.errors import EvalkitError

CNNDM_FIELDS = ("article", "highlights", "id")


def _highlights(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def load_cnndm(split: str | None = None, path: str | Path | None = None, file_split: str | None = None) -> pd.DataFrame:
    """CNN/DM ``items``: the bundled articles or a user's file; optionally one split only."""
    split = check_split(split)
    file_split = check_split(file_split)
    source_path = bundled_path(CNNDM_CSV) if path is None else Path(path)
    source = ("bundled:" + CNNDM_CSV) if path is None else source_path.name
    if source_path.suffix.lower() in (".jsonl", ".json"):
        records = []
        for lineno, rec in iter_jsonl(source_path):
            require_keys(rec, CNNDM_FIELDS, f"{source_path}:{lineno}")
            records.append(rec)
        df = pd.DataFrame(records)
    else:
        df = read_csv_columns(source_path, CNNDM_FIELDS)
    rows = []
    for article, highlights, article_id in zip(df["article"], df["highlights"], df["id"]):
        if not str(article).strip():
            continue
        item_id = cnndm_item_id(str(article_id), str(article))
        rows.append({
            "item_id": item_id, "dataset": "cnndm", "split": file_split or hash_split(item_id), "subreddit": None,
            "title": None, "body": str(article), "reference": _highlights(str(highlights)) or None, "source": source,
        })
    out = pd.DataFrame(rows)
    if out.empty:
        raise EvalkitError(f"{source_path}: no articles")
    out = out.drop_duplicates("item_id").reset_index(drop=True)
    if split is not None:
        out = out[out["split"] == split].reset_index(drop=True)
    return conform(out, "items")
