"""Labeler quality on constructed data with known answers: gold accuracy, attention failures, agreement with the
researcher, side preference, exclusions by rule (people only, judgments kept), the labeler random-intercept size fit;
and in the app: the researcher link, feedback to a labeler, the monitoring figures equal to collect + analysis."""

import re
import sqlite3

import numpy as np
import pandas as pd
import pytest
from conftest import baseline_study

from evalkit.analysis.quality import drop_excluded, labeler_quality
from evalkit.config import QualityConfig


def _tables():
    """Labeler a: 4 gold right, 2 attention right; b: 1 of 4 gold right, 2 attention failed; c (simulated): all gold
    wrong. Six main tasks for a and b on the same three pairs; the researcher agrees with a on all three."""
    tasks, judg = [], []

    def task(tid, lab, role, expected, item, left="L", right="R"):
        tasks.append({"task_id": tid, "item_id": item, "kind": "pairwise", "gen_id_left": f"{item}-{left}", "gen_id_right": f"{item}-{right}",
                      "labeler_id": lab, "role": role, "expected": expected})

    def answer(tid, lab, side, kind="human", seconds=10.0):
        t = next(t for t in tasks if t["task_id"] == tid)
        judg.append({"judgment_id": f"j-{tid}-{lab}", "task_id": tid, "labeler_id": lab, "labeler_kind": kind, "preferred": side,
                     "preferred_gen_id": t["gen_id_left"] if side == "left" else t["gen_id_right"], "duration_s": seconds})

    for lab, right_gold, kind in (("a", 4, "human"), ("b", 1, "human"), ("c", 0, "simulated")):
        for k in range(4):
            task(f"{lab}-g{k}", lab, "gold", "left", f"{lab}g{k}")
            answer(f"{lab}-g{k}", lab, "left" if k < right_gold else "right", kind, 2.0 if lab == "b" else 10.0)
        for k in range(2):
            task(f"{lab}-a{k}", lab, "attention", "right", f"{lab}a{k}")
            answer(f"{lab}-a{k}", lab, "right" if lab != "b" else "left", kind, 2.0 if lab == "b" else 10.0)
    for k in range(3):
        for lab in ("a", "b"):
            task(f"{lab}-m{k}", lab, "overlap", None, f"m{k}")
            answer(f"{lab}-m{k}", lab, "left" if lab == "a" else "right", seconds=2.0 if lab == "b" else 30.0)
    researcher = pd.DataFrame({"item_id": [f"m{k}" for k in range(3)], "pair": [f"m{k}-L | m{k}-R" for k in range(3)],
                               "preferred_gen_id": [f"m{k}-L" for k in range(3)], "note": ""})
    return {"tasks": pd.DataFrame(tasks), "judgments": pd.DataFrame(judg)}, researcher


def test_labeler_quality_on_a_constructed_panel():
    tables, researcher = _tables()
    rules = QualityConfig(min_median_seconds=5)
    q = labeler_quality(tables, rules, researcher).set_index("labeler_id")
    assert q.loc["a", "gold_accuracy"] == 1.0 and q.loc["b", "gold_accuracy"] == 0.25 and q.loc["c", "gold_accuracy"] == 0.0
    assert q.loc["a", "attention_failures"] == 0 and q.loc["b", "attention_failures"] == 2
    assert q.loc["a", "agreement_with_researcher"] == 1.0 and q.loc["b", "agreement_with_researcher"] == 0.0
    assert q.loc["a", "n_researcher"] == 3 and np.isnan(q.loc["c", "agreement_with_researcher"])  # nothing shared: NaN, not 0
    # a and b disagree on every overlap pair, but 3 shared comparisons are too few to report an agreement
    assert np.isnan(q.loc["a", "agreement_with_others"]) and q.loc["a", "n_shared"] == 3
    assert q.loc["b", "excluded"] == "gold accuracy 0.25 < 0.6 on 4 gold tasks; 2 failed attention checks (limit 2)"
    assert q.loc["a", "excluded"] == "" and q.loc["c", "excluded"] == ""  # rules for people: the simulated labeler stays
    assert "median" in q.loc["b", "flags"] and "median" not in q.loc["a", "flags"]
    kept, left_out = drop_excluded(tables, rules)
    assert set(kept["judgments"]["labeler_id"]) == {"a", "c"} and left_out.to_dict("records") == [
        {"labeler_id": "b", "reason": q.loc["b", "excluded"], "judgments": 9}]
    # a stricter rule excludes nobody more than it should; no gold at all gives NaN, never 0
    nogold = {**tables, "tasks": tables["tasks"].assign(role="overlap", expected=None)}
    q2 = labeler_quality(nogold, rules).set_index("labeler_id")
    assert q2["gold_accuracy"].isna().all() and q2["attention_failures"].isna().all() and (q2["excluded"] == "").all()


def test_the_report_leaves_excluded_labelers_out_unless_readmitted():
    from evalkit.report.build import ReportSpec, _Study

    tables, _ = _tables()
    rules = QualityConfig()
    assert len(_Study(tables, ReportSpec("t", quality=rules, split=None)).judgments) == len(tables["judgments"][lambda d: d["labeler_kind"] == "human"]) - 9
    again = _Study(tables, ReportSpec("t", quality=rules, include_excluded=True, split=None))
    assert len(again.judgments) == 18 and list(again.excluded["labeler_id"]) == ["b"]


