"""Reddit TL;DR posts as ``items`` rows.

Sources: the bundled 1,945 posts (formatted queries with the human reference and OpenAI's 1.3B RLHF summary), or a
user's own file: OpenAI's JSON Lines (``id, subreddit, title, post, summary``; the full 123k-post filtered dataset
works) or a CSV with ``query`` and ``reference_responses`` columns like the bundled one.

Splits: a split recorded with the data wins (OpenAI's per-split files are named ``train``/``valid``/``test`` or
``valid1``/``valid2``; a released human comparison of the same post records its split); otherwise
``evalkit.data.splits.hash_split``. Posts are keyed by content (``tldr_item_id``), so a post present in two sources is
one item.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pandas as pd

from evalkit import artifacts
from evalkit.artifacts import conform
from evalkit.data.bundled import COMPARISON_BATCHES, TLDR_CSV, bundled_path
from evalkit.data.io import iter_jsonl, read_csv_columns, require_keys
from evalkit.data.openai import _frame, imported_gen_id, read_openai_comparisons, tldr_item_id
from evalkit.data.query import parse_tldr_query
from evalkit.data.splits import SPLIT_ALIASES, check_split, hash_split
from evalkit.errors import EvalkitError
from evalkit.seeds import stable_hash

log = logging.getLogger(__name__)

OPENAI_PPO_POLICY = "openai-ppo-1.3b"
OPENAI_PPO_FAMILY = "OpenAI GPT-3-style (released)"  # its model family in the report's size figure
OPENAI_PPO_N_PARAMS = 1_300_000_000
OPENAI_TLDR_FIELDS = ("id", "subreddit", "title", "post", "summary")


@functools.lru_cache(maxsize=1)
def released_splits() -> dict[str, str]:
    """item_id → split recorded for the posts in the bundled released human comparisons."""
    out: dict[str, str] = {}
    for rel in COMPARISON_BATCHES.values():
        items = read_openai_comparisons(bundled_path(rel))["items"]
        for item_id, split in zip(items["item_id"], items["split"]):
            out.setdefault(item_id, split)
    return out


def _split_from_filename(path: Path) -> str | None:
    stem = path.stem.lower()
    name = SPLIT_ALIASES.get(stem, stem)
    return name if name in ("train", "valid1", "valid2") else None


def _finish(rows: list[dict], split: str | None, where: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        raise EvalkitError(f"{where}: no posts")
    known = released_splits()
    recorded = df["split"] if "split" in df else pd.Series([None] * len(df))
    df["split"] = [s if s else known.get(i) or hash_split(i) for i, s in zip(df["item_id"], recorded)]
    dup = df["item_id"].duplicated()
    if dup.any():
        log.info("%s: merged %d duplicate posts", where, int(dup.sum()))
        df = df[~dup].reset_index(drop=True)
    if split is not None:
        df = df[df["split"] == split].reset_index(drop=True)
    return conform(df, "items")


def _rows_from_query_csv(path: Path, source: str) -> list[dict]:
    df = read_csv_columns(path, ("query", "reference_responses"))
    rows = []
    for i, (query, ref) in enumerate(zip(df["query"], df["reference_responses"]), start=2):
        try:
            parts = parse_tldr_query(query)
        except EvalkitError as exc:
            raise EvalkitError(f"{path}: row at line ~{i}: {exc}") from None
        rows.append({
            "item_id": tldr_item_id(parts["subreddit"], parts["title"], parts["post"]), "dataset": "tldr",
            "subreddit": parts["subreddit"], "title": parts["title"], "body": parts["post"],
            "reference": ref.strip() or None, "source": source, "split": None,
        })
    return rows


def _rows_from_openai_jsonl(path: Path, split: str | None) -> list[dict]:
    split = split or _split_from_filename(path)
    rows = []
    for lineno, rec in iter_jsonl(path):
        require_keys(rec, OPENAI_TLDR_FIELDS, f"{path}:{lineno}")
        rows.append({
            "item_id": tldr_item_id(rec["subreddit"], rec["title"], rec["post"]), "dataset": "tldr",
            "subreddit": rec["subreddit"], "title": rec["title"], "body": rec["post"],
            "reference": (rec["summary"] or "").strip() or None, "source": path.name, "split": split,
            "source_id": str(rec["id"]),
        })
    return rows


def load_tldr(split: str | None = None, path: str | Path | None = None, file_split: str | None = None) -> pd.DataFrame:
    """TL;DR ``items``: the bundled posts, or a user's CSV/JSON Lines file; optionally one split only.

    ``file_split`` declares the split of every post in a user's file (else taken from its name, else hashed).
    """
    split = check_split(split)
    file_split = check_split(file_split)
    if path is None:
        return _finish(_rows_from_query_csv(bundled_path(TLDR_CSV), "bundled:" + TLDR_CSV), split, "bundled TL;DR")
    path = Path(path)
    if path.suffix.lower() == ".csv":
        rows = _rows_from_query_csv(path, path.name)
        for r in rows:
            r["split"] = file_split
    else:
        rows = _rows_from_openai_jsonl(path, file_split)
    return _finish(rows, split, str(path))


def load_openai_ppo_summaries(split: str | None = None) -> pd.DataFrame:
    """OpenAI's released 1.3B RLHF summaries of the bundled posts as ``generations`` rows (policy ``openai-ppo-1.3b``)."""
    items = load_tldr(split=split)
    df = read_csv_columns(bundled_path(TLDR_CSV), ("query", "postprocessed_response"))
    text_of = {}
    for query, text in zip(df["query"], df["postprocessed_response"]):
        p = parse_tldr_query(query)
        text_of.setdefault(tldr_item_id(p["subreddit"], p["title"], p["post"]), text.strip())
    rows = []
    for item_id, item_split in zip(items["item_id"], items["split"]):
        text = text_of[item_id]
        rows.append({
            "gen_id": imported_gen_id(OPENAI_PPO_POLICY, item_id, text), "item_id": item_id, "dataset": "tldr",
            "split": item_split, "policy_id": OPENAI_PPO_POLICY, "policy_kind": "external",
            "n_params": OPENAI_PPO_N_PARAMS, "checkpoint": None, "temperature": None, "top_p": None, "seed": None,
            "sample_idx": 0, "text": text, "n_tokens": None, "hit_eos": None,
        })
    return _frame(rows, "generations")


