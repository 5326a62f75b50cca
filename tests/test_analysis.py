"""Analysis: exact counts from the released labels, intervals checked against statsmodels, and statistical validity
on 200 simulated studies with a known size slope and a known length effect."""

import numpy as np
import pandas as pd
import pytest

from evalkit.analysis import comparisons, length_controlled, preference_rates, size_curve, size_fit, wilson
from evalkit.errors import EvalkitError


@pytest.fixture(scope="module")
def released():
    from evalkit.data import comparison_batch, load_openai_comparisons

    return load_openai_comparisons([comparison_batch(b) for b in ("batch18", "batch0_cnndm", "batch13")])


def test_exact_counts_from_released_labels(released):
    c = comparisons(released)
    v2 = c[c["split"] == "valid2"]
    rates = preference_rates(v2.assign(policy_id=v2["dataset"] + ":" + v2["policy_id"]), n_boot=200).set_index("policy_id")
    expect = {"tldr:sup4_6b": (30, 85), "tldr:sup4_6b_t0.7": (20, 84), "tldr:sup4_6b_p.95": (12, 84),
              "cnndm:sup4_6b_ppo_rm4_6b_kl14": (38, 74), "cnndm:pretrain_6b_t.7": (22, 73), "cnndm:sup4_6b_t0.7": (15, 74)}
    for policy, (wins, n) in expect.items():
        assert (rates.loc[policy, "wins"], rates.loc[policy, "n"]) == (wins, n), policy
    h2h = comparisons(released, baseline="sup4_12b_t0.7")
    h2h = h2h[h2h["split"] == "valid2"]
    assert (int(h2h["outcome"].sum()), len(h2h)) == (598, 832)


def test_wilson_matches_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = wilson(np.array([30, 0, 84]), np.array([85, 10, 84]))
    for i, (w, n) in enumerate([(30, 85), (0, 10), (84, 84)]):
        ref = proportion_confint(w, n, method="wilson")
        assert (lo[i], hi[i]) == pytest.approx(ref)


def simulate_study(rng, slope=0.5, length_effect=0.8, n_items=100):
    """A study with known truth: logit P(preferred) = a_kind + slope·(log n − log 1e9) + length_effect·log_len_ratio."""
    sizes = [1e8, 3e8, 1e9, 3e9]
    intercept = {"sft": -0.4, "ppo": 0.3}
    mean_len = {"sft": 0.0, "ppo": 0.3}
    item_effect = rng.normal(0, 0.3, n_items)
    rows = []
    for kind in ("sft", "ppo"):
        for size in sizes:
            log_ratio = rng.normal(mean_len[kind], 0.3, n_items)
            z = intercept[kind] + slope * (np.log(size) - np.log(1e9)) + length_effect * log_ratio + item_effect
            outcome = (rng.random(n_items) < 1 / (1 + np.exp(-z))).astype(int)
            rows.append(pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "labeler_id": "sim",
                                      "policy_id": f"{kind}-{size:.0e}", "policy_kind": kind, "n_params": int(size),
                                      "outcome": outcome, "len_policy": 100 * np.exp(log_ratio), "len_baseline": 100.0}))
    return pd.concat(rows, ignore_index=True)


def test_size_slope_intervals_cover_the_truth():
    rng = np.random.default_rng(7)
    covered, controlled_ppo, raw_ppo = [], [], []
    for _ in range(200):
        df = simulate_study(rng)
        res = size_fit(df, length=True)
        lo, hi = res.conf_int().loc["log_n_params"]
        covered.append(lo <= 0.5 <= hi)
        at_1b = df[(df["policy_kind"] == "ppo") & (df["n_params"] == int(1e9))]
        raw_ppo.append(at_1b["outcome"].mean())
        new = pd.DataFrame({"policy_kind": ["ppo"], "log_n_params": [np.log(1e9)], "log_len_ratio": [0.0]})
        controlled_ppo.append(float(res.predict(new).iloc[0]))
    coverage = np.mean(covered)
    assert 0.93 <= coverage <= 0.97, coverage
    truth = 1 / (1 + np.exp(-0.3))  # ppo at 1e9 and equal length (item effects average out closely at sd 0.3)
    assert np.mean(controlled_ppo) == pytest.approx(truth, abs=0.015)
    assert np.mean(raw_ppo) > truth + 0.03  # longer summaries inflate the raw rate


