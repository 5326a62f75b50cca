"""Preference rates and their models: tidy functions, a long DataFrame in and a tidy DataFrame out.

- ``comparisons``: study tables → one row per pairwise judgment of a policy against a baseline (the analysis view).
- ``preference_rates``: fraction preferred per policy with a Wilson interval and an item-clustered bootstrap interval.
- ``size_fit``: the paper's Figure 1 model, a binomial GLM of "policy preferred" on ``policy_kind × log(n_params)``
  with standard errors clustered by item (optionally by item and labeler); ``size_curve`` predicts along the size axis
  with CIs.
- ``length_controlled``: the same with ``log(len_policy / len_baseline)`` added, predicted at log ratio 0 (App. F).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pandas as pd
from scipy.stats import norm

from evalkit import artifacts
from evalkit.analysis.agreement import SMALL_N
from evalkit.analysis.labels import select_labels
from evalkit.data.bundled import gpt2_bpe
from evalkit.errors import EvalkitError

SIZE_FORMULA = "outcome ~ C(policy_kind) * log_n_params"
SIZE_FORMULA_ONE_KIND = "outcome ~ log_n_params"
LENGTH_TERM = "log_len_ratio"
LENGTH_UNIT = "GPT-2 BPE tokens"  # every summary's length: the released policies' own tokens, one unit for all


@functools.lru_cache(maxsize=1)
def _bpe():
    return gpt2_bpe()


def summary_lengths(texts: pd.Series) -> pd.Series:
    """Each summary's length in LENGTH_UNIT (each distinct text encoded once)."""
    texts = texts.fillna("").astype(str)
    distinct = list(texts.unique())
    counts = dict(zip(distinct, (len(e.ids) for e in _bpe().encode_batch(distinct, add_special_tokens=False))))
    return texts.map(counts).astype(float)


def comparisons(tables: dict[str, pd.DataFrame], baseline: str = "ref", labels: str = "") -> pd.DataFrame:
    """One row per pairwise judgment of some policy against ``baseline`` (DESIGN.md's comparisons view), from one
    label set (``evalkit.analysis.labels``: people's by default; a judge's or the simulated panel's never pooled with
    them unless ``labels="all"``)."""
    tasks, gens, items = tables["tasks"], tables["generations"], tables["items"]
    judg = select_labels(tables["judgments"], labels)[0]
    g = gens.set_index("gen_id")
    # gold and attention tasks have a planted answer: they measure labelers, not policies; sentinel pairs recur in
    # every batch to watch for drift and would weigh their policy's items many times over
    measured = tasks[~tasks["role"].isin(["gold", "attention", "sentinel"])]
    df = judg.dropna(subset=["preferred_gen_id"]).merge(measured[["task_id", "item_id", "gen_id_left", "gen_id_right"]], on="task_id")
    left_policy, right_policy = df["gen_id_left"].map(g["policy_id"]), df["gen_id_right"].map(g["policy_id"])
    df = df[(left_policy == baseline) ^ (right_policy == baseline)].copy()
    policy_gen = df["gen_id_left"].where(df["gen_id_right"].map(g["policy_id"]) == baseline, df["gen_id_right"])
    base_gen = df["gen_id_right"].where(policy_gen == df["gen_id_left"], df["gen_id_left"])
    split = items.set_index("item_id")["split"]
    used = pd.unique(pd.concat([policy_gen, base_gen]))
    length = summary_lengths(g.loc[used, "text"]) if len(used) else pd.Series(dtype=float)
    out = pd.DataFrame({
        "item_id": df["item_id"].to_numpy(), "labeler_id": df["labeler_id"].to_numpy(),
        "policy_id": policy_gen.map(g["policy_id"]).to_numpy(), "policy_kind": policy_gen.map(g["policy_kind"]).to_numpy(),
        "n_params": policy_gen.map(g["n_params"]).to_numpy(), "baseline_id": baseline,
        "outcome": (df["preferred_gen_id"] == policy_gen).astype(int).to_numpy(),
        "len_policy": policy_gen.map(length).to_numpy(dtype=float),  # in LENGTH_UNIT
        "len_baseline": base_gen.map(length).to_numpy(dtype=float),
        "dataset": policy_gen.map(g["dataset"]).to_numpy(), "split": df["item_id"].map(split).to_numpy(),
    })
    return artifacts.conform(out, "comparisons")


