"""Agreement and position bias, and Bradley–Terry scores for all policies at once."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import norm

from evalkit.vocab import CONFIDENCE_MIDPOINT

SMALL_N = 20  # judgments: fewer, and a policy gets no rate, model term or strength of its own ("too few judgments")
MIN_SHARED = 5  # shared comparisons: fewer, and a labeler's agreement with the others is not reported


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
    majority on shared pairs (only from MIN_SHARED shared comparisons or more; ``n_shared`` says how many), and
    gold/attention accuracy and failures where the labeler had such tasks (NaN, not 0, where they had none)."""
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
                     "agreement_with_others": agree / total if total >= MIN_SHARED else float("nan"), "n_shared": total,
                     "n_checks": len(checks),  # gold and attention: with none, accuracy and failures are not measured
                     "check_accuracy": float((checks["preferred"] == checks["expected"]).mean()) if len(checks) else float("nan"),
                     "failed_checks": float((checks["preferred"] != checks["expected"]).sum()) if len(checks) else float("nan")})
    return pd.DataFrame(rows)


def _strong_group(d: pd.DataFrame, anchor: str, policies: list[str]) -> set[str]:
    """The policies in ``anchor``'s strongly connected component of the "beat" graph (an edge from each winner to the
    loser it beat): the Bradley–Terry maximum likelihood estimate is finite exactly for them (Zermelo; Ford 1957). A
    policy outside it won, or lost, every comparison that links it to the anchor's group, and its strength runs off to
    ±∞ (a regularised fit returns a large number that means nothing)."""
    index = {p: k for k, p in enumerate(policies)}
    winner = np.where(d["a_won"] == 1, d["a"], d["b"])
    loser = np.where(d["a_won"] == 1, d["b"], d["a"])
    rows, cols = [index[w] for w in winner], [index[ell] for ell in loser]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(policies), len(policies)))
    _, label = connected_components(graph, directed=True, connection="strong")
    return {p for p in policies if label[index[p]] == label[index[anchor]]}


BT_MIN_ESTIMABLE_SHARE = 0.95  # an interval only when the policy is estimable in this share of the resamples


