"""Tidy analysis functions (DataFrame in → DataFrame out), usable from Jupyter."""

from evalkit.analysis.preference import (
    SIZE_FORMULA,
    cluster_bootstrap_rates,
    comparisons,
    fit_table,
    length_controlled,
    preference_rates,
    size_curve,
    size_fit,
    wilson,
)

__all__ = ["SIZE_FORMULA", "cluster_bootstrap_rates", "comparisons", "fit_table", "length_controlled", "preference_rates",
           "size_curve", "size_fit", "wilson"]