def require_comparisons(df, where: str) -> None:
    """A clear error when something other than the comparisons frame is passed (e.g. the tables dict)."""
    if isinstance(df, dict):
        raise EvalkitError(f"{where} expects the comparisons DataFrame, got a dict of tables "
                           f"({', '.join(map(str, df))}); pass evalkit.analysis.comparisons(tables) instead")
    if not isinstance(df, pd.DataFrame):
        raise EvalkitError(f"{where} expects the comparisons DataFrame, got {type(df).__name__}")
    missing = [c for c in ("policy_id", "item_id", "outcome") if c not in df.columns]
    if missing:
        raise EvalkitError(f"{where} expects the comparisons DataFrame (evalkit.analysis.comparisons(tables)); "
                           f"this frame has no column {missing[0]!r}")


def wilson(wins: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    z = norm.ppf(0.5 + level / 2)
    wins, n = np.asarray(wins, float), np.asarray(n, float)
    p = np.divide(wins, n, out=np.full_like(wins, np.nan), where=n > 0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def cluster_bootstrap_rates(df: pd.DataFrame, group: str = "policy_id", cluster: str = "item_id", outcome: str = "outcome",
                            n_boot: int = 1000, rng: np.random.Generator | None = None, level: float = 0.95) -> pd.DataFrame:
    """Percentile intervals of each group's mean outcome, resampling clusters (items) with replacement.

    Vectorised: per group, the cluster sums and counts form two vectors, and all replicates are one matrix product
    of multinomial cluster weights with them.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    base = int(rng.integers(2**63))  # each group draws from its own stream: its interval does not depend on the others
    rows = []
    for name, g in df.groupby(group, sort=True):
        sums = g.groupby(cluster)[outcome].agg(["sum", "count"])
        k = len(sums)
        own = np.random.default_rng([base, zlib.crc32(str(name).encode())])
        weights = own.multinomial(k, np.full(k, 1 / k), size=n_boot)
        rates = (weights @ sums["sum"].to_numpy()) / np.maximum(weights @ sums["count"].to_numpy(), 1)
        lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
        rows.append({group: name, "boot_low": float(lo), "boot_high": float(hi), "n_clusters": k})
    return pd.DataFrame(rows)


def preference_rates(df: pd.DataFrame, n_boot: int = 1000, rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Per policy: wins, n, rate, Wilson 95% interval and item-clustered bootstrap 95% interval."""
    require_comparisons(df, "preference_rates")
    if df.empty:
        raise EvalkitError("no comparisons with the baseline to analyse")
    agg = df.groupby("policy_id", sort=True).agg(policy_kind=("policy_kind", "first"), n_params=("n_params", "first"),
                                                 wins=("outcome", "sum"), n=("outcome", "size")).reset_index()
    agg["rate"] = agg["wins"] / agg["n"]
    agg["wilson_low"], agg["wilson_high"] = wilson(agg["wins"].to_numpy(), agg["n"].to_numpy())
    return agg.merge(cluster_bootstrap_rates(df, n_boot=n_boot, rng=rng), on="policy_id")


def _prepare(df: pd.DataFrame, length: bool) -> pd.DataFrame:
    require_comparisons(df, "the size and length models")
    d = df.dropna(subset=["n_params"]).copy()
    if d.empty:
        raise EvalkitError("no comparisons of policies with a known size (n_params)")
    d["log_n_params"] = np.log(d["n_params"].astype(float))
    if length:
        ok = (d["len_policy"] > 0) & (d["len_baseline"] > 0)
        if not ok.all():
            d = d[ok]
        d[LENGTH_TERM] = np.log(d["len_policy"] / d["len_baseline"])
    return d


def _glm(formula: str, d: pd.DataFrame, cluster: str | tuple[str, str]):
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    groups = d[cluster].astype("category").cat.codes.to_numpy() if isinstance(cluster, str) else \
        np.column_stack([d[c].astype("category").cat.codes.to_numpy() for c in cluster])
    model = smf.glm(formula, data=d, family=sm.families.Binomial())
    return model.fit(cov_type="cluster", cov_kwds={"groups": groups})


def size_fit(df: pd.DataFrame, length: bool = False, cluster: str | tuple[str, str] = "item_id"):
    """The binomial GLM of Figure 1 (plus the length term when ``length``); returns the statsmodels result."""
    d = _prepare(df, length)
    kinds = d["policy_kind"].nunique()
    if d["n_params"].nunique() < 2:
        raise EvalkitError("preference vs size needs policies of at least two sizes; this data has one")
    check_sizes_per_kind(d)
    separated = separated_kinds(d)
    if separated:
        raise EvalkitError("preference vs size: " + "; ".join(f"{k} {why}" for k, why in separated.items())
                           + " — the logistic fit has no finite slope there; leave the kind(s) out of the size fit")
    formula = SIZE_FORMULA if kinds > 1 else SIZE_FORMULA_ONE_KIND
    if length:
        formula += f" + {LENGTH_TERM}"
    return _glm(formula, d, cluster)


def size_fit_labeler_effect(df: pd.DataFrame, length: bool = False) -> pd.DataFrame:
    """The size GLM with a labeler random intercept (statsmodels' BinomialBayesMixedGLM, variational Bayes) as
    ``fits`` rows: the fixed effects with their posterior sd and a normal 95% interval, and the labelers' log sd
    (log size centred: the intercepts differ from the GLM's, the slopes compare directly). A check of the
    item-clustered fit: a slope that moves when labelers' leniency is modelled rests on who labelled."""
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    d = _prepare(df, length)
    # log size centred: the slopes are the GLM's, and the mean-field posterior is not squeezed along the
    # intercept–slope ridge that an uncentred term (mean ≈ 20) makes
    d["log_n_params"] -= d["log_n_params"].mean()
    formula = (SIZE_FORMULA if d["policy_kind"].nunique() > 1 else SIZE_FORMULA_ONE_KIND) + (f" + {LENGTH_TERM}" if length else "")
    # a near-flat prior on the fixed effects (statsmodels' default sd 2 would shrink them); the labelers' log sd
    # keeps its default prior
    model = BinomialBayesMixedGLM.from_formula(formula, {"labeler": "0 + C(labeler_id)"}, d, fe_p=100.0)
    res = model.fit_vb()
    names = list(model.exog_names) + ["labeler log sd"]
    mean, sd = np.concatenate([res.fe_mean, res.vcp_mean]), np.concatenate([res.fe_sd, res.vcp_sd])
    z = mean / sd
    out = pd.DataFrame({"analysis": "", "term": names, "estimate": mean, "std_err": sd, "ci_low": mean - 1.96 * sd,
                        "ci_high": mean + 1.96 * sd, "p_value": 2 * norm.sf(np.abs(z)), "n_obs": len(d),
                        "n_clusters": d["labeler_id"].nunique(), "method": "binomial mixed GLM, labeler random intercept (variational Bayes)"})
    return out


def check_sizes_per_kind(d: pd.DataFrame) -> None:
    """Each kind's own size slope needs that kind at two sizes or more; otherwise the GLM is rank-deficient and
    statsmodels returns arbitrary coefficients with NaN standard errors."""
    sizes = d.groupby("policy_kind")["n_params"].nunique()
    one = sorted(sizes[sizes < 2].index)
    if one:
        raise EvalkitError(f"preference vs size: kind(s) {', '.join(one)} are measured at one size only, so their size "
                           "slope is not identified; leave them out (each kind needs two sizes or more)")


def separated_kinds(df: pd.DataFrame) -> dict[str, str]:
    """Kinds whose preference-vs-size fit is not estimated, with the reason: a size with fewer than SMALL_N
    comparisons, or no finite estimate. Each kind has its own intercept and
    slope in log size, so a kind is (quasi-)separated when one size threshold splits its outcomes: every win at or
    above it and every loss at or below it (or the reverse), e.g. 0 wins at the smaller of two sizes. The fitted
    curve then reaches 0 or 1 with an infinite slope, its coefficients run off (e.g. -300 ± 16,000) and its band
    spans 0 to 1."""
    out = {}
    for kind, g in df.dropna(subset=["n_params"]).groupby("policy_kind"):
        if g["n_params"].nunique() < 2:
            continue
        per_size = g.groupby("n_params")["outcome"].size()
        tiny = per_size[per_size < SMALL_N]
        if len(tiny):  # a slope through a handful of judgments: not estimated
            out[kind] = " and ".join(f"has only {int(n)} comparisons at {params:,.0f} parameters (fewer than {SMALL_N})"
                                     for params, n in tiny.items())
            continue
        wins, losses = g.loc[g["outcome"] == 1, "n_params"], g.loc[g["outcome"] == 0, "n_params"]
        if wins.empty or losses.empty:
            out[kind] = f"{'won' if losses.empty else 'lost'} every one of its {len(g)} comparisons"
        elif losses.max() <= wins.min() or wins.max() <= losses.min():
            by_size = g.groupby("n_params")["outcome"].agg(["sum", "size"])
            ends = by_size[(by_size["sum"] == 0) | (by_size["sum"] == by_size["size"])]
            out[kind] = " and ".join(f"won {int(w)} of {int(n)} comparisons at {params:,.0f} parameters" for params, (w, n) in ends.iterrows())
    return out


def fit_table(result, analysis: str, n_clusters: int) -> pd.DataFrame:
    """A statsmodels result as tidy ``fits`` rows."""
    ci = result.conf_int()
    out = pd.DataFrame({"analysis": analysis, "term": result.params.index, "estimate": result.params.to_numpy(),
                        "std_err": result.bse.to_numpy(), "ci_low": ci[0].to_numpy(), "ci_high": ci[1].to_numpy(),
                        "p_value": result.pvalues.to_numpy(), "n_obs": int(result.nobs), "n_clusters": n_clusters,
                        "method": f"binomial GLM, {result.cov_type} SE"})
    return artifacts.conform(out, "fits")


def size_curve(df: pd.DataFrame, length: bool = False, points: int = 25, cluster: str | tuple[str, str] = "item_id") -> pd.DataFrame:
    """Predicted preference vs model size per policy kind with 95% CIs (at log length ratio 0 when ``length``)."""
    result = size_fit(df, length, cluster)
    d = _prepare(df, length)
    rows = []
    for kind, g in d.groupby("policy_kind"):
        grid = np.linspace(g["log_n_params"].min(), g["log_n_params"].max(), points)
        new = pd.DataFrame({"policy_kind": kind, "log_n_params": grid})
        if length:
            new[LENGTH_TERM] = 0.0
        pred = result.get_prediction(new).summary_frame(alpha=0.05)
        rows.append(pd.DataFrame({"policy_kind": kind, "n_params": np.exp(grid), "predicted": pred["mean"].to_numpy(),
                                  "ci_low": pred["mean_ci_lower"].to_numpy(), "ci_high": pred["mean_ci_upper"].to_numpy(),
                                  "length_controlled": length}))
    return pd.concat(rows, ignore_index=True)


EXTRAPOLATION_LOG_RATIO = 0.3  # |mean log length ratio| beyond which "at equal length" is an extrapolation (±35%)


def length_controlled(df: pd.DataFrame, cluster: str | tuple[str, str] = "item_id") -> tuple[pd.DataFrame, object]:
    """Per policy: raw rate (every comparison) and the rate predicted at equal length (log ratio 0), from a GLM with a
    policy term and one length slope shared by all policies, fitted on the comparisons where both summaries are
    non-empty; intervals are Wald on the logit with standard errors clustered by ``cluster``. Returns (the per-policy
    table, the fitted statsmodels result, or None when nothing could be fitted).

    Checked before fitting, per policy: ``estimable`` says "yes" or why not — fewer than SMALL_N non-empty
    comparisons, or separated (won all or none of them); such a policy gets no controlled estimate and is left out of
    the fit (its coefficient would be noise, or run to infinity). Also said per policy: ``n_empty`` (comparisons with
    an empty summary: in the raw rate, outside the length model, whose log ratio is undefined for them);
    ``extrapolated`` (its mean |log length ratio| exceeds 0.3, so "at equal length" lies outside most of its data);
    ``own_slope_rate``, the same prediction from the policy's own length slope (a check of the shared-slope
    assumption; no interval)."""
    require_comparisons(df, "length_controlled")
    full = df.assign(n_params=df["n_params"].fillna(1))
    d = _prepare(full, length=True)
    raw = full.groupby("policy_id")["outcome"].agg(["mean", "size"])
    why = {}
    for policy, g in d.groupby("policy_id"):
        if len(g) < SMALL_N:
            why[policy] = f"too few: {len(g)} comparisons < {SMALL_N}"
        elif g["outcome"].nunique() < 2:
            why[policy] = f"separated: won {int(g['outcome'].sum())} of {len(g)}"
    fit_on = d[~d["policy_id"].isin(why)]
    result = None
    if len(fit_on):
        formula = f"outcome ~ C(policy_id) + {LENGTH_TERM}" if fit_on["policy_id"].nunique() > 1 else f"outcome ~ {LENGTH_TERM}"
        result = _glm(formula, fit_on, cluster)
    rows = []
    for policy, (raw_rate, n_all) in raw.iterrows():
        g = d[d["policy_id"] == policy]
        reason = why.get(policy, "yes" if len(g) else "no comparison with two non-empty summaries")
        est = {"mean": np.nan, "mean_ci_lower": np.nan, "mean_ci_upper": np.nan}
        own = np.nan
        if reason == "yes" and result is not None:
            new = pd.DataFrame({"policy_id": [policy], LENGTH_TERM: [0.0]})
            est = result.get_prediction(new).summary_frame(alpha=0.05).iloc[0]
            if g[LENGTH_TERM].std() > 0:
                own = float(_glm(f"outcome ~ {LENGTH_TERM}", g, cluster).predict(pd.DataFrame({LENGTH_TERM: [0.0]})).iloc[0])
        ratio = float(g[LENGTH_TERM].mean()) if len(g) else np.nan
        rows.append({"policy_id": policy, "raw_rate": float(raw_rate), "controlled_rate": est["mean"],
                     "ci_low": est["mean_ci_lower"], "ci_high": est["mean_ci_upper"], "own_slope_rate": own,
                     "mean_log_len_ratio": ratio, "n": int(n_all), "n_empty": int(n_all - len(g)), "estimable": reason,
                     "separated": reason.startswith("separated"),
                     "extrapolated": bool(np.isfinite(ratio) and abs(ratio) > EXTRAPOLATION_LOG_RATIO)})
    return pd.DataFrame(rows), result


def _batched_logit(X: np.ndarray, wins: np.ndarray, n: np.ndarray, iters: int = 25) -> np.ndarray:
    """Binomial-logit MLEs for many replicates at once: ``X`` (cells × p), ``wins``/``n`` (replicates × cells).

    Newton–Raphson with one (p × p) solve per replicate per iteration, all replicates in one einsum; a tiny ridge keeps
    replicates with a separated cell finite.
    """
    B, p = wins.shape[0], X.shape[1]
    beta = np.zeros((B, p))
    ridge = 1e-8 * np.eye(p)
    for _ in range(iters):
        eta = beta @ X.T
        mu = 1 / (1 + np.exp(-eta))
        grad = (wins - n * mu) @ X
        w = n * mu * (1 - mu)
        hess = np.einsum("bc,ci,cj->bij", w, X, X) + ridge
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def bootstrap_size_fit(df: pd.DataFrame, n_boot: int = 1000, rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Item-clustered bootstrap of the size GLM (no length term), vectorised.

    Every covariate of ``outcome ~ C(policy_kind) * log_n_params`` is constant within a policy, so a replicate's fit
    depends only on each policy's (wins, n): items are resampled with multinomial weights, the per-policy sums of all
    replicates are one matrix product, and all replicates are fitted together by ``_batched_logit``. The point
    estimate is the full-data fit; intervals are percentiles of the replicates.
    """
    import patsy

    rng = rng if rng is not None else np.random.default_rng(0)
    d = _prepare(df, length=False)
    check_sizes_per_kind(d)
    kinds = d["policy_kind"].nunique()
    formula = (SIZE_FORMULA if kinds > 1 else SIZE_FORMULA_ONE_KIND).split("~", 1)[1]
    cells = d.groupby("policy_id").agg(policy_kind=("policy_kind", "first"), log_n_params=("log_n_params", "first")).reset_index()
    X = patsy.dmatrix(formula, cells, return_type="dataframe")
    # item × policy tables of wins and counts
    items = d["item_id"].astype("category")
    pol = pd.Categorical(d["policy_id"], categories=cells["policy_id"])
    n_items, n_cells = len(items.cat.categories), len(cells)
    wins_tab = np.zeros((n_items, n_cells))
    n_tab = np.zeros((n_items, n_cells))
    np.add.at(wins_tab, (items.cat.codes.to_numpy(), pol.codes), d["outcome"].to_numpy())
    np.add.at(n_tab, (items.cat.codes.to_numpy(), pol.codes), 1)
    weights = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=n_boot).astype(float)
    boot = _batched_logit(X.to_numpy(), weights @ wins_tab, weights @ n_tab)
    point = _batched_logit(X.to_numpy(), wins_tab.sum(0)[None], n_tab.sum(0)[None])[0]
    return pd.DataFrame({"term": X.columns, "estimate": point, "boot_low": np.quantile(boot, 0.025, axis=0),
                         "boot_high": np.quantile(boot, 0.975, axis=0), "boot_se": boot.std(axis=0, ddof=1)})