def test_size_curve_and_length_control_shapes():
    df = simulate_study(np.random.default_rng(1))
    curve = size_curve(df, length=True)
    assert set(curve["policy_kind"]) == {"sft", "ppo"} and (curve["ci_low"] <= curve["predicted"]).all()
    table, _ = length_controlled(df)
    ppo = table[table["policy_id"].str.startswith("ppo")]
    assert (ppo["controlled_rate"] < ppo["raw_rate"]).mean() > 0.5


def test_degenerate_inputs_are_clear():
    df = simulate_study(np.random.default_rng(2))
    with pytest.raises(EvalkitError, match="at least two sizes"):
        size_fit(df[df["n_params"] == int(1e9)])
    with pytest.raises(EvalkitError, match="no comparisons"):
        preference_rates(df.iloc[0:0])
    zero = df[df["policy_id"] == "sft-1e+08"].assign(outcome=0)
    rates = preference_rates(zero, n_boot=100)
    assert rates["rate"].iloc[0] == 0 and rates["wilson_low"].iloc[0] == pytest.approx(0, abs=1e-12) and rates["wilson_high"].iloc[0] > 0.02


def test_vectorised_bootstrap_matches_refits():
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    from evalkit.analysis.preference import bootstrap_size_fit

    df = simulate_study(np.random.default_rng(3))
    boot = bootstrap_size_fit(df, n_boot=300, rng=np.random.default_rng(0)).set_index("term")
    full = size_fit(df)
    assert np.allclose(boot["estimate"], full.params[boot.index], atol=1e-6)  # same point estimate as statsmodels
    # the same replicate refitted with statsmodels gives the same coefficients
    rng = np.random.default_rng(11)
    items = df["item_id"].unique()
    sample = rng.choice(items, size=len(items), replace=True)
    resampled = pd.concat([df[df["item_id"] == i] for i in sample], ignore_index=True).assign(log_n_params=lambda x: np.log(x["n_params"].astype(float)))
    ref = smf.glm("outcome ~ C(policy_kind) * log_n_params", resampled, family=sm.families.Binomial()).fit()
    import patsy

    from evalkit.analysis.preference import _batched_logit

    cells = resampled.groupby("policy_id").agg(policy_kind=("policy_kind", "first"), log_n_params=("log_n_params", "first"),
                                                wins=("outcome", "sum"), n=("outcome", "size")).reset_index()
    X = patsy.dmatrix("C(policy_kind) * log_n_params", cells, return_type="dataframe")
    beta = _batched_logit(X.to_numpy(), cells["wins"].to_numpy()[None], cells["n"].to_numpy()[None].astype(float))[0]
    assert np.allclose(beta, ref.params[X.columns], atol=1e-6)
    # bootstrap and clustered-sandwich standard errors agree roughly
    assert boot.loc["log_n_params", "boot_se"] == pytest.approx(full.bse["log_n_params"], rel=0.3)


def test_rm_accuracy_by_size_and_kl_table(tmp_path):
    from evalkit.analysis.rm_eval import kl_vs_preference, rm_accuracy_by_size
    from evalkit.checkpoints import write_metadata
    from evalkit.train.best_of_n import best_of_n_kl

    folders = []
    for n_params, acc in ((1e6, 0.60), (2e6, 0.62), (4e6, 0.64)):
        f = tmp_path / f"rm{int(n_params)}"
        f.mkdir()
        write_metadata(f, n_params=int(n_params), held_out_accuracy=acc, n_held_out=1000)
        folders.append(f)
    table, summary = rm_accuracy_by_size(folders)
    assert summary["accuracy_per_doubling"] == pytest.approx(0.02)
    write_metadata(folders[0], base="another-family")  # sizes of two families: no slope across them
    _, mixed = rm_accuracy_by_size(folders)
    assert mixed["accuracy_per_doubling"] is None and "different model families" in mixed["why_not"]
    assert (table["ci_low"] < table["accuracy"]).all()
    comp = pd.DataFrame({"policy_id": ["bon4"] * 10 + ["ppo"] * 10, "outcome": [1] * 6 + [0] * 4 + [1] * 8 + [0] * 2})
    kl = kl_vs_preference(comp, {"bon4": best_of_n_kl(4), "ppo": 3.8})
    assert list(kl["policy_id"]) == ["bon4", "ppo"] and list(kl["rate"]) == [0.6, 0.8]
    with pytest.raises(EvalkitError, match="no held-out accuracy"):
        empty = tmp_path / "empty"
        empty.mkdir()
        rm_accuracy_by_size([empty])
