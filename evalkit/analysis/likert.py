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


def _unit_coincidences(d: pd.DataFrame, unit: str, value: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pairable unit's contribution to the coincidence matrix (units × m × m) and the units' ids."""
    m = len(values)
    codes = np.searchsorted(values, d[value].to_numpy())
    counts = pd.crosstab(d[unit].to_numpy(), codes).reindex(columns=range(m), fill_value=0)
    c = counts.to_numpy(dtype=float)
    n_u = c.sum(axis=1)
    keep = n_u >= 2
    c, n_u = c[keep], n_u[keep]
    contrib = (c[:, :, None] * c[:, None, :] - np.einsum("uk,kl->ukl", c, np.eye(m))) / (n_u - 1)[:, None, None]
    return contrib, counts.index.to_numpy()[keep]


def _alpha_from(coincidence: np.ndarray, values: np.ndarray, level: str) -> float:
    m = len(values)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    if n <= 1:
        return float("nan")
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


def krippendorff_alpha(data: pd.DataFrame, unit: str, coder: str, value: str, level: str = "nominal") -> float:
    """Krippendorff's alpha from a long table (one row per coder's value for a unit); ``level`` nominal, ordinal or
    interval. Units with fewer than two values are not pairable and are ignored."""
    d = data[[unit, coder, value]].dropna()
    values = np.sort(d[value].unique())
    contrib, _ = _unit_coincidences(d, unit, value, values)
    if len(contrib) == 0:
        raise EvalkitError("Krippendorff's alpha needs units with at least two values")
    return _alpha_from(contrib.sum(axis=0), values, level)


def krippendorff_alpha_ci(data: pd.DataFrame, unit: str, coder: str, value: str, level: str = "nominal", cluster: str = "item_id",
                          n_boot: int = 1000, rng: np.random.Generator | None = None) -> dict:
    """Krippendorff's alpha with a 95% percentile interval from resampling ``cluster`` (items: the units of one post
    are not independent); each replicate weighs every unit by its cluster's draw count. Also the number of pairable
    units and of their clusters (an alpha resting on a few posts says so)."""
    d = data[[unit, coder, value, cluster]].dropna()
    values = np.sort(d[value].unique())
    contrib, units = _unit_coincidences(d, unit, value, values)
    if len(contrib) == 0:
        return {"alpha": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_units": 0, "n_clusters": 0}
    of_unit = d.drop_duplicates(unit).set_index(unit)[cluster].reindex(units).to_numpy()
    clusters, which = np.unique(of_unit, return_inverse=True)
    per_cluster = np.zeros((len(clusters), contrib.shape[1] * contrib.shape[2]))
    np.add.at(per_cluster, which, contrib.reshape(len(contrib), -1))
    rng = rng if rng is not None else np.random.default_rng(0)
    k = len(clusters)
    weights = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)
    reps = (weights @ per_cluster).reshape(n_boot, *contrib.shape[1:])
    boots = np.array([_alpha_from(r, values, level) for r in reps])
    boots = boots[np.isfinite(boots)]
    lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if len(boots) else (float("nan"), float("nan"))
    return {"alpha": _alpha_from(contrib.sum(axis=0), values, level), "ci_low": lo, "ci_high": hi, "n_units": len(units), "n_clusters": k}
