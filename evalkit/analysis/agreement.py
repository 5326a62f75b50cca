"""Agreement and position bias, and Bradley–Terry scores for all policies at once."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

SMALL_N = 20  # judgments: fewer, and a policy's estimate is listed apart as "too few judgments"


def _pair_design(first, second, index: dict[str, int]) -> np.ndarray:
    """Bradley–Terry design rows: +1 in the column of the first policy, −1 in the second's (reference levels, absent
    from ``index``, have no column)."""
    X = np.zeros((len(first), len(index)))
    for row, (a, b) in enumerate(zip(first, second)):
        if a in index:
            X[row, index[a]] += 1
        if b in index:
            X[row, index[b]] -= 1
    return X


def pair_key(gen_a: str, gen_b: str) -> str:
    """The unordered pair of two generations, as every pairwise analysis names it (the order shown does not matter)."""
    return " | ".join(sorted((gen_a, gen_b)))


def pairwise_view(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairwise judgments with the unordered pair of generations, the winner and the side chosen."""
    tasks, judg = tables["tasks"], tables["judgments"]
    df = judg.dropna(subset=["preferred_gen_id"]).merge(
        tasks[["task_id", "item_id", "gen_id_left", "gen_id_right", "role", "expected"]], on="task_id")
    df["pair"] = [pair_key(a, b) for a, b in zip(df["gen_id_left"], df["gen_id_right"])]
    return df


def _agreeing_pairs(g: pd.DataFrame) -> tuple[int, int]:
    """(agreeing, all) pairs of judgments of the same two summaries by different labelers, within ``g``."""
    agree = total = 0
    for _, p in g.groupby("pair"):
        winners, labs = list(p["preferred_gen_id"]), list(p["labeler_id"])
        for i in range(len(winners)):
            for j in range(i + 1, len(winners)):
                if labs[i] != labs[j]:
                    total += 1
                    agree += winners[i] == winners[j]
    return agree, total


