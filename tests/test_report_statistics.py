"""The report's statistical rules (issue 21), each on a constructed data set whose right answer is known: one split
for every analysis, intervals that name their method, no estimate from separated or tiny data, agreement weighted
both ways with its counts, alpha on a coding no renaming changes, lengths in GPT-2 tokens, "—" for what was not
measured."""

import re

import numpy as np
import pandas as pd
import pytest
from test_report import tables_from_comparisons

from evalkit import artifacts
from evalkit.analysis.agreement import agreement_with_ci, oriented_by_record, per_labeler
from evalkit.analysis.likert import krippendorff_alpha, krippendorff_alpha_ci
from evalkit.analysis.preference import comparisons, length_controlled, summary_lengths


def _multi_labeler_tables(groups, rename=None):
    """Pairwise tables: each entry of ``groups`` is (item, left policy, right policy, the labelers' choices as
    "left"/"right"); every labeler sees the same order. ``rename`` maps policy names (ids unchanged)."""
    rename = rename or {}
    gens, tasks, judg = [], [], []
    for k, (item, left, right, choices) in enumerate(groups):
        gl, gr = f"g{k}l", f"g{k}r"
        gens += [{"gen_id": gl, "policy_id": rename.get(left, left)}, {"gen_id": gr, "policy_id": rename.get(right, right)}]
        for n, side in enumerate(choices):
            tid = f"t{k}-{n}"
            tasks.append({"task_id": tid, "item_id": item, "gen_id_left": gl, "gen_id_right": gr, "is_swapped": False,
                          "role": "overlap", "expected": None})
            judg.append({"task_id": tid, "labeler_id": f"l{n}", "preferred": side, "preferred_gen_id": gl if side == "left" else gr,
                         "confidence": 2 if side == "left" else 8, "source": "b"})
    return {"generations": pd.DataFrame(gens), "tasks": pd.DataFrame(tasks), "judgments": pd.DataFrame(judg)}


def test_agreement_is_given_per_pair_and_per_comparison_with_its_counts():
    # one comparison with 11 labelers (10 agree) and ten comparisons of two labelers who disagree
    groups = [("i0", "A", "B", ["left"] * 10 + ["right"])] + [(f"i{k}", "A", "B", ["left", "right"]) for k in range(1, 11)]
    a = agreement_with_ci(_multi_labeler_tables(groups), n_boot=200)
    assert a["n_pairs"] == 55 + 10 and a["n_comparisons"] == 11 and a["n_items"] == 11
    assert a["agreement"] == pytest.approx(45 / 65)  # pair-weighted: the 11-labeler comparison dominates
    assert a["agreement_per_comparison"] == pytest.approx((45 / 55) / 11)  # each comparison once
    assert a["comparison_ci_low"] <= a["agreement_per_comparison"] <= a["comparison_ci_high"]


def test_alpha_does_not_change_when_policies_are_renamed():
    rng = np.random.default_rng(0)
    groups = []
    for k in range(40):  # the stronger policy (S) wins most labels, shown on either side
        s_left = k % 2 == 0
        p_s = 0.8
        choices = [("left" if s_left else "right") if rng.random() < p_s else ("right" if s_left else "left") for _ in range(3)]
        groups.append((f"i{k}", "S" if s_left else "W", "W" if s_left else "S", choices))
    plain = oriented_by_record(_multi_labeler_tables(groups))
    renamed = oriented_by_record(_multi_labeler_tables(groups, rename={"S": "zz-strong", "W": "aa-weak"}))
    a1 = krippendorff_alpha(plain, "pair", "labeler_id", "first_won")
    a2 = krippendorff_alpha(renamed, "pair", "labeler_id", "first_won")
    assert a1 == pytest.approx(a2)
    # the confidence turned to the first-recorded summary is a second rename-free coding, ordinal
    assert krippendorff_alpha(plain, "pair", "labeler_id", "first_confidence", "ordinal") == pytest.approx(
        krippendorff_alpha(renamed, "pair", "labeler_id", "first_confidence", "ordinal"))
    ci = krippendorff_alpha_ci(plain, "pair", "labeler_id", "first_won", n_boot=300, rng=np.random.default_rng(1))
    assert ci["alpha"] == pytest.approx(a1) and ci["ci_low"] < a1 < ci["ci_high"] and ci["n_clusters"] == 40
    perfect = _multi_labeler_tables([(f"i{k}", "A", "B", ["left"] * 3 if k % 2 else ["right"] * 3) for k in range(10)])
    assert krippendorff_alpha(oriented_by_record(perfect), "pair", "labeler_id", "first_won") == pytest.approx(1.0)


def test_length_control_gives_no_number_for_separated_or_tiny_policies():
    rng = np.random.default_rng(3)
    rows = []
    for policy, n, p_win in (("ok", 200, 0.5), ("all_won", 30, 1.0), ("tiny", 8, 0.5)):
        for i in range(n):
            rows.append({"item_id": f"{policy}{i}", "labeler_id": "l", "policy_id": policy, "policy_kind": "sft", "n_params": 1e8,
                         "baseline_id": "ref", "outcome": int(rng.random() < p_win), "len_policy": float(rng.integers(10, 40)),
                         "len_baseline": 25.0, "dataset": "tldr", "split": "valid2"})
    table, _ = length_controlled(pd.DataFrame(rows))
    t = table.set_index("policy_id")
    assert t.loc["ok", "estimable"] == "yes" and np.isfinite(t.loc["ok", "controlled_rate"])
    assert t.loc["all_won", "estimable"] == "separated: won 30 of 30" and np.isnan(t.loc["all_won", "controlled_rate"])
    assert t.loc["tiny", "estimable"].startswith("too few: 8") and np.isnan(t.loc["tiny", "ci_low"])
    assert t.loc["tiny", "raw_rate"] == pytest.approx(np.mean([r["outcome"] for r in rows if r["policy_id"] == "tiny"]))


