"""The simulated panel: calibrated on the real labels, recovers known weights, marks every judgment simulated,
reproducible; the power calculation matches the textbook value."""

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from evalkit.study.simulate import FEATURES, PanelModel, calibrate, features, fit_panel, predict_left, required_judgments


@pytest.fixture(scope="module")
def model():
    return calibrate()


def test_calibrated_on_real_labels(model):
    c = model.calibration
    assert c["n_fit"] + c["n_held_out"] == 2208  # every released TL;DR and news comparison
    assert 0.70 <= c["human_human_agreement"] <= 0.76 and c["n_human_pairs"] > 500  # the paper: 73 ± 2%
    assert 0.60 < c["held_out_agreement_majority"] <= c["human_human_agreement"] + 0.05
    assert model.weights["support"] > 0 and model.weights["repetition"] < 0


def test_fit_recovers_known_weights():
    rng = np.random.default_rng(0)
    n = 20000
    d = pd.DataFrame({f"d_{f}": rng.normal(0, 1, n) for f in FEATURES})
    truth = PanelModel(weights={"support": 1.5, "coverage": 0.8, "repetition": -2.0, "log_words": 0.5}, position_bias=0.2)
    d["left_won"] = (rng.random(n) < predict_left(truth, d)).astype(int)
    fitted = fit_panel(d)
    for f in FEATURES:
        assert fitted.weights[f] == pytest.approx(truth.weights[f], abs=0.12), f
    assert fitted.position_bias == pytest.approx(0.2, abs=0.06)


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
    args = ["study", "simulate", "studies/default", "--set", f"study.out_dir={tmp_path}", *[x for s in SETTINGS for x in ("--set", s)]]
    proc = run_cli(*args, check=True)
    assert "simulated judgments" in proc.stdout and "labeler-labeler agreement" in proc.stdout
    first = pd.read_parquet(tmp_path / "study" / "judgments.parquet")
    tasks = pd.read_parquet(tmp_path / "study" / "tasks.parquet")
    assert set(first["labeler_kind"]) == {"simulated"} and len(first) == len(tasks)
    assert first["note"].str.startswith("simulated: P(left)=").all()
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
