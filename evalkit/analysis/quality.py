"""Labeler quality, as the paper monitored it: per labeler, gold accuracy, attention checks, agreement with the other
labelers and with the researcher, seconds per task and side preference; a flag for every rule of ``[quality]``
crossed; and exclusions by the study's rules.

An excluded labeler's judgments stay in ``judgments.parquet`` (``evalkit study collect`` writes the reason in its
``excluded`` column); every analysis of the report leaves them out unless ``--include-excluded`` re-admits them.
The rules are applied to people's labels only (``human``, ``imported``): a simulated panel or a judge is measured
against people elsewhere, never excluded by rules meant for people. Pairwise judgments only.
"""

from __future__ import annotations

import math

import pandas as pd

from evalkit.analysis.agreement import pair_key, pairwise_view, per_labeler
from evalkit.analysis.preference import comparisons, wilson
from evalkit.config import QualityConfig
from evalkit.vocab import PEOPLE_KINDS

SIDE_MIN_ANSWERS = 20  # answers before a side preference can be flagged
RESEARCHER_COLUMNS = ("item_id", "pair", "preferred_gen_id", "note")


def researcher_pairs(tasks: pd.DataFrame, rule: str) -> pd.DataFrame:
    """The comparisons a researcher labels under ``rule`` (overlap: those given to two or more labelers; checks:
    gold and attention; all): one row each, in the order first shown, with ``pair`` as ``pairwise_view`` names it."""
    t = tasks[tasks["kind"] == "pairwise"].copy()
    t["pair"] = [pair_key(a, b) for a, b in zip(t["gen_id_left"], t["gen_id_right"])]
    if rule == "overlap":
        t = t[t["role"] == "overlap"]
    elif rule == "checks":
        t = t[t["role"].isin(["gold", "attention"])]
    return t.drop_duplicates(["item_id", "pair"]).reset_index(drop=True)


