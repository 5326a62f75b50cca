"""Likert analysis and Krippendorff's alpha against known answers."""

import numpy as np
import pandas as pd
import pytest

from evalkit.analysis.likert import krippendorff_alpha, length_adjusted_means, likert_means


def test_krippendorff_alpha_textbook_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, missing values
    nan = np.nan
    rel = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
                    [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]])
    df = pd.DataFrame([{"unit": u, "coder": c, "value": rel[c, u]} for c in range(4) for u in range(12) if not np.isnan(rel[c, u])])
    assert krippendorff_alpha(df, "unit", "coder", "value", "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(df, "unit", "coder", "value", "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(df, "unit", "coder", "value", "interval") == pytest.approx(0.849, abs=5e-4)


def test_length_adjusted_means_remove_a_known_length_effect():
    rng = np.random.default_rng(0)
    rows = []
    for policy, effect, mean_len in (("short", 0.0, 120), ("long", 0.0, 300), ("better", 0.6, 120)):
        for item in range(300):
            length = mean_len * np.exp(rng.normal(0, 0.2))
            overall = 3.5 + effect + 1.0 * np.log(length / 150) + rng.normal(0, 0.8)
            rows.append({"item_id": f"i{item}", "labeler_id": "l", "policy_id": policy, "policy_kind": "sft", "n_params": 1,
                         "length_chars": length, "overall": overall, "accuracy": overall, "coverage": overall, "coherence": overall})
    df = pd.DataFrame(rows)
    means = likert_means(df, n_boot=200).set_index("policy_id")
    assert means.loc["long", "overall"] > means.loc["short", "overall"] + 0.7  # raw: length looks like quality
    assert means.loc["short", "overall_low"] < means.loc["short", "overall"] < means.loc["short", "overall_high"]
    adjusted, fit = length_adjusted_means(df)
    adjusted = adjusted.set_index("policy_id")
    assert adjusted.loc["long", "adjusted_mean"] == pytest.approx(adjusted.loc["short", "adjusted_mean"], abs=0.15)
    assert adjusted.loc["better", "adjusted_mean"] - adjusted.loc["short", "adjusted_mean"] == pytest.approx(0.6, abs=0.15)
    assert fit.params["log_len"] == pytest.approx(1.0, abs=0.15)