def labeler_agreement(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Labeler–labeler agreement: over every two judgments of the same pair of summaries by different labelers."""
    agree, total = _agreeing_pairs(pairwise_view(tables))
    return {"agreement": agree / total if total else float("nan"), "n_pairs": total}


def per_labeler(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per labeler: judgments, share choosing the left summary (position bias), agreement with the other labelers'
    majority on shared pairs, and gold/attention accuracy where such tasks exist (failures are flagged, not dropped)."""
    df = pairwise_view(tables)
    majority = {}
    for pair, g in df.groupby("pair"):
        if g["labeler_id"].nunique() >= 2:
            majority[pair] = g
    rows = []
    for labeler, g in df.groupby("labeler_id"):
        agree = total = 0
        for r in g.itertuples():
            others = majority.get(r.pair)
            if others is None:
                continue
            others = others[others["labeler_id"] != labeler]
            if others.empty:
                continue
            counts = others["preferred_gen_id"].value_counts()
            if len(counts) > 1 and counts.iloc[0] == counts.iloc[1]:
                continue
            total += 1
            agree += counts.index[0] == r.preferred_gen_id
        checks = g[g["expected"].notna()]
        rows.append({"labeler_id": labeler, "n": len(g), "left_rate": float((g["preferred"] == "left").mean()),
                     "agreement_with_others": agree / total if total else float("nan"), "n_shared": total,
                     "check_accuracy": float((checks["preferred"] == checks["expected"]).mean()) if len(checks) else float("nan"),
                     "failed_checks": int((checks["preferred"] != checks["expected"]).sum())})
    return pd.DataFrame(rows)


def bradley_terry(tables: dict[str, pd.DataFrame], n_boot: int = 200, rng: np.random.Generator | None = None,
                  anchor: str = "ref") -> pd.DataFrame:
    """Bradley–Terry strengths of every policy from all pairwise judgments (``anchor`` fixed at 0), point estimate from
    the full fit and percentile intervals from an item-level bootstrap."""
    import statsmodels.api as sm

    rng = rng if rng is not None else np.random.default_rng(0)
    policy = tables["generations"].set_index("gen_id")["policy_id"]
    df = pairwise_view(tables)
    df = df[~df["role"].isin(["gold", "attention"])].copy()  # planted answers measure labelers, not policies
    df["a"], df["b"] = df["gen_id_left"].map(policy), df["gen_id_right"].map(policy)
    df = df[df["a"] != df["b"]]
    df["a_won"] = (df["preferred_gen_id"] == df["gen_id_left"]).astype(float)
    policies = sorted(set(df["a"]) | set(df["b"]))
    if anchor not in policies:
        anchor = policies[0]
    # only the policies connected to the anchor by comparisons are identified
    linked, frontier = {anchor}, [anchor]
    while frontier:
        p = frontier.pop()
        for q in set(df.loc[df["a"] == p, "b"]) | set(df.loc[df["b"] == p, "a"]):
            if q not in linked:
                linked.add(q)
                frontier.append(q)
    df = df[df["a"].isin(linked) & df["b"].isin(linked)]
    policies = sorted(linked)
    others = [p for p in policies if p != anchor]
    index = {p: i for i, p in enumerate(others)}

    def fit(d: pd.DataFrame) -> np.ndarray:
        X = _pair_design(d["a"], d["b"], index)
        res = sm.GLM(d["a_won"].to_numpy(), X, family=sm.families.Binomial()).fit_regularized(alpha=1e-6, L1_wt=0.0)
        return np.asarray(res.params)

    point = fit(df)
    items = df["item_id"].unique()
    groups = {i: g for i, g in df.groupby("item_id")}
    boots = []
    for _ in range(n_boot):
        sample = rng.choice(items, size=len(items), replace=True)
        d = pd.concat([groups[i] for i in sample], ignore_index=True)
        est = fit(d)
        absent = [index[p] for p in others if not ((d["a"] == p) | (d["b"] == p)).any()]
        est[absent] = np.nan  # a policy missing from a resample has no estimate there (not 0, the anchor's value)
        boots.append(est)
    boots = np.array(boots).reshape(len(boots), len(others))
    n_of = pd.concat([df["a"], df["b"]]).value_counts()
    out = [{"policy_id": anchor, "strength": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": int(n_of.get(anchor, 0)),
            "small_n": bool(n_of.get(anchor, 0) < SMALL_N)}]
    for p, k in index.items():
        col = boots[:, k][~np.isnan(boots[:, k])]
        lo, hi = (float(np.quantile(col, 0.025)), float(np.quantile(col, 0.975))) if len(col) else (np.nan, np.nan)
        out.append({"policy_id": p, "strength": float(point[k]), "ci_low": lo, "ci_high": hi, "n": int(n_of.get(p, 0)),
                    "small_n": bool(n_of.get(p, 0) < SMALL_N)})
    return pd.DataFrame(out).sort_values(["small_n", "strength"], ascending=[True, False]).reset_index(drop=True)


def _placement(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairwise judgments of two different policies: which policy was on each side and whether the left one won."""
    policy = tables["generations"].set_index("gen_id")["policy_id"]
    df = pairwise_view(tables)
    df = df.assign(left_policy=df["gen_id_left"].map(policy), right_policy=df["gen_id_right"].map(policy))
    df = df[df["left_policy"].notna() & df["right_policy"].notna() & (df["left_policy"] != df["right_policy"])]
    return df.assign(left_won=(df["preferred"] == "left").astype(int)).reset_index(drop=True)


def _placement_design(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """+1 for the policy on the left, −1 for the one on the right; in each group of policies connected by comparisons
    the first is the reference level (strengths are only identified within a connected group)."""
    policies = sorted(set(df["left_policy"]) | set(df["right_policy"]))
    parent = {p: p for p in policies}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for a, b in zip(df["left_policy"], df["right_policy"]):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    free = [p for p in policies if root(p) != p]  # a component's smallest policy is its reference
    return _pair_design(df["left_policy"], df["right_policy"], {p: i for i, p in enumerate(free)}), policies


def position_effect(tables: dict[str, pd.DataFrame], level: float = 0.95) -> dict:
    """Position bias adjusted for which policy sits on each side.

    The naive left rate confounds position with policy when one policy is shown first more often. The model:
    logit P(left chosen) = b + s(policy on the left) − s(policy on the right) (Bradley–Terry with a side effect); ``b``
    is the position effect, reported as P(left) between two equal summaries, σ(b), with a 95% CI from item-clustered
    standard errors.
    """
    import statsmodels.api as sm

    df = _placement(tables)
    naive = float(df["left_won"].mean()) if len(df) else float("nan")
    # policies with very few judgments (often won all or none) make the fit singular and say nothing about sides
    counts = pd.concat([df["left_policy"], df["right_policy"]]).value_counts()
    rare = set(counts[counts < 10].index)
    df = df[~df["left_policy"].isin(rare) & ~df["right_policy"].isin(rare)]
    X, _ = _placement_design(df) if len(df) else (np.zeros((0, 0)), [])
    X = np.column_stack([np.ones(len(df)), X])
    if len(df) < 10 or np.linalg.matrix_rank(X) < X.shape[1]:  # e.g. every policy always shown on the same side
        return {"naive_left_rate": naive, "adjusted_left_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "log_odds": float("nan"), "std_err": float("nan"), "n": len(df), "n_clusters": int(df["item_id"].nunique())}
    groups = df["item_id"].astype("category").cat.codes.to_numpy()
    res = sm.GLM(df["left_won"].to_numpy(), X, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": groups})
    b, se = float(res.params[0]), float(res.bse[0])
    z = norm.ppf(0.5 + level / 2)

    def sig(v: float) -> float:
        return float(1 / (1 + np.exp(-v)))

    return {"naive_left_rate": naive, "adjusted_left_rate": sig(b), "ci_low": sig(b - z * se), "ci_high": sig(b + z * se),
            "log_odds": b, "std_err": se, "n": len(df), "n_clusters": int(df["item_id"].nunique())}


def labeler_position(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per labeler: the naive left rate and the left rate in excess of what the policies on each side predict
    (a policy-only Bradley–Terry fit), so a labeler shown the stronger policy first is not called biased."""
    import statsmodels.api as sm

    df = _placement(tables)
    if df.empty:
        return pd.DataFrame(columns=["labeler_id", "left_rate", "left_excess"])
    X, _ = _placement_design(df)
    if X.shape[1]:
        fitted = sm.GLM(df["left_won"].to_numpy(), X, family=sm.families.Binomial()).fit_regularized(alpha=1e-6, L1_wt=0.0)
        expected = 1 / (1 + np.exp(-(X @ np.asarray(fitted.params))))
    else:
        expected = np.full(len(df), 0.5)
    df = df.assign(excess=df["left_won"] - expected)
    return df.groupby("labeler_id").agg(left_rate=("left_won", "mean"), left_excess=("excess", "mean")).reset_index()


def agreement_with_ci(tables: dict[str, pd.DataFrame], n_boot: int = 1000, rng: np.random.Generator | None = None) -> dict:
    """Labeler–labeler agreement with a 95% interval from resampling items (pairs of one item are not independent)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    df = pairwise_view(tables)
    per_item = [counts for _, g in df.groupby("item_id") if (counts := _agreeing_pairs(g))[1]]
    if not per_item:
        return {"agreement": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_pairs": 0, "n_items": 0}
    counts = np.array(per_item, dtype=float)
    k = len(counts)
    w = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)
    boot = (w @ counts[:, 0]) / np.maximum(w @ counts[:, 1], 1)
    return {"agreement": float(counts[:, 0].sum() / counts[:, 1].sum()), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975)), "n_pairs": int(counts[:, 1].sum()), "n_items": k}


def oriented_by_policy(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairwise judgments with ``first_won``: whether the summary of the policy that sorts first won (ties in policy:
    the generation id). The orientation is fixed by the policies, not by the ids' hash order, so alpha is too."""
    policy = tables["generations"].set_index("gen_id")["policy_id"]
    df = pairwise_view(tables)
    key_l = list(zip(df["gen_id_left"].map(policy).fillna(""), df["gen_id_left"]))
    key_r = list(zip(df["gen_id_right"].map(policy).fillna(""), df["gen_id_right"]))
    first = [a[1] if a <= b else b[1] for a, b in zip(key_l, key_r)]
    return df.assign(first_won=(df["preferred_gen_id"] == pd.Series(first, index=df.index)).astype(int))


def cohen_kappa(a, b, clusters=None, n_boot: int = 1000, rng: np.random.Generator | None = None) -> dict:
    """Cohen's kappa of two binary raters on the same pairs, with a 95% interval from resampling ``clusters``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def kappa(x: np.ndarray, y: np.ndarray) -> float:
        po = float(np.mean(x == y))
        px, py = float(np.mean(x)), float(np.mean(y))
        pe = px * py + (1 - px) * (1 - py)
        return (po - pe) / (1 - pe) if pe < 1 else float("nan")

    if len(a) == 0:
        return {"kappa": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "agreement": float("nan"), "n": 0}
    rng = rng if rng is not None else np.random.default_rng(0)
    groups = np.asarray(clusters) if clusters is not None else np.arange(len(a))
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])
        boots.append(kappa(a[idx], b[idx]))
    boots = np.array(boots)
    boots = boots[np.isfinite(boots)]
    lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if len(boots) else (float("nan"), float("nan"))
    return {"kappa": kappa(a, b), "ci_low": lo, "ci_high": hi, "agreement": float(np.mean(a == b)), "n": len(a)}
