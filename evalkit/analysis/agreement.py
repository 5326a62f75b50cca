"""Agreement and position bias, and Bradley–Terry scores for all policies at once."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pairwise_view(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairwise judgments with the unordered pair of generations, the winner and the side chosen."""
    tasks, judg = tables["tasks"], tables["judgments"]
    df = judg.dropna(subset=["preferred_gen_id"]).merge(
        tasks[["task_id", "item_id", "gen_id_left", "gen_id_right", "role", "expected"]], on="task_id")
    df["pair"] = [" | ".join(sorted(p)) for p in zip(df["gen_id_left"], df["gen_id_right"])]
    return df


def labeler_agreement(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Labeler–labeler agreement: over every two judgments of the same pair of summaries by different labelers."""
    df = pairwise_view(tables)
    agree = total = 0
    for _, g in df.groupby("pair"):
        winners, labs = list(g["preferred_gen_id"]), list(g["labeler_id"])
        for i in range(len(winners)):
            for j in range(i + 1, len(winners)):
                if labs[i] != labs[j]:
                    total += 1
                    agree += winners[i] == winners[j]
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
        X = np.zeros((len(d), len(others)))
        for row, (a, b) in enumerate(zip(d["a"], d["b"])):
            if a in index:
                X[row, index[a]] += 1
            if b in index:
                X[row, index[b]] -= 1
        res = sm.GLM(d["a_won"].to_numpy(), X, family=sm.families.Binomial()).fit_regularized(alpha=1e-6, L1_wt=0.0)
        return np.asarray(res.params)

    point = fit(df)
    items = df["item_id"].unique()
    groups = {i: g for i, g in df.groupby("item_id")}
    boots = []
    for _ in range(n_boot):
        sample = rng.choice(items, size=len(items), replace=True)
        boots.append(fit(pd.concat([groups[i] for i in sample], ignore_index=True)))
    boots = np.array(boots)
    n_of = pd.concat([df["a"], df["b"]]).value_counts()
    out = [{"policy_id": anchor, "strength": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": int(n_of.get(anchor, 0))}]
    for p, k in index.items():
        out.append({"policy_id": p, "strength": float(point[k]), "ci_low": float(np.quantile(boots[:, k], 0.025)),
                    "ci_high": float(np.quantile(boots[:, k], 0.975)), "n": int(n_of.get(p, 0))})
    return pd.DataFrame(out).sort_values("strength", ascending=False).reset_index(drop=True)
