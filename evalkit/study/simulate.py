"""A simulated labeler panel for dry runs and power analysis, built on a validated judge; every judgment it makes is
``labeler_kind="simulated"`` and names its judge.

The model: a judge (``evalkit.judges``: ``features`` by default, or ``rm:<folder>``/``llm:<folder>``, chosen in
``[labelers] judge``) gives P_J(left) for a pair, both orders averaged. Simulated labeler ℓ on a pair of dataset d
prefers the left summary with probability
    σ(b + τ_d · s_ℓ · logit P_J(left))
- ``b``: the real labelers' position bias, the log-odds of choosing the left summary over every released judgment;
- ``s_ℓ`` = exp(N(0, 0.3²)), drawn once per labeler: some labelers are sharper than others;
- ``τ_d``: the labeler noise, calibrated per dataset so that two simulated labelers agree on a released comparison as
  often as two real labelers do (pair-weighted, over the released comparisons labelled two or more times: ≈72% TL;DR,
  ≈79% CNN/DM). The calibration reads one number per dataset from the human labels (that agreement) and the order
  each comparison was shown in, none of their choices.
logit P_J is clipped to ±8 (a judge's certainty of 0 or 1, e.g. ``length``, stays finite). The panel's evaluator row
(``panel_row``) measures it against real labels as ``evalkit judge validate`` measures a judge, and the report shows it
under Figure 1. The reported confidence on the 9-point scale follows |P − ½|: 1/9 when P is extreme, 4/6 near ½.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from evalkit import artifacts
from evalkit.analysis.agreement import cohen_kappa
from evalkit.analysis.labels import PANEL_SOURCE
from evalkit.errors import EvalkitError
from evalkit.judges import Judge, judge_probabilities, leave_one_out, orient, pair_agreement, prefers_longer_rate, released_comparisons
from evalkit.seeds import rng_for, stable_hash
from evalkit.study.judged import pairwise_judgment, task_pairs

LABELER_SCALE_SD = 0.3  # sd of log(s_ℓ) across simulated labelers
MAX_LOGIT = 8.0
TAU_RANGE = (0.01, 50.0)
PANEL_VALIDATION = "panel_validation.csv"  # in the study folder: the panel's evaluator table, made with its labels
CALIBRATION_COMPARISONS = 300  # per dataset: the released comparisons the judge scores to calibrate τ
_SCALES = np.exp(LABELER_SCALE_SD * norm.ppf((np.arange(9) + 0.5) / 9))  # labeler sharpness at 9 quantiles


@dataclass
class Panel:
    judge_id: str
    position_bias: float  # b: log-odds of choosing the left summary, all else equal
    temperature: dict[str, float]  # τ per dataset
    labeler_scale_sd: float = LABELER_SCALE_SD
    calibration: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return artifacts.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Panel":
        return cls(**json.loads(Path(path).read_text()))

    def tau(self, dataset: str) -> float:
        if dataset not in self.temperature:
            raise EvalkitError(f"the simulated panel is calibrated for {', '.join(sorted(self.temperature))}, not dataset {dataset!r}")
        return self.temperature[dataset]


def judge_logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    return np.clip(np.log(p) - np.log1p(-p), -MAX_LOGIT, MAX_LOGIT)


def simulated_agreement(rows: pd.DataFrame, tau: float, position_bias: float) -> float:
    """Expected pair-weighted agreement of simulated labelers in place of the real ones: ``rows`` one per real label
    (``comparison``, ``logit`` of the judge for the comparison's first summary, ``shown_first`` 1 when that summary
    was shown on the left); each simulated labeler's sharpness independent (averaged over its distribution)."""
    sign = np.where(rows["shown_first"].to_numpy() == 1, 1.0, -1.0)
    z = sign[:, None] * position_bias + tau * np.outer(rows["logit"].to_numpy(), _SCALES)
    m = pd.Series((1 / (1 + np.exp(-z))).mean(1), index=rows.index)
    g = pd.DataFrame({"c": rows["comparison"], "m": m, "m2": m ** 2, "n": 1.0, "w": 1 - m, "w2": (1 - m) ** 2}).groupby("c").sum()
    agree = ((g["m"] ** 2 - g["m2"]) + (g["w"] ** 2 - g["w2"])) / 2
    pairs = g["n"] * (g["n"] - 1) / 2
    return float(agree.sum() / pairs.sum())


