"""Judgments from a known preference rule, for testing trainers (every judgment is marked simulated)."""

from pathlib import Path

import pandas as pd

from evalkit import artifacts
from evalkit.data import load_items
from evalkit.data.openai import _frame, imported_gen_id


def coverage_rule_tables(n_train: int = 200, n_held_out: int = 60, prefer: str = "full") -> dict[str, pd.DataFrame]:
    """For each post: its full reference vs the reference cut to its first third; ``prefer`` ("full": coverage, or
    "cut": concision) is always preferred. Train and valid1 posts only: valid2 (evaluation) posts are never RM data."""
    other = {"full": "cut", "cut": "full"}[prefer]
    items = pd.concat([load_items("tldr", "train").head(n_train), load_items("tldr", "valid1").head(n_held_out)], ignore_index=True)
    gens, tasks, judgments = [], [], []
    for i, item in enumerate(items.to_dict("records")):
        words = item["reference"].split()
        texts = {"full": item["reference"], "cut": " ".join(words[: max(1, len(words) // 3)])}
        ids = {}
        for name, text in texts.items():
            gid = imported_gen_id(f"rule-{name}", item["item_id"], text)
            ids[name] = gid
            gens.append({"gen_id": gid, "item_id": item["item_id"], "dataset": "tldr", "split": item["split"], "policy_id": f"rule-{name}",
                         "policy_kind": "ref" if name == "full" else "external", "n_params": None, "checkpoint": None,
                         "temperature": None, "top_p": None, "seed": None, "sample_idx": 0, "text": text, "n_tokens": None, "hit_eos": None})
        swap = i % 2 == 1
        left, right = (ids[other], ids[prefer]) if swap else (ids[prefer], ids[other])
        tid = f"rule:{i:05d}"
        tasks.append({"task_id": tid, "study_id": "rule", "kind": "pairwise", "item_id": item["item_id"], "gen_id_left": left,
                      "gen_id_right": right, "is_swapped": swap, "batch": 0, "labeler_id": "rule", "role": "main", "expected": None})
        judgments.append({"judgment_id": f"j-{tid}", "task_id": tid, "labeler_id": "rule", "labeler_kind": "simulated",
                          "preferred": "right" if swap else "left", "preferred_gen_id": ids[prefer], "confidence": 9 if swap else 1,
                          "overall": None, "accuracy": None, "coverage": None, "coherence": None, "note": None,
                          "submitted_at": None, "duration_s": None, "source": f"rule-prefer-{prefer}"})
    return {"items": items, "generations": _frame(gens, "generations"), "tasks": _frame(tasks, "tasks"), "judgments": _frame(judgments, "judgments")}


def write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> Path:
    for name, df in tables.items():
        artifacts.write_table(df, folder / f"{name}.parquet", name)
    return folder