def test_lengths_are_gpt2_tokens():
    assert list(summary_lengths(pd.Series(["hello world", " ".join(["x"] * 7), ""]))) == [2.0, 7.0, 0.0]


def test_a_labeler_without_checks_or_shared_comparisons_has_dashes_not_zeros():
    groups = [(f"i{k}", "A", "B", ["left", "left"]) for k in range(3)]  # l0 and l1 share 3 comparisons: fewer than 5
    per = per_labeler(_multi_labeler_tables(groups))
    row = per.set_index("labeler_id").loc["l0"]
    assert row["n_checks"] == 0 and np.isnan(row["failed_checks"]) and np.isnan(row["check_accuracy"])
    assert row["n_shared"] == 3 and np.isnan(row["agreement_with_others"])


def test_a_table_of_intervals_must_name_their_method(tmp_path):
    from evalkit.report.build import Report

    rep = Report(tmp_path, "t")
    with pytest.raises(ValueError, match="no method named"):
        rep.table(pd.DataFrame({"rate": [0.5], "ci_low": [0.4], "ci_high": [0.6]}))
    rep.table(pd.DataFrame({"rate": [0.5], "ci_low": [0.4], "ci_high": [0.6]}), intervals="ci_low–ci_high: Wilson")
    assert "Intervals (95%): ci_low–ci_high: Wilson." in "".join(rep.md)


def _study(rng, split, policies, n_items):
    rows = []
    for policy, p_win in policies:
        for i in range(n_items):
            rows.append({"item_id": f"{split}-{policy}-{i}", "labeler_id": "sim", "policy_id": policy, "policy_kind": "sft",
                         "n_params": 1e8, "baseline_id": "ref", "outcome": int(rng.random() < p_win), "len_policy": float(rng.integers(10, 40)),
                         "len_baseline": 25.0, "dataset": "tldr", "split": split})
    tables = tables_from_comparisons(pd.DataFrame(rows))
    tables["items"] = tables["items"].assign(split=split)
    tables["generations"] = tables["generations"].assign(split=split, gen_id=split + tables["generations"]["gen_id"])
    t, j = tables["tasks"], tables["judgments"]
    tables["tasks"] = t.assign(task_id=split + t["task_id"], gen_id_left=split + t["gen_id_left"], gen_id_right=split + t["gen_id_right"])
    tables["judgments"] = j.assign(judgment_id=split + j["judgment_id"], task_id=split + j["task_id"], preferred_gen_id=split + j["preferred_gen_id"])
    return tables


def test_every_analysis_of_a_report_reads_its_one_split(tmp_path):
    """valid1 holds a policy (only_valid1) and a skew that valid2 does not: with report.split = valid2 it appears in no
    table (rates, length control, Bradley–Terry), and the top of the report says the rule and its counts."""
    from evalkit.report.build import build_report

    rng = np.random.default_rng(4)
    one, two = _study(rng, "valid1", [("a", 0.9), ("only_valid1", 0.5)], 30), _study(rng, "valid2", [("a", 0.3)], 40)
    tables = {k: artifacts.conform(pd.concat([one[k], two[k]], ignore_index=True), k) for k in one}
    tables["judgments"]["labeler_kind"] = "human"
    paths = build_report(tables, tmp_path / "rep", "split", n_boot=50, split="valid2")
    md = paths["md"].read_text()
    assert "only_valid1" not in md
    assert "Scope: every analysis below reads split valid2 only — 40 judgments by 1 labelers on 40 posts (of 100 judgments in all splits)" in md
    comp = comparisons({k: v for k, v in tables.items()})
    wins = int(comp[(comp["split"] == "valid2") & (comp["policy_id"] == "a")]["outcome"].sum())
    assert re.search(rf"\| a \| -?[\d.]+ \| -?[\d.]+ \| -?[\d.]+ \| {wins} \| 40 \| yes \|", md), md  # Bradley–Terry: valid2 alone
    assert re.search(rf"\| SFT 100M \| a \| 100M \| [\d.]+ \| {wins} \| 40 \| 40 \|", md)  # the rates table: valid2's wins, n and posts


def test_a_size_fit_through_a_handful_of_judgments_is_not_estimated():
    from evalkit.analysis.preference import separated_kinds

    rng = np.random.default_rng(5)
    rows = [{"policy_kind": kind, "n_params": size, "outcome": int(rng.random() < 0.5)}
            for kind, sizes in (("sft", {1e8: 50, 1e9: 50}), ("ppo", {1e8: 50, 1e9: 6})) for size, n in sizes.items() for _ in range(n)]
    out = separated_kinds(pd.DataFrame(rows))
    assert "sft" not in out and out["ppo"] == "has only 6 comparisons at 1,000,000,000 parameters (fewer than 20)"