LLM_JUDGE = "gpt-4"


def load_llm_judgments(split: str | None = None) -> dict[str, pd.DataFrame]:
    """The bundled GPT-4 verdicts on OpenAI's 1.3B RLHF summary vs the human reference as study tables: one pairwise
    task per judged post (sides as the judge saw them: ``shuffled_index`` 0 = the RLHF summary first) and one judgment
    by labeler ``gpt-4`` with ``labeler_kind="llm"``. Generation ids equal those of ``openai-ppo-1.3b`` and ``ref``,
    so the same pair judged by people or by the simulated panel can be matched."""
    items = load_tldr(split=split)
    known = set(items["item_id"])
    ppo = load_openai_ppo_summaries(split).set_index("item_id")
    df = read_csv_columns(bundled_path("tldr/oai1b_gpt4_judged.csv"), ("query", "preferred", "shuffled_index"))
    gens, tasks, judgments = [], [], []
    for query, verdict, shuffled in zip(df["query"], df["preferred"], df["shuffled_index"]):
        if verdict not in ("ours", "reference"):
            continue
        p = parse_tldr_query(query)
        item_id = tldr_item_id(p["subreddit"], p["title"], p["post"])
        if item_id not in known:
            continue
        item = items.set_index("item_id").loc[item_id]
        ref_id = imported_gen_id("ref", item_id, item["reference"])
        ppo_id = ppo.loc[item_id, "gen_id"]
        gens.append({"gen_id": ref_id, "item_id": item_id, "dataset": "tldr", "split": item["split"], "policy_id": "ref",
                     "policy_kind": "ref", "n_params": None, "checkpoint": None, "temperature": None, "top_p": None,
                     "seed": None, "sample_idx": 0, "text": item["reference"], "n_tokens": None, "hit_eos": None})
        left, right = (ppo_id, ref_id) if str(shuffled) in ("0", "0.0") else (ref_id, ppo_id)
        task_id = "t-llm-" + stable_hash(item_id, left, right)
        chosen = ppo_id if verdict == "ours" else ref_id
        tasks.append({"study_id": "oai1b-gpt4-judged", "kind": "pairwise", "item_id": item_id, "gen_id_left": left,
                      "gen_id_right": right, "is_swapped": left == ref_id, "role": "main", "expected": None,
                      "unit_id": task_id, "labeler_id": LLM_JUDGE, "batch": 0, "task_id": task_id})
        judgments.append({"judgment_id": "j-llm-" + stable_hash(task_id), "task_id": task_id, "labeler_id": LLM_JUDGE,
                          "labeler_kind": "llm", "preferred": "left" if chosen == left else "right", "preferred_gen_id": chosen,
                          "confidence": None, "overall": None, "accuracy": None, "coverage": None, "coherence": None,
                          "note": None, "submitted_at": None, "duration_s": None, "source": "oai1b_gpt4_judged.csv"})
    judged = {t["item_id"] for t in tasks}
    ppo_rows = ppo.reset_index()
    return {"items": items[items["item_id"].isin(judged)].reset_index(drop=True),
            "generations": pd.concat([_frame(gens, "generations"), ppo_rows[ppo_rows["item_id"].isin(judged)]], ignore_index=True),
            "tasks": artifacts.conform(pd.DataFrame(tasks), "tasks"), "judgments": artifacts.conform(pd.DataFrame(judgments), "judgments")}
