"""A study's pairwise tasks labelled by an automatic judge (``evalkit judge run``).

Each distinct pair shown (post, left, right) is judged once, by the first task that shows it; the judgment records
the judge as its labeler (``labeler_id`` the judge id, ``labeler_kind`` ``model`` or ``llm``, never ``human``),
P(left) in its note and ``judge:<id>`` as its source. Batches are written to ``judgments.parquet`` as they finish
(atomically, every other judgment kept), so a killed run resumes where it stopped; a re-run with nothing left to
judge changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from evalkit import artifacts
from evalkit.errors import EvalkitError
from evalkit.judges import Judge, judge_probabilities
from evalkit.seeds import stable_hash
from evalkit.study.exchange import load_study_tables
from evalkit.study.items import read_judgments

JUDGE_SOURCE = "judge:"


def judge_source(judge_id: str) -> str:
    return JUDGE_SOURCE + judge_id


def pending_tasks(tables: dict[str, pd.DataFrame], judgments: pd.DataFrame, judge_id: str) -> pd.DataFrame:
    """The pairwise tasks still to judge: one per distinct pair shown, none the judge has answered."""
    tasks = tables["tasks"][tables["tasks"]["kind"] == "pairwise"]
    if tasks.empty:
        raise EvalkitError("a judge answers pairwise tasks only; this study has none")
    first = tasks.drop_duplicates(["item_id", "gen_id_left", "gen_id_right"])
    done = set(judgments.loc[judgments["source"] == judge_source(judge_id), "task_id"])
    return first[~first["task_id"].isin(done)]


def task_pairs(tables: dict[str, pd.DataFrame], tasks: pd.DataFrame) -> pd.DataFrame:
    """A judge's input rows (post, items, left, right as shown) for pairwise ``tasks`` of a study's tables."""
    text = tables["generations"].set_index("gen_id")["text"]
    items = tables["items"].set_index("item_id")
    return pd.DataFrame({"post": tasks["item_id"].map(items["body"]).to_numpy(), "left": tasks["gen_id_left"].map(text).to_numpy(),
                         "right": tasks["gen_id_right"].map(text).to_numpy(),
                         "items": [items.loc[i].to_dict() | {"item_id": i} for i in tasks["item_id"]]})


def pairwise_judgment(task, left: bool, p_left: float, judgment_id: str, labeler_id: str, labeler_kind: str, note: str,
                      source: str) -> dict:
    """A judgments-table row for a machine's choice on a pairwise task, its 9-point confidence from |P(left) − ½|
    (1/9 when P is extreme, 4/6 near ½)."""
    step = min(3, int(abs(p_left - 0.5) * 2 * 4))  # 0 … 3 steps away from the middle
    return {"judgment_id": judgment_id, "task_id": task.task_id, "labeler_id": labeler_id, "labeler_kind": labeler_kind,
            "preferred": "left" if left else "right", "preferred_gen_id": task.gen_id_left if left else task.gen_id_right,
            "confidence": (4 - step) if left else (6 + step), "overall": None, "accuracy": None, "coverage": None,
            "coherence": None, "note": note, "submitted_at": None, "duration_s": None, "source": source}


def judge_rows(judge: Judge, tables: dict[str, pd.DataFrame], tasks: pd.DataFrame) -> pd.DataFrame:
    """Judgments of ``tasks`` by ``judge``: the summary it gives P > ½ (an exact ½ goes by a hash of the task, never by
    position), with a 9-point confidence from |P − ½|."""
    p = judge_probabilities(judge, task_pairs(tables, tasks))
    rows = [pairwise_judgment(t, q > 0.5 if q != 0.5 else int(stable_hash("judge-tie", t.task_id), 16) % 2 == 0, float(q),
                              "j-judge-" + stable_hash(judge.judge_id, t.task_id), judge.judge_id, judge.labeler_kind,
                              f"{judge.judge_id}: P(left)={float(q):.3f}", judge_source(judge.judge_id))
            for t, q in zip(tasks.itertuples(), p)]
    return artifacts.conform(pd.DataFrame(rows), "judgments")


def label_study(folder: str | Path, judge: Judge, batch_size: int = 64,
                progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Judge the study's pending tasks in batches, each written as it finishes. Returns (judged now, judged before)."""
    if batch_size < 1:
        raise EvalkitError(f"batch size {batch_size}: expected a positive number of tasks")
    folder = Path(folder)
    tables = load_study_tables(folder)
    target = folder / "judgments.parquet"
    judgments = read_judgments(target) if target.is_file() else artifacts.empty_table("judgments")
    pending = pending_tasks(tables, judgments, judge.judge_id)
    before = int((judgments["source"] == judge_source(judge.judge_id)).sum())
    for start in range(0, len(pending), batch_size):
        new = judge_rows(judge, tables, pending.iloc[start:start + batch_size])
        judgments = pd.concat([judgments, new], ignore_index=True) if len(judgments) else new
        artifacts.write_table(judgments, target, "judgments")
        if progress:
            progress(min(start + batch_size, len(pending)), len(pending))
    return len(pending), before