def labeler_quality(tables: dict[str, pd.DataFrame], rules: QualityConfig, researcher: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per labeler with pairwise judgments: ``n``, ``median_seconds``, ``gold_accuracy`` (``n_gold``),
    ``attention_failures`` (``n_attention``), ``agreement_with_others`` (``n_shared``: pairs where the other labelers'
    majority is not tied), ``agreement_with_researcher`` (``n_researcher``), ``left_rate``, ``flags`` (every rule
    crossed, "; "-joined) and ``excluded`` (the exclusion rules crossed, people only; "" when none). A value with
    nothing to measure it on is NaN, never 0."""
    df = pairwise_view(tables)
    if df.empty:
        return pd.DataFrame(columns=["labeler_id", "n", "flags", "excluded"])
    base = per_labeler(tables).set_index("labeler_id")
    kinds = tables["judgments"].groupby("labeler_id")["labeler_kind"].first()
    if researcher is not None and len(researcher):
        truth = researcher.drop_duplicates(["item_id", "pair"]).set_index(["item_id", "pair"])["preferred_gen_id"]
        df["researcher"] = [truth.get((i, p)) for i, p in zip(df["item_id"], df["pair"])]
    else:
        df["researcher"] = None
    rows = []
    for labeler, g in df.groupby("labeler_id"):
        gold, attention = g[g["role"] == "gold"], g[g["role"] == "attention"]
        shared = g[g["researcher"].notna()]
        durations = g["duration_s"].dropna() if "duration_s" in g else pd.Series(dtype=float)
        row = {"labeler_id": labeler, "labeler_kind": kinds.get(labeler, ""), "n": len(g),
               "median_seconds": float(durations.median()) if len(durations) else math.nan,
               "gold_accuracy": float((gold["preferred"] == gold["expected"]).mean()) if len(gold) else math.nan,
               "n_gold": len(gold),
               "attention_failures": int((attention["preferred"] != attention["expected"]).sum()) if len(attention) else math.nan,
               "n_attention": len(attention),
               "agreement_with_others": base.loc[labeler, "agreement_with_others"], "n_shared": int(base.loc[labeler, "n_shared"]),
               "agreement_with_researcher": float((shared["preferred_gen_id"] == shared["researcher"]).mean()) if len(shared) else math.nan,
               "n_researcher": len(shared), "left_rate": float((g["preferred"] == "left").mean())}
        excluded = _exclusion_reasons(row, rules) if row["labeler_kind"] in PEOPLE_KINDS else []
        row["flags"] = "; ".join(excluded + _flag_reasons(row, rules))
        row["excluded"] = "; ".join(excluded)
        rows.append(row)
    return pd.DataFrame(rows)


def _exclusion_reasons(row: dict, rules: QualityConfig) -> list[str]:
    out = []
    if row["n_gold"] >= rules.min_checks and row["gold_accuracy"] < rules.min_gold_accuracy:
        out.append(f"gold accuracy {row['gold_accuracy']:.2f} < {rules.min_gold_accuracy:g} on {row['n_gold']} gold tasks")
    if rules.max_attention_failures and row["n_attention"] and row["attention_failures"] >= rules.max_attention_failures:
        out.append(f"{row['attention_failures']} failed attention checks (limit {rules.max_attention_failures})")
    return out


def _flag_reasons(row: dict, rules: QualityConfig) -> list[str]:
    out = []
    if rules.min_median_seconds and row["median_seconds"] < rules.min_median_seconds:
        out.append(f"median {row['median_seconds']:.1f} s per task < {rules.min_median_seconds:g} s")
    side = max(row["left_rate"], 1 - row["left_rate"])
    if row["n"] >= SIDE_MIN_ANSWERS and side > rules.max_side_rate:
        out.append(f"chooses the {'left' if row['left_rate'] >= 0.5 else 'right'} summary {side:.0%} of the time")
    if rules.min_researcher_agreement and row["n_researcher"] and row["agreement_with_researcher"] < rules.min_researcher_agreement:
        out.append(f"agrees with the researcher {row['agreement_with_researcher']:.0%} < {rules.min_researcher_agreement:.0%}")
    return out


def exclusions(tables: dict[str, pd.DataFrame], rules: QualityConfig) -> dict[str, str]:
    """Each excluded labeler's reason, by the study's rules (people's labels only)."""
    q = labeler_quality(tables, rules)
    return dict(zip(q["labeler_id"], q["excluded"])) if len(q) else {}


def excluded_reasons(tables: dict[str, pd.DataFrame], rules: QualityConfig) -> pd.Series:
    """Per judgment (aligned with ``tables["judgments"]``): its labeler's exclusion reason, None when admitted."""
    reasons = {k: v for k, v in exclusions(tables, rules).items() if v}
    return tables["judgments"]["labeler_id"].map(reasons).where(lambda s: s.notna(), None)


def drop_excluded(tables: dict[str, pd.DataFrame], rules: QualityConfig) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The tables without the excluded labelers' judgments, and a table of who was left out (labeler, reason,
    judgments)."""
    reasons = excluded_reasons(tables, rules)
    judgments = tables["judgments"]
    out = judgments[reasons.isna().to_numpy()]
    left = judgments[reasons.notna().to_numpy()].assign(reason=reasons[reasons.notna()].to_numpy())
    summary = left.groupby(["labeler_id", "reason"]).size().rename("judgments").reset_index() if len(left) else \
        pd.DataFrame(columns=["labeler_id", "reason", "judgments"])
    return {**tables, "judgments": out}, summary


def running_rates(tables: dict[str, pd.DataFrame], baseline: str) -> pd.DataFrame:
    """Per policy: its comparisons with ``baseline`` so far (``preference.comparisons``: checks and sentinels left
    out), wins, the rate and its Wilson 95% interval — the researcher's running view."""
    df = comparisons(tables, baseline)
    if df.empty:
        return pd.DataFrame(columns=["policy_id", "n", "wins", "rate", "wilson_low", "wilson_high"])
    g = df.groupby("policy_id")["outcome"].agg(["size", "sum"]).rename(columns={"size": "n", "sum": "wins"}).reset_index()
    lo, hi = wilson(g["wins"].to_numpy(), g["n"].to_numpy())
    return g.assign(rate=g["wins"] / g["n"], wilson_low=lo, wilson_high=hi)