def _solve_tau(rows: pd.DataFrame, position_bias: float, target: float) -> tuple[float, float]:
    """τ with expected simulated agreement = ``target`` (bisection on log τ; agreement rises with τ), and the agreement reached."""
    def agree(t):
        return simulated_agreement(rows, t, position_bias)

    lo, hi = TAU_RANGE
    if agree(hi) < target:
        return hi, agree(hi)
    if agree(lo) > target:
        return lo, agree(lo)
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if agree(mid) < target else (lo, mid)
    tau = math.sqrt(lo * hi)
    return tau, agree(tau)


def calibrate(judge: Judge, seed: int = 0, per_dataset: int = CALIBRATION_COMPARISONS) -> Panel:
    """The panel on ``judge``: b from every released judgment's left rate; τ per dataset so that simulated labelers in
    place of the real ones on the released comparisons labelled two or more times (up to ``per_dataset`` of them,
    seeded; each label in the order it was shown) agree, in expectation, as often as the real labelers did there."""
    shown = released_comparisons(split=None)
    left_rate = float(shown["left_won"].mean())
    b = float(math.log(left_rate / (1 - left_rate)))
    every = orient(shown).assign(shown_first=(shown["gen_id_left"] <= shown["gen_id_right"]).astype(int).to_numpy())
    temperature, cal = {}, {"judge": judge.judge_id, "left_rate": left_rate, "n_judgments": len(every)}
    for dataset, g in every.groupby("dataset"):
        counts = g["comparison"].value_counts()
        multi = counts.index[counts >= 2]
        if per_dataset and len(multi) > per_dataset:
            multi = pd.Series(multi).sample(per_dataset, random_state=seed)
        rows = g[g["comparison"].isin(set(multi))]
        human, n_pairs = pair_agreement(rows["comparison"], rows["left_won"])
        unique = rows.drop_duplicates("comparison")
        logit = pd.Series(judge_logits(judge_probabilities(judge, unique)), index=unique["comparison"].to_numpy())
        rows = rows.assign(logit=rows["comparison"].map(logit))
        tau, reached = _solve_tau(rows, b, human)
        temperature[dataset] = tau
        cal[dataset] = {"human_pair_agreement": human, "n_human_pairs": n_pairs, "simulated_pair_agreement": reached,
                        "n_calibration_comparisons": len(unique), "tau": tau, "reached": bool(abs(reached - human) < 0.005)}
    return Panel(judge.judge_id, b, temperature, calibration=cal)


def panel_summary(panel: Panel) -> str:
    """One line: the judge, and per dataset the labeler–labeler agreement the noise was set to and reached."""
    cal = panel.calibration
    parts = [f"{ds}: simulated labeler–labeler agreement {c['simulated_pair_agreement']:.1%} vs real {c['human_pair_agreement']:.1%} "
             f"(τ {c['tau']:.2f})" for ds, c in sorted(cal.items()) if isinstance(c, dict)]
    return f"panel on judge {panel.judge_id}; position bias {panel.position_bias:+.3f} log-odds; " + "; ".join(parts)


def labeler_scale(panel: Panel, seed: int, labeler_id: str) -> float:
    return float(np.exp(rng_for("panel-labeler", seed, labeler_id).normal(0, panel.labeler_scale_sd)))


def p_left(panel: Panel, logit: float, dataset: str, scale: float) -> float:
    return 1 / (1 + math.exp(-(panel.position_bias + panel.tau(dataset) * scale * logit)))


# ---------------------------------------------------------------------------------------------------------- panel

def simulate_judgments(panel: Panel, judge: Judge, tables: dict[str, pd.DataFrame], seed: int = 0) -> pd.DataFrame:
    """Judgments for every pairwise task of a built study, each made by the simulated labeler it is assigned to."""
    tasks = tables["tasks"]
    pair_tasks = tasks[tasks["kind"] == "pairwise"]
    if pair_tasks.empty:
        raise EvalkitError("the simulated panel answers pairwise tasks only; this study has none")
    items = tables["items"].set_index("item_id")
    shown = pair_tasks.drop_duplicates(["item_id", "gen_id_left", "gen_id_right"])
    logit = dict(zip(zip(shown["item_id"], shown["gen_id_left"], shown["gen_id_right"]),
                     judge_logits(judge_probabilities(judge, task_pairs(tables, shown)))))
    rows = []
    for t in pair_tasks.itertuples():
        p = p_left(panel, logit[(t.item_id, t.gen_id_left, t.gen_id_right)], items.loc[t.item_id, "dataset"], labeler_scale(panel, seed, t.labeler_id))
        left = bool(rng_for("panel-judgment", seed, t.task_id).random() < p)
        rows.append(pairwise_judgment(t, left, p, "j-sim-" + stable_hash(t.task_id, seed), t.labeler_id, "simulated",
                                      f"simulated on {panel.judge_id}: P(left)={p:.3f}", f"{PANEL_SOURCE}:{panel.judge_id}"))
    return artifacts.conform(pd.DataFrame(rows), "judgments")


