"""Tidy analysis functions (DataFrame in → DataFrame out), usable from Jupyter."""

from evalkit.analysis.agreement import bradley_terry, labeler_agreement, labeler_position, per_labeler, position_effect
from evalkit.analysis.likert import krippendorff_alpha, length_adjusted_means, likert_means, likert_view
from evalkit.analysis.preference import (
    SIZE_FORMULA,
    bootstrap_size_fit,
    cluster_bootstrap_rates,
    comparisons,
    fit_table,
    length_controlled,
    preference_rates,
    separated_kinds,
    size_curve,
    size_fit,
    wilson,
)
from evalkit.analysis.rm_eval import kl_vs_preference, rm_accuracy_by_size

__all__ = ["SIZE_FORMULA", "bootstrap_size_fit", "bradley_terry", "cluster_bootstrap_rates", "comparisons", "fit_table",
           "kl_vs_preference", "krippendorff_alpha", "labeler_agreement", "length_adjusted_means", "length_controlled",
           "likert_means", "likert_view", "labeler_position", "per_labeler", "position_effect", "preference_rates", "rm_accuracy_by_size", "separated_kinds", "size_curve", "size_fit",
           "wilson"]
