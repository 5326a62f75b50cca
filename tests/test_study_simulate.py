"""The simulated panel: calibrated on the real labels, recovers known weights, marks every judgment simulated,
reproducible; the power calculation matches the textbook value."""

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from evalkit.judges import FEATURES, FeaturesJudge, Judge, LengthJudge, evaluate, features, fit_feature_weights, released_comparisons
from evalkit.study.simulate import Panel, calibrate, panel_row, required_judgments, simulated_agreement


@pytest.fixture(scope="module")
def judge():
    return FeaturesJudge()


@pytest.fixture(scope="module")
def model(judge):
    return calibrate(judge)


def test_noise_calibrated_to_real_labeler_agreement(model):
    """The labeler noise is set per dataset so that simulated labelers in place of the real ones agree as often as
    the real ones did (≈72% TL;DR, ≈79% CNN/DM, pair-weighted on released comparisons labelled twice or more)."""
    for dataset, (low, high) in {"tldr": (0.69, 0.75), "cnndm": (0.74, 0.82)}.items():
        c = model.calibration[dataset]
        assert low <= c["human_pair_agreement"] <= high and c["reached"], (dataset, c)
        assert c["simulated_pair_agreement"] == pytest.approx(c["human_pair_agreement"], abs=0.005)
    assert model.judge_id == "features" and 0 < model.position_bias < 0.5  # real labelers choose the left one ~53%


def test_panel_row_on_held_out_labels(model, judge):
    """On valid2 (which neither the judge nor the calibration's choices come from) the panel's own labeler–labeler
    agreement lands within 3 points of the humans' on TL;DR, and its human agreement is scored by the human row's
    protocol (one simulated labeler for the left-out human) — below its noiseless judge's, as noise must make it."""
    pairs = released_comparisons()
    row = panel_row(model, judge, pairs)
    human, noiseless = evaluate(None, pairs), evaluate(judge, pairs)
    assert abs(row["pair_agreement_tldr"] - human["pair_agreement_tldr"]) <= 0.03
    assert row["n_loo"] == human["n_loo"] and row["human_agreement"] < noiseless["human_agreement"]
    assert row["judge"] == "panel:features"


class _Fixed(Judge):
    def __init__(self, p):
        super().__init__("fixed")
        self.p = p

    def prob_left(self, pairs):
        return np.full(len(pairs), self.p)


def test_agreement_rises_with_the_judges_certainty():
    rows = pd.DataFrame({"comparison": ["a", "a", "b", "b", "b"], "logit": [2.0, 2.0, -1.0, -1.0, -1.0], "shown_first": [1, 0, 1, 1, 0]})
    assert simulated_agreement(rows, 0.01, 0.0) == pytest.approx(0.5, abs=0.01)  # no signal: a coin flip
    assert simulated_agreement(rows, 1.0, 0.0) < simulated_agreement(rows, 3.0, 0.0) < 1
    # a judge with no opinion cannot be made to agree more than chance: the panel says so instead of pretending
    unreachable = calibrate(_Fixed(0.5))
    assert not unreachable.calibration["tldr"]["reached"] and unreachable.calibration["tldr"]["simulated_pair_agreement"] < 0.55


def test_fit_recovers_known_weights():
    rng = np.random.default_rng(0)
    n = 20000
    d = pd.DataFrame({f"d_{f}": rng.normal(0, 1, n) for f in FEATURES})
    truth = {"support": 1.5, "coverage": 0.8, "repetition": -2.0, "log_words": 0.5}
    z = 0.2 + sum(truth[f] * d[f"d_{f}"] for f in FEATURES)
    d["left_won"] = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    weights, bias = fit_feature_weights(d)
    for f in FEATURES:
        assert weights[f] == pytest.approx(truth[f], abs=0.12), f
    assert bias == pytest.approx(0.2, abs=0.06)


def test_panel_saves_and_loads(model, tmp_path):
    again = Panel.load(model.save(tmp_path / "panel.json"))
    assert again == model and LengthJudge().judge_id == "length"


def test_features_see_invented_content_and_repetition():
    post = "My landlord refuses to return my deposit after I moved out of the apartment in March."
    good = features("landlord refuses to return deposit after moved out", post)
    invented = features("my boss fired me and my cat ran away", post)
    repeated = features("deposit deposit deposit deposit", post)
    assert good["support"] == 1.0 and invented["support"] < 0.3
    assert repeated["repetition"] > 0.7 and good["repetition"] == 0.0


def test_simulate_marks_judgments_and_is_reproducible(tmp_path):
    from conftest import baseline_study
    from test_study_build import SETTINGS

    baseline_study(tmp_path, *SETTINGS)
    # the bag-of-words judge (the default encoder's own test is in test_judges): this test is about the panel's marks
    args = ["study", "simulate", "studies/default", "--set", f"study.out_dir={tmp_path}", "--set", "labelers.judge=features",
            *[x for s in SETTINGS for x in ("--set", s)]]
    proc = run_cli(*args, check=True)
    assert "simulated judgments" in proc.stdout and "panel on judge features" in proc.stdout
    first = pd.read_parquet(tmp_path / "study" / "judgments.parquet")
    tasks = pd.read_parquet(tmp_path / "study" / "tasks.parquet")
    assert set(first["labeler_kind"]) == {"simulated"} and len(first) == len(tasks)
    assert first["note"].str.startswith("simulated on features: P(left)=").all()
    assert (first["source"] == "simulated-panel:features").all()
    validation = pd.read_csv(tmp_path / "study" / "panel_validation.csv")
    assert list(validation["judge"]) == ["human", "length", "features", "panel:features"]
    j = first.merge(tasks, on=["task_id", "labeler_id"])
    assert (j["preferred_gen_id"] == j["gen_id_left"].where(j["preferred"] == "left", j["gen_id_right"])).all()
    run_cli(*args, check=True)
    pd.testing.assert_frame_equal(first, pd.read_parquet(tmp_path / "study" / "judgments.parquet"))
    # the attention checks (shuffled words) are mostly caught by the panel
    gold = j[j["role"].isin(["gold", "attention"])]
    assert (gold["preferred"] == gold["expected"]).mean() >= 0.6


def test_power():
    assert required_judgments(0.5, 0.6) == 388
    assert required_judgments(0.5, 0.6, design_effect=1.5) == 582
    proc = run_cli("study", "power", "--p1", "0.5", "--p2", "0.5")
    assert proc.returncode == 2 and "two different rates" in proc.stderr


def test_panel_row_follows_the_order_each_label_was_shown_in(model, judge):
    """A comparison shown in the other order to some labelers: each simulated labeler reads the judge for the summary
    it sees on the left, so swapping the shown order of half the labels leaves the panel's agreement where it was."""
    pairs = released_comparisons()
    counts = pairs["comparison"].value_counts()
    pairs = pairs[pairs["comparison"].isin(counts.index[counts >= 2])].reset_index(drop=True)  # only these can be mixed
    swapped = pairs.copy()
    flip = swapped.index % 2 == 1
    swapped.loc[flip, ["left", "right", "gen_id_left", "gen_id_right"]] = pairs.loc[flip, ["right", "left", "gen_id_right", "gen_id_left"]].to_numpy()
    swapped.loc[flip, "left_won"] = 1 - pairs.loc[flip, "left_won"]
    a, b = panel_row(model, judge, pairs), panel_row(model, judge, swapped)
    assert abs(a["agreement_with_labels"] - b["agreement_with_labels"]) < 0.03 and b["agreement_with_labels"] > 0.6
