"""Likert ratings (CNN/DM transfer, Table 13/14 style) and Krippendorff's alpha."""

from __future__ import annotations

import numpy as np
import pandas as pd

from evalkit.errors import EvalkitError

AXES = ("overall", "accuracy", "coverage", "coherence")


def likert_view(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per Likert judgment: the rated summary's policy, size, length in characters, and the four ratings."""
    tasks, judg, gens = tables["tasks"], tables["judgments"], tables["generations"].set_index("gen_id")
    df = judg.dropna(subset=["overall"]).merge(tasks[tasks["kind"] == "likert"][["task_id", "item_id", "gen_id_left"]], on="task_id")
    return pd.DataFrame({"item_id": df["item_id"], "labeler_id": df["labeler_id"], "policy_id": df["gen_id_left"].map(gens["policy_id"]),
                         "policy_kind": df["gen_id_left"].map(gens["policy_kind"]), "n_params": df["gen_id_left"].map(gens["n_params"]),
                         "length_chars": df["gen_id_left"].map(gens["text"]).str.len(),
                         **{a: df[a].astype(float) for a in AXES}})


def likert_means(df: pd.DataFrame, n_boot: int = 1000, rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Per policy: mean length and mean rating on each axis with item-clustered bootstrap 95% intervals."""
    if df.empty:
        raise EvalkitError("no Likert ratings to analyse")
    rng = rng if rng is not None else np.random.default_rng(0)
    rows = []
    for policy, g in df.groupby("policy_id"):
        row = {"policy_id": policy, "policy_kind": g["policy_kind"].iloc[0], "n_params": g["n_params"].iloc[0], "n": len(g),
               "mean_length_chars": g["length_chars"].mean()}
        per_item = g.groupby("item_id")
        k = per_item.ngroups
        weights = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)
        counts = per_item.size().to_numpy()
        for axis in AXES:
            sums = per_item[axis].sum().to_numpy()
            boot = (weights @ sums) / np.maximum(weights @ counts, 1)
            row[axis] = g[axis].mean()
            row[f"{axis}_low"], row[f"{axis}_high"] = np.quantile(boot, [0.025, 0.975])
        rows.append(row)
    return pd.DataFrame(rows)


def length_adjusted_means(df: pd.DataFrame, axis: str = "overall"):
    """Regression of the rating on policy and log length (item-clustered SEs), predicted at the pooled mean log length:
    how much of a policy's score its length explains."""
    import statsmodels.formula.api as smf

    d = df[df["length_chars"] > 0].assign(log_len=lambda x: np.log(x["length_chars"]))
    fit = smf.ols(f"{axis} ~ C(policy_id) + log_len", d).fit(cov_type="cluster", cov_kwds={"groups": d["item_id"].astype("category").cat.codes})
    at = d["log_len"].mean()
    rows = []
    for policy, g in d.groupby("policy_id"):
        pred = fit.get_prediction(pd.DataFrame({"policy_id": [policy], "log_len": [at]})).summary_frame(alpha=0.05).iloc[0]
        rows.append({"policy_id": policy, "raw_mean": g[axis].mean(), "adjusted_mean": pred["mean"],
                     "ci_low": pred["mean_ci_lower"], "ci_high": pred["mean_ci_upper"]})
    return pd.DataFrame(rows), fit


def krippendorff_alpha(data: pd.DataFrame, unit: str, coder: str, value: str, level: str = "nominal") -> float:
    """Krippendorff's alpha from a long table (one row per coder's value for a unit); ``level`` nominal, ordinal or
    interval. Units with fewer than two values are not pairable and are ignored."""
    d = data[[unit, coder, value]].dropna()
    values = np.sort(d[value].unique())
    index = {v: i for i, v in enumerate(values)}
    m = len(values)
    coincidence = np.zeros((m, m))
    for _, g in d.groupby(unit):
        vals = [index[v] for v in g[value]]
        n_u = len(vals)
        if n_u < 2:
            continue
        counts = np.bincount(vals, minlength=m).astype(float)
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (n_u - 1)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    if n == 0:
        raise EvalkitError("Krippendorff's alpha needs units with at least two values")
    if level == "nominal":
        delta = 1.0 - np.eye(m)
    elif level == "interval":
        delta = (values[:, None] - values[None, :]).astype(float) ** 2
    elif level == "ordinal":
        cum = np.cumsum(n_c)
        delta = np.zeros((m, m))
        for c in range(m):
            for k in range(m):
                lo, hi = min(c, k), max(c, k)
                delta[c, k] = (cum[hi] - cum[lo] + n_c[lo] - (n_c[c] + n_c[k]) / 2) ** 2 if c != k else 0.0
    else:
        raise EvalkitError(f"unknown level {level!r}; expected nominal, ordinal or interval")
    observed = (coincidence * delta).sum() / n
    expected = (np.outer(n_c, n_c) * delta).sum() / (n * (n - 1))
    return float(1 - observed / expected) if expected > 0 else float("nan")