def test_a_labeler_random_intercept_recovers_the_size_slope():
    from test_analysis import simulate_study

    from evalkit.analysis.preference import size_fit_labeler_effect

    rng = np.random.default_rng(3)
    df = simulate_study(rng, slope=0.5, n_items=150)  # its design; the outcomes are re-drawn below with labeler leniency
    lenient = {f"lab{k}": rng.normal(0, 0.8) for k in range(8)}
    df["labeler_id"] = [f"lab{k % 8}" for k in range(len(df))]
    logit = -0.4 * (df["policy_kind"] == "sft") + 0.3 * (df["policy_kind"] == "ppo") + 0.5 * (np.log(df["n_params"]) - np.log(1e9)) \
        + df["labeler_id"].map(lenient)
    df["outcome"] = (rng.random(len(df)) < 1 / (1 + np.exp(-logit))).astype(int)
    fit = size_fit_labeler_effect(df).set_index("term")
    slope = fit.loc["log_n_params"]
    assert slope["ci_low"] < 0.5 < slope["ci_high"] and abs(slope["estimate"] - 0.5) < 0.2
    assert fit.loc["labeler log sd", "estimate"] > np.log(0.3)  # the leniency spread is seen


# ---------------------------------------------------------------------------------------------------- the app

def _call(app, method, path, form=None):
    from test_reliability import _call as call

    return call(app, method, path, form)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from evalkit.study.serve import LabelingApp, init_db

    out = tmp_path_factory.mktemp("quality")
    baseline_study(out, "data.n_items=30", "design.items_per_policy=16", "labelers.count=3", "design.gold_fraction=0.2",
                   "design.attention_fraction=0.1")
    db = init_db(out / "study")
    return LabelingApp(out / "study", quality=QualityConfig(researcher_tasks="overlap")), db


def test_researcher_feedback_and_monitoring(served):
    from evalkit.analysis.quality import labeler_quality as quality
    from evalkit.study.monitor import researcher_labels
    from evalkit.study.serve import collect_judgments, links

    app, db = served
    urls = links(db, "")
    # the researcher labels every overlap comparison once, choosing the left summary
    researcher = urls["researcher"]
    assert _call(app, "GET", researcher)[0] == 200
    n = 0
    while True:
        status, headers, page = _call(app, "GET", researcher + "/next")
        if status != 303:
            assert "Every researcher comparison is labelled" in page
            break
        _, _, page = _call(app, "GET", headers["Location"])
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        assert _call(app, "POST", headers["Location"], {"csrf": csrf, "confidence": "1", "note": "left covers it"})[0] == 303
        n += 1
    assert n == len(app.researcher_queue) > 0
    assert _call(app, "GET", "/r/wrong-token")[0] == 404
    # labeler-01 answers everything "definitely right"; the gold answers that were "left" come back as feedback
    me = urls["labeler-01"]
    while True:
        status, headers, page = _call(app, "GET", me + "/next")
        if status != 303:
            break
        _, _, task = _call(app, "GET", headers["Location"])
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', task).group(1)
        _call(app, "POST", headers["Location"], {"csrf": csrf, "confidence": "9"})
    assert "Feedback:" in page
    status, _, feedback = _call(app, "GET", me + "/feedback")
    tasks = pd.read_parquet(db.parent / "tasks.parquet")
    mine = tasks[tasks["labeler_id"] == "labeler-01"]
    expected_wrong = int(((mine["role"].isin(["gold", "attention"])) & (mine["expected"] == "left")).sum())
    with sqlite3.connect(db) as conn:
        truth = researcher_labels(conn)
    mine_pairs = {(i, " | ".join(sorted(p))) for i, p in zip(mine["item_id"], zip(mine["gen_id_left"], mine["gen_id_right"]))}
    researched_here = sum((i, p) in mine_pairs for i, p in zip(truth["item_id"], truth["pair"]))
    assert feedback.count("class='feedback'") == expected_wrong + researched_here > 0
    assert "left covers it" in feedback or researched_here == 0
    # the monitoring page's figures are the analysis of the collected judgments
    admin = urls["admin"]
    status, headers, body = _call(app, "GET", admin + "/stats.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    import json

    stats = json.loads(body)
    collected = collect_judgments(db.parent)
    expect = quality({"tasks": tasks, "judgments": collected}, QualityConfig(), truth).set_index("labeler_id")
    row = next(r for r in stats["labelers"] if r["labeler_id"] == "labeler-01")
    assert row["done"] == len(mine) and row["assigned"] == len(mine)
    for col in ("gold_accuracy", "agreement_with_researcher", "left_rate", "n_researcher"):
        assert row[col] == pytest.approx(expect.loc["labeler-01", col]), col
    assert row["left_rate"] == 0.0 and ("right summary 100%" in row["flags"]) == (row["done"] >= 20)  # flagged from 20 answers
    status, _, page = _call(app, "GET", admin)
    assert status == 200 and "labeler-01" in page and "stats.json" in page
    status, headers, csv = _call(app, "GET", admin + "/stats.csv")
    assert status == 200 and csv.splitlines()[0].startswith("labeler_id,done,assigned") and "labeler-01" in csv
    assert _call(app, "GET", admin + "/nothing")[0] == 404