def panel_row(panel: Panel, judge: Judge, pairs: pd.DataFrame, gpt4: pd.DataFrame | None = None, seed: int = 0) -> dict:
    """The panel's evaluator-table row on held-out released comparisons: each human label replaced by one simulated
    labeler's (a labeler per human labeler id), scored as ``judges.evaluate`` scores the human row; its
    labeler–labeler agreement (two simulated labelers per comparison); kappa against GPT-4 of its majority of three."""
    unique = pairs.drop_duplicates("comparison")
    logit = pd.Series(judge_logits(judge_probabilities(judge, unique)), index=unique["comparison"].to_numpy())
    first_left = pd.Series(unique["gen_id_left"].to_numpy(), index=unique["comparison"].to_numpy())
    as_first = (pairs["gen_id_left"] == pairs["comparison"].map(first_left)).to_numpy()
    lg = np.where(as_first, 1, -1) * pairs["comparison"].map(logit).to_numpy()  # the judge's logit for the left summary as shown

    def draw(labelers, stream):
        p = [p_left(panel, x, ds, labeler_scale(panel, seed, lab)) for x, ds, lab in zip(lg, pairs["dataset"], labelers)]
        return np.array([int(rng_for(stream, seed, i).random() < q) for i, q in enumerate(p)])

    df = pairs.assign(sim_label=draw(pairs["labeler_id"], "panel-validate"))
    position = float(df["sim_label"].mean())
    df = orient(df)
    row = {"judge": f"panel:{panel.judge_id}", "n_judgments": len(df), "n_comparisons": int(df["comparison"].nunique()),
           "position_bias": position, "agreement_with_labels": float((df["sim_label"] == df["left_won"]).mean())}
    row["human_agreement"], row["n_loo"] = leave_one_out(df["comparison"], df["left_won"], df["sim_label"].to_numpy())
    for key, g in [*df.groupby("batch"), *df.groupby("dataset")]:
        row[f"loo_{key}"] = leave_one_out(g["comparison"], g["left_won"], g["sim_label"].to_numpy())[0]
        row[f"labels_{key}"] = float((g["sim_label"] == g["left_won"]).mean())
    for key, g in df.groupby("dataset"):  # the panel's labeler–labeler agreement, on the comparisons the humans' is
        row[f"pair_agreement_{key}"], row[f"n_pairs_{key}"] = pair_agreement(g["comparison"], g["sim_label"])
    row["prefers_longer"] = prefers_longer_rate(df["left"], df["right"], df["sim_label"].to_numpy())
    if gpt4 is not None and len(gpt4):
        g_logit = judge_logits(judge_probabilities(judge, gpt4))
        votes = sum(np.array([int(rng_for("panel-gpt4", seed, k, i).random() < p_left(panel, x, "tldr", labeler_scale(panel, seed, f"gpt4-{k}")))
                              for i, x in enumerate(g_logit)]) for k in range(3))
        k = cohen_kappa((votes >= 2).astype(int), gpt4["left_won"].to_numpy(), clusters=gpt4["item_id"].to_numpy(), n_boot=500,
                        rng=np.random.default_rng(0))
        row["kappa_gpt4"], row["kappa_gpt4_low"], row["kappa_gpt4_high"], row["n_gpt4"] = k["kappa"], k["ci_low"], k["ci_high"], len(gpt4)
    return row


def required_judgments(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8, design_effect: float = 1.0) -> int:
    """Judgments per policy to tell preference rates p1 and p2 apart (two-sided two-proportion z-test), inflated by a
    design effect for clustering (1 + (m − 1)·ICC for m judgments per item)."""
    if not (0 < p1 < 1 and 0 < p2 < 1) or p1 == p2:
        raise EvalkitError(f"need two different rates in (0, 1), got {p1} and {p2}")
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    p_bar = (p1 + p2) / 2
    n = (z_a * math.sqrt(2 * p_bar * (1 - p_bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / (p1 - p2) ** 2
    return int(math.ceil(n * design_effect))