def bradley_terry(tables: dict[str, pd.DataFrame], n_boot: int = 200, rng: np.random.Generator | None = None,
                  anchor: str = "ref") -> pd.DataFrame:
    """Bradley–Terry strengths of every policy from all pairwise judgments (``anchor`` fixed at 0), point estimate from
    the full fit and percentile intervals from an item-level bootstrap.

    Checked before fitting: a policy with fewer than SMALL_N judgments, or outside the anchor's strongly connected
    group of comparisons (:func:`_strong_group`: it won all, or lost all, of the comparisons linking it), is not
    estimable: its row has no strength, the reason in ``estimable``, and its wins and n. Each resample is checked the
    same way; a policy not estimable in a resample has no value there, and its interval is given only when it is
    estimable in at least BT_MIN_ESTIMABLE_SHARE of the resamples (``boot_estimable`` says the share)."""
    import statsmodels.api as sm

    rng = rng if rng is not None else np.random.default_rng(0)
    policy = tables["generations"].set_index("gen_id")["policy_id"]
    df = pairwise_view(tables)
    df = df[~df["role"].isin(["gold", "attention"])].copy()  # planted answers measure labelers, not policies
    df["a"], df["b"] = df["gen_id_left"].map(policy), df["gen_id_right"].map(policy)
    df = df[df["a"] != df["b"]]
    df["a_won"] = (df["preferred_gen_id"] == df["gen_id_left"]).astype(float)
    every = sorted(set(df["a"]) | set(df["b"]))
    if anchor not in every:
        anchor = every[0]
    n_all = pd.concat([df["a"], df["b"]]).value_counts()
    wins_all = pd.concat([df.loc[df["a_won"] == 1, "a"], df.loc[df["a_won"] == 0, "b"]]).value_counts()
    why: dict[str, str] = {p: f"too few judgments ({int(n_all[p])} < {SMALL_N})" for p in every if p != anchor and n_all[p] < SMALL_N}
    keep = [p for p in every if p not in why]
    while True:  # dropping a policy can separate another: repeat until the group is stable
        d = df[df["a"].isin(keep) & df["b"].isin(keep)]
        group = _strong_group(d, anchor, keep)
        if len(group) == len(keep):
            break
        keep = [p for p in keep if p in group]
    for p in every:
        if p in why or p in group:
            continue
        mine = df[((df["a"] == p) & df["b"].isin(group)) | ((df["b"] == p) & df["a"].isin(group))]
        won = int(((mine["a"] == p) & (mine["a_won"] == 1)).sum() + ((mine["b"] == p) & (mine["a_won"] == 0)).sum())
        why[p] = ("never compared with the reference's group" if mine.empty else
                  f"separated: won {won} of its {len(mine)} comparisons with the reference's group")
    others = [p for p in keep if p != anchor]
    index = {p: i for i, p in enumerate(others)}

    def fit(d: pd.DataFrame, columns: dict[str, int]) -> np.ndarray:
        X = _pair_design(d["a"], d["b"], columns)
        return np.asarray(sm.GLM(d["a_won"].to_numpy(), X, family=sm.families.Binomial()).fit().params)

    point = fit(d, index) if others else np.zeros(0)
    items = d["item_id"].unique()
    groups = {i: g for i, g in d.groupby("item_id")}
    boots = np.full((n_boot, len(others)), np.nan)
    for b in range(n_boot if others else 0):
        sample = rng.choice(items, size=len(items), replace=True)
        r = pd.concat([groups[i] for i in sample], ignore_index=True)
        present = sorted(set(r["a"]) | set(r["b"]))
        if anchor not in present:
            continue
        ok = _strong_group(r, anchor, present)
        r = r[r["a"].isin(ok) & r["b"].isin(ok)]
        sub = {p: k for k, p in enumerate(p for p in others if p in ok)}
        if not sub:
            continue
        est = fit(r, sub)
        for p, k in sub.items():
            boots[b, index[p]] = est[k]
    out = [{"policy_id": anchor, "strength": 0.0, "ci_low": 0.0, "ci_high": 0.0, "wins": int(wins_all.get(anchor, 0)),
            "n": int(n_all.get(anchor, 0)), "boot_estimable": 1.0, "estimable": "reference (0 by definition)"}]
    for p, k in index.items():
        col = boots[:, k][np.isfinite(boots[:, k])]
        share = len(col) / n_boot if n_boot else 0.0
        lo, hi = (float(np.quantile(col, 0.025)), float(np.quantile(col, 0.975))) if share >= BT_MIN_ESTIMABLE_SHARE else (np.nan, np.nan)
        out.append({"policy_id": p, "strength": float(point[k]), "ci_low": lo, "ci_high": hi, "wins": int(wins_all.get(p, 0)),
                    "n": int(n_all.get(p, 0)), "boot_estimable": share,
                    "estimable": "yes" if share >= BT_MIN_ESTIMABLE_SHARE else
                    f"point estimate only: separated in {1 - share:.0%} of the resamples"})
    for p, reason in why.items():
        out.append({"policy_id": p, "strength": np.nan, "ci_low": np.nan, "ci_high": np.nan, "wins": int(wins_all.get(p, 0)),
                    "n": int(n_all.get(p, 0)), "boot_estimable": np.nan, "estimable": reason})
    table = pd.DataFrame(out)
    return table.assign(_na=table["strength"].isna()).sort_values(["_na", "strength"], ascending=[True, False]).drop(columns="_na").reset_index(drop=True)


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
    # policies with very few judgments (often won all or none) make the fit singular and say nothing about sides;
    # the naive rate is over the same judgments as the adjusted one, and ``n_left_out`` counts the others
    counts = pd.concat([df["left_policy"], df["right_policy"]]).value_counts()
    rare = set(counts[counts < 10].index)
    n_placed = len(df)
    df = df[~df["left_policy"].isin(rare) & ~df["right_policy"].isin(rare)]
    naive = float(df["left_won"].mean()) if len(df) else float("nan")
    X, _ = _placement_design(df) if len(df) else (np.zeros((0, 0)), [])
    X = np.column_stack([np.ones(len(df)), X])
    if len(df) < 10 or np.linalg.matrix_rank(X) < X.shape[1]:  # e.g. every policy always shown on the same side
        return {"naive_left_rate": naive, "adjusted_left_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "log_odds": float("nan"), "std_err": float("nan"), "n": len(df), "n_clusters": int(df["item_id"].nunique()),
                "n_left_out": n_placed - len(df)}
    groups = df["item_id"].astype("category").cat.codes.to_numpy()
    res = sm.GLM(df["left_won"].to_numpy(), X, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": groups})
    b, se = float(res.params[0]), float(res.bse[0])
    z = norm.ppf(0.5 + level / 2)

    def sig(v: float) -> float:
        return float(1 / (1 + np.exp(-v)))

    return {"naive_left_rate": naive, "adjusted_left_rate": sig(b), "ci_low": sig(b - z * se), "ci_high": sig(b + z * se),
            "log_odds": b, "std_err": se, "n": len(df), "n_clusters": int(df["item_id"].nunique()), "n_left_out": n_placed - len(df)}


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
    """Labeler–labeler agreement two ways, each with a 95% item-clustered bootstrap interval (both from the same
    resamples of posts, whose pairs are not independent):

    - pair-weighted (``agreement``): over every two judgments of one comparison (the same two summaries) by different
      labelers; a comparison judged by k labelers weighs k(k−1)/2;
    - comparison-weighted (``agreement_per_comparison``): each comparison's share of agreeing pairs, averaged over
      comparisons, so a comparison with 11 labelers counts once.

    With ``n_pairs``, ``n_comparisons`` (those judged by two labelers or more) and ``n_items`` (their posts)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    df = pairwise_view(tables)
    per_item = []
    for _, g in df.groupby("item_id"):
        counts = [c for _, p in g.groupby("pair") if (c := _agreeing_pairs(p))[1]]
        if counts:
            per_item.append((sum(a for a, _ in counts), sum(t for _, t in counts), sum(a / t for a, t in counts), len(counts)))
    nan = float("nan")
    if not per_item:
        return {"agreement": nan, "ci_low": nan, "ci_high": nan, "agreement_per_comparison": nan, "comparison_ci_low": nan,
                "comparison_ci_high": nan, "n_pairs": 0, "n_comparisons": 0, "n_items": 0}
    c = np.array(per_item, dtype=float)
    k = len(c)
    w = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)
    by_pair = (w @ c[:, 0]) / np.maximum(w @ c[:, 1], 1)
    by_comparison = (w @ c[:, 2]) / np.maximum(w @ c[:, 3], 1)
    return {"agreement": float(c[:, 0].sum() / c[:, 1].sum()), "ci_low": float(np.quantile(by_pair, 0.025)),
            "ci_high": float(np.quantile(by_pair, 0.975)), "agreement_per_comparison": float(c[:, 2].sum() / c[:, 3].sum()),
            "comparison_ci_low": float(np.quantile(by_comparison, 0.025)), "comparison_ci_high": float(np.quantile(by_comparison, 0.975)),
            "n_pairs": int(c[:, 1].sum()), "n_comparisons": int(c[:, 3].sum()), "n_items": k}


def oriented_by_record(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairwise judgments coded for Krippendorff's alpha on a coding that no renaming of policies or ids can change:
    each comparison (unit ``pair``) is oriented to the order in which its first task recorded the two summaries
    (before any left/right swap): ``first_won`` is 1 when that first-recorded summary won, and ``first_confidence``
    is the 9-point confidence turned so that 1 means "definitely the first-recorded summary"."""
    df = pairwise_view(tables)
    tasks = tables["tasks"]
    swapped = tasks.set_index("task_id")["is_swapped"].astype(bool) if "is_swapped" in tasks else pd.Series(False, index=tasks["task_id"])
    recorded_first = df["gen_id_right"].where(df["task_id"].map(swapped).fillna(False).astype(bool), df["gen_id_left"])
    order = df["task_id"].map({t: k for k, t in enumerate(tasks["task_id"])}).sort_values(kind="stable").index
    first_of_pair = df["pair"].map(recorded_first.loc[order].groupby(df["pair"].loc[order]).first())
    first_shown_left = df["gen_id_left"] == first_of_pair
    conf = df["confidence"].astype(float) if "confidence" in df else pd.Series(np.nan, index=df.index)
    return df.assign(first_won=(df["preferred_gen_id"] == first_of_pair).astype(int),
                     first_confidence=conf.where(first_shown_left, 2 * CONFIDENCE_MIDPOINT - conf))


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
