"""Figure 1 across model families: a size curve is fitted only within one family, every policy is a dot, and the
paper's ordering (PPO >= SFT >= pretrained) is checked per family and size, raw and at equal length."""

import numpy as np
import pandas as pd

from evalkit.report.build import Report, _headline, fit_groups, policy_rates


def _family_study(rng, n_items=300):
    """Family A: SFT and PPO at three sizes with a known positive slope. Family B: pretrained, SFT and PPO at one
    size, with PPO > SFT > pretrained by construction and no length effect."""
    rows = []

    def add(family, kind, size, z):
        outcome = (rng.random(n_items) < 1 / (1 + np.exp(-z))).astype(int)
        rows.append(pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "labeler_id": "sim",
                                  "policy_id": f"{kind}-{family}-{size:.0e}", "policy_kind": kind, "n_params": float(size),
                                  "baseline_id": "ref", "outcome": outcome, "len_policy": 100 * np.exp(rng.normal(0, 0.2, n_items)),
                                  "len_baseline": 100.0, "dataset": "tldr", "split": "valid2", "family": family}))

    for kind, a in (("sft", -0.5), ("ppo", 0.2)):
        for size in (1e8, 3e8, 1e9):
            add("A", kind, size, a + 0.6 * (np.log(size) - np.log(1e9)))
    for kind, a in (("pretrained", -1.5), ("sft", 0.0), ("ppo", 1.5)):
        add("B", kind, 2e8, a)
    return pd.concat(rows, ignore_index=True)


def test_size_curves_stay_within_one_family(tmp_path):
    d = _family_study(np.random.default_rng(3))
    rep = Report(tmp_path, "families")
    headline = _headline(rep, d, policy_rates(d, 200, np.random.default_rng(0)), "tldr", "ref", "SIMULATED labels")
    md = "\n".join(rep.md)
    # the fits: one per kind of family A (three sizes each); family B's one size gives no curve and is not pooled in
    assert sorted(h["policy_kind"] for h in headline) == ["ppo", "sft"] and {h["family"] for h in headline} == {"A"}
    assert all(h["smallest_n_params"] == 1e8 and h["n_params"] == 1e9 for h in headline)
    assert "A size curve is fitted only within one family" in md and "Model families: A; B" in md
    # the ordering per family and size, raw and at equal length: holds in B by construction
    b_lines = [line for line in md.splitlines() if line.startswith("- B 200M")]
    assert len(b_lines) == 2 and all(line.endswith("PPO (RLHF) ≥ SFT ≥ pretrained holds") for line in b_lines), b_lines
    assert any(line.startswith("- A 1B, raw: PPO (RLHF)") for line in md.splitlines())
    assert (tmp_path / "figure1_tldr.png").stat().st_size > 1000


def test_one_size_per_family_draws_dots_and_no_curve(tmp_path):
    d = _family_study(np.random.default_rng(4))
    d = d[(d["family"] == "B") | (d["n_params"] == 1e9)]  # every family at one size
    rep = Report(tmp_path, "one size each")
    headline = _headline(rep, d, policy_rates(d, 200, np.random.default_rng(0)), "tldr", "ref", "SIMULATED labels")
    assert len(headline) == d["policy_id"].nunique() and {h["family"] for h in headline} == {"A", "B"}  # every dot
    md = "\n".join(rep.md)
    assert "No policy kind has two sizes in the tldr comparisons within one model family" in md
    assert (tmp_path / "figure1_tldr.png").is_file()  # the dots of every policy, on the same axes


def test_fit_groups_qualify_kinds_by_family_only_when_known():
    d = pd.DataFrame({"policy_kind": ["sft", "sft"], "family": ["A", ""]})
    assert list(fit_groups(d)["policy_kind"]) == ["sft · A", "sft"]
    assert list(fit_groups(d.drop(columns="family"))["policy_kind"]) == ["sft", "sft"]
