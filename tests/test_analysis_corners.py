"""The corners of the analysis (issue 11): duplicate judgments, identifiability per kind, position bias adjusted for
placement, sentinels out of the rates, Bradley–Terry intervals from resamples that contain the policy, the notebook API."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import baseline_study

from evalkit.errors import EvalkitError


def test_the_same_answers_under_another_name_are_one_judgment(tmp_path):
    from evalkit.study.exchange import import_answers

    cfg, built = baseline_study(tmp_path, "data.n_items=30", "design.items_per_policy=20", "labelers.count=3")
    tasks = built["tasks"]
    answers = [{"task_id": t, "labeler_id": lab, "confidence": 2 if k % 3 else 8}
               for k, (t, lab) in enumerate(zip(tasks["task_id"], tasks["labeler_id"]))]
    first, second = tmp_path / "answers.jsonl", tmp_path / "answers-copy.jsonl"
    for path in (first, second):
        path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    folder = cfg.out_dir / "study"
    once = import_answers(folder, first)
    twice = import_answers(folder, second)
    assert len(once) == len(twice) == len(tasks)
    assert not twice.duplicated(["task_id", "labeler_id"]).any()
    # a different answer to a task already answered is refused, and nothing is written
    before = (folder / "judgments.parquet").read_bytes()
    answers[0]["confidence"] = 10 - answers[0]["confidence"]
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(a) + "\n" for a in answers))
    with pytest.raises(EvalkitError, match="already answered differently"):
        import_answers(folder, changed)
    assert (folder / "judgments.parquet").read_bytes() == before


def _comparisons(rng, kinds_sizes, n_items=120):
    rows = []
    for kind, sizes in kinds_sizes.items():
        for size in sizes:
            p = 1 / (1 + np.exp(-(0.3 * np.log(size / 1e8))))
            for i in range(n_items):
                rows.append({"item_id": f"i{i}", "labeler_id": "l", "policy_id": f"{kind}-{size}", "policy_kind": kind,
                             "n_params": float(size), "baseline_id": "ref", "outcome": int(rng.random() < p),
                             "len_policy": 100.0, "len_baseline": 100.0, "dataset": "tldr", "split": "valid2"})
    return pd.DataFrame(rows)


def test_a_kind_at_one_size_is_refused_in_words():
    from evalkit.analysis import bootstrap_size_fit, size_fit

    df = _comparisons(np.random.default_rng(0), {"sft": [1e7, 1e8, 1e9], "ppo": [1e9]})
    for fit in (size_fit, bootstrap_size_fit):
        with pytest.raises(EvalkitError, match="ppo are measured at one size only"):
            fit(df)
    res = size_fit(df[df["policy_kind"] == "sft"])
    assert np.isfinite(res.bse).all()


def test_a_separated_kind_is_named_and_left_out_of_the_size_fit():
    """0 wins at the smaller of two sizes: the logistic slope has no finite estimate (the report drew a 0-to-1 band
    from coefficients like -300 ± 16,000). The same zero at the smallest of three sizes, with losses at the largest,
    is no separation, and the fit is finite."""
    from evalkit.analysis import separated_kinds, size_fit

    df = _comparisons(np.random.default_rng(1), {"sft": [1e7, 1e8, 1e9], "ppo": [1e7, 1e9]})
    smallest = (df["policy_kind"] == "ppo") & (df["n_params"] == 1e7)
    df.loc[smallest, "outcome"] = 0
    assert set(separated_kinds(df)) == {"ppo"} and "won 0 of 120 comparisons at 10,000,000" in separated_kinds(df)["ppo"]
    with pytest.raises(EvalkitError, match="ppo won 0 of 120 .* no finite slope"):
        size_fit(df)
    df.loc[(df["policy_kind"] == "sft") & (df["n_params"] == 1e7), "outcome"] = 0
    assert set(separated_kinds(df)) == {"ppo"}  # sft: zero at its smallest size, but wins and losses above it
    res = size_fit(df[df["policy_kind"] == "sft"])
    assert np.isfinite(res.bse).all() and (res.bse < 10).all()
    df.loc[df["policy_kind"] == "sft", "outcome"] = 1
    assert separated_kinds(df)["sft"] == "won every one of its 360 comparisons"


def _placement_tables(rng, n_items=300, bias=0.0, strength=1.0, first_share=0.7):
    """Policy A (stronger by ``strength`` log-odds) vs B, A shown on the left in ``first_share`` of tasks."""
    gens, tasks, judg = [], [], []
    for i in range(n_items):
        a, b = f"a{i}", f"b{i}"
        gens += [{"gen_id": a, "policy_id": "A"}, {"gen_id": b, "policy_id": "B"}]
        a_left = rng.random() < first_share
        left, right = (a, b) if a_left else (b, a)
        z = bias + (strength if a_left else -strength)
        won_left = rng.random() < 1 / (1 + np.exp(-z))
        tasks.append({"task_id": f"t{i}", "item_id": f"i{i}", "gen_id_left": left, "gen_id_right": right,
                      "role": "main", "expected": None})
        judg.append({"task_id": f"t{i}", "labeler_id": f"l{i % 5}", "preferred": "left" if won_left else "right",
                     "preferred_gen_id": left if won_left else right})
    return {"generations": pd.DataFrame(gens), "tasks": pd.DataFrame(tasks), "judgments": pd.DataFrame(judg)}


def test_position_effect_is_adjusted_for_placement_and_its_interval_covers():
    from evalkit.analysis import labeler_position, position_effect

    rng = np.random.default_rng(1)
    tables = _placement_tables(rng)
    pos = position_effect(tables)
    assert pos["naive_left_rate"] > 0.58  # the stronger policy is mostly on the left
    assert pos["ci_low"] < 0.5 < pos["ci_high"] and abs(pos["adjusted_left_rate"] - 0.5) < 0.07
    per = labeler_position(tables)  # 5 labelers × 60 judgments: naive rates confounded, excess centred on 0
    assert per["left_rate"].mean() > 0.58 and abs(per["left_excess"].mean()) < 0.03
    covered = 0
    for _ in range(200):  # 95% CI coverage of the true position effect (log-odds 0.3)
        p = position_effect(_placement_tables(rng, n_items=200, bias=0.3))
        covered += p["ci_low"] < 1 / (1 + np.exp(-0.3)) < p["ci_high"]
    assert 0.93 <= covered / 200 <= 0.97, covered


def test_sentinel_pairs_stay_out_of_the_rates(tmp_path):
    from evalkit.analysis import comparisons
    from evalkit.judges import LengthJudge
    from evalkit.study.exchange import load_study_tables
    from evalkit.study.simulate import calibrate, simulate_judgments

    cfg, built = baseline_study(tmp_path, "data.n_items=40", "design.items_per_policy=20", "labelers.count=3",
                                "design.sentinel_policy=lead3", "design.batch_size=10")
    tables = load_study_tables(cfg.out_dir / "study")
    assert (tables["tasks"]["role"] == "sentinel").sum() > 0
    judge = LengthJudge()
    tables["judgments"] = simulate_judgments(calibrate(judge), judge, tables, 0)
    comp = comparisons(tables)
    main = tables["tasks"][tables["tasks"]["role"].isin(["main", "overlap"])]
    assert len(comp) == main["task_id"].isin(tables["judgments"]["task_id"]).sum()
    assert (comp["policy_id"] == "lead3").sum() == len(main[main["gen_id_left"].isin(tables["generations"].loc[
        tables["generations"]["policy_id"] == "lead3", "gen_id"]) | main["gen_id_right"].isin(tables["generations"].loc[
            tables["generations"]["policy_id"] == "lead3", "gen_id"])])


def test_bradley_terry_gives_no_number_where_the_data_are_separated_or_tiny():
    """A rare policy C (2 judgments, won both) and a policy D that won all of its 30 comparisons have no finite
    strength: both are reported as not estimable, with their counts, never as a number; A keeps its interval."""
    from evalkit.analysis import bradley_terry

    rng = np.random.default_rng(2)
    tables = _placement_tables(rng, n_items=200, first_share=0.5)
    extra = {"generations": [], "tasks": [], "judgments": []}
    for name, n in (("c", 2), ("d", 30)):
        for i in range(n):
            extra["generations"].append({"gen_id": f"{name}{i}", "policy_id": name.upper()})
            extra["tasks"].append({"task_id": f"t{name}{i}", "item_id": f"i{i}", "gen_id_left": f"{name}{i}", "gen_id_right": f"a{i}",
                                   "role": "main", "expected": None})
            extra["judgments"].append({"task_id": f"t{name}{i}", "labeler_id": "l0", "preferred": "left", "preferred_gen_id": f"{name}{i}"})
    tables = {k: pd.concat([tables[k], pd.DataFrame(e)], ignore_index=True) for k, e in extra.items()}
    bt = bradley_terry(tables, n_boot=100, rng=np.random.default_rng(0), anchor="B").set_index("policy_id")
    assert np.isnan(bt.loc["C", "strength"]) and bt.loc["C", "estimable"] == "too few judgments (2 < 20)"
    assert np.isnan(bt.loc["D", "strength"]) and bt.loc["D", "estimable"].startswith("separated: won 30 of its 30")
    assert int(bt.loc["D", "wins"]) == 30 and int(bt.loc["D", "n"]) == 30
    assert bt.loc["A", "estimable"] == "yes" and bt.loc["A", "ci_low"] < bt.loc["A", "strength"] < bt.loc["A", "ci_high"]
    assert set(list(bt.index)[-2:]) == {"C", "D"}  # not-estimable policies are listed after the others


def test_notebook_api():
    import evalkit

    tables = evalkit.load_openai_comparisons(["batch18"])  # a bundled short name
    assert len(tables["judgments"]) > 0
    assert len(evalkit.load_openai_comparisons("batch13")["judgments"]) > 0
    with pytest.raises(EvalkitError, match="expects the comparisons DataFrame, got a dict of tables"):
        evalkit.analysis.preference_rates(tables)
    rates = evalkit.analysis.preference_rates(evalkit.analysis.comparisons(tables))
    assert {"rate", "boot_low", "boot_high"} <= set(rates.columns)
    with pytest.raises(EvalkitError, match="unknown comparison batch 'batch99'"):
        evalkit.load_openai_comparisons(["batch99"])
