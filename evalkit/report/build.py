"""``evalkit report``: a study's tables → ``reports/<id>/`` with report.md, a self-contained report.html (figures
embedded), every figure as PNG and SVG, ``fits.parquet`` and ``manifest.json``.

Every figure has labelled axes, 95% intervals and n, and says whose labels it shows (human, imported, simulated or
LLM judge). Where an analysis cannot run (one model size only, no overlapping judgments, no reference), the report
says so in words instead of failing or printing NaN.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evalkit import artifacts  # noqa: E402
from evalkit.analysis.agreement import MIN_SHARED, SMALL_N, agreement_with_ci, bradley_terry, cohen_kappa, labeler_position, oriented_by_record, pairwise_view, per_labeler, position_effect  # noqa: E402
from evalkit.analysis.labels import SIMULATED, describe, machine_sets, select_labels, set_judgments  # noqa: E402
from evalkit.analysis.likert import krippendorff_alpha, krippendorff_alpha_ci, length_adjusted_means, likert_means, likert_view  # noqa: E402
from evalkit.analysis.preference import (  # noqa: E402
    EXTRAPOLATION_LOG_RATIO,
    LENGTH_UNIT,
    comparisons,
    fit_table,
    length_controlled,
    preference_rates,
    separated_kinds,
    size_curve,
    size_fit,
    size_fit_labeler_effect,
)
from evalkit.analysis.quality import drop_excluded  # noqa: E402
from evalkit.analysis.rm_eval import kl_vs_preference, rm_accuracy_by_size
from evalkit.config import QualityConfig  # noqa: E402
from evalkit.data.tldr import OPENAI_PPO_POLICY, load_llm_judgments
from evalkit.errors import EvalkitError  # noqa: E402
from evalkit.judges import LONGER_BY_CHARS  # noqa: E402
from evalkit.seeds import rng_for  # noqa: E402

log = logging.getLogger(__name__)

KIND_LABELS = {"pretrained": "pretrained", "sft": "SFT", "ppo": "PPO (RLHF)", "best_of_n": "best-of-N",
               "external": "external", "ref": "reference", "lead3": "lead-3"}

INTERVAL_COLUMN = re.compile(r"(^|_)(low|high)$")
BOOT = "item-clustered bootstrap percentile ({n} replicates; clusters: posts)"
WALD = "cluster-robust Wald on the logit (clusters: posts)"


class Report:
    def __init__(self, out_dir: Path, title: str):
        self.out_dir = out_dir
        self.title = title
        self.md: list[str] = [f"# {title}\n"]
        self.html: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        self.fits: list[pd.DataFrame] = []
        self.figures: list[str] = []

    def text(self, md: str) -> None:
        self.md.append(md + "\n")
        self.html.append("<p>" + html.escape(md) + "</p>")

    def bullets(self, lines: list[str]) -> None:
        self.md.append("\n".join(f"- {line}" for line in lines) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")

    def heading(self, text: str) -> None:
        self.md.append(f"## {text}\n")
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def table(self, df: pd.DataFrame, floatfmt: str = "{:.3f}", intervals: str = "") -> None:
        """A table; one with interval columns (``*_low``/``*_high``) must name their method and clusters in
        ``intervals``, written under it."""
        bounds = [c for c in df.columns if INTERVAL_COLUMN.search(str(c))]
        if bounds and not intervals:
            raise ValueError(f"table with interval columns {bounds} but no method named for them")
        shown = df.copy()
        for c in shown.columns:
            if pd.api.types.is_float_dtype(shown[c]):
                shown[c] = shown[c].map(lambda v: "—" if pd.isna(v) else floatfmt.format(v))
        header = "| " + " | ".join(map(str, shown.columns)) + " |"
        lines = [header, "|" + "---|" * len(shown.columns)] + ["| " + " | ".join(map(str, r)) + " |" for r in shown.itertuples(index=False)]
        self.md.append("\n".join(lines) + "\n")
        self.html.append(shown.to_html(index=False, escape=True, border=0, classes="t"))
        if intervals:
            self.text(f"Intervals (95%): {intervals}.")

    def figure(self, fig, name: str, caption: str) -> None:
        png, svg = self.out_dir / f"{name}.png", self.out_dir / f"{name}.svg"
        fig.savefig(png, dpi=120, bbox_inches="tight")
        fig.savefig(svg, bbox_inches="tight")
        plt.close(fig)
        self.figures.append(name)
        self.md.append(f"![{caption}]({name}.png)\n\n*{caption}*\n")
        data = base64.b64encode(png.read_bytes()).decode()
        self.html.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def write(self, manifest: dict) -> dict[str, Path]:
        md = self.out_dir / "report.md"
        page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(self.title) + "</title><style>"
                "body{font-family:sans-serif;max-width:64rem;margin:1rem auto;padding:0 1rem}table.t{border-collapse:collapse}"
                "table.t td,table.t th{padding:.2rem .6rem;border-bottom:1px solid #ddd}img{max-width:100%}</style></head><body>"
                + "\n".join(self.html) + "</body></html>")
        md.write_text("\n".join(self.md), encoding="utf-8")
        (self.out_dir / "report.html").write_text(page, encoding="utf-8")
        fits = pd.concat(self.fits, ignore_index=True) if self.fits else artifacts.empty_table("fits")
        artifacts.write_table(fits, self.out_dir / "fits.parquet", "fits")
        artifacts.write_manifest(self.out_dir, manifest)
        return {"md": md, "html": self.out_dir / "report.html", "fits": self.out_dir / "fits.parquet"}


def _rates_figure(rates: pd.DataFrame, dataset: str, baseline: str, source: str):
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rates) + 1.5))
    y = np.arange(len(rates))
    # item-clustered bootstrap intervals (judgments of one item are not independent); clipped at 0 for rounding
    ax.errorbar(rates["rate"], y, xerr=[np.maximum(rates["rate"] - rates["boot_low"], 0), np.maximum(rates["boot_high"] - rates["rate"], 0)],
                fmt="o", capsize=3)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, [f"{p} (n={n}, {c} items)" for p, n, c in zip(rates["policy"], rates["n"], rates["n_clusters"])])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction preferred to {baseline} (95% item-clustered bootstrap interval)")
    ax.set_title(f"{dataset}: preferred to {baseline} — {source}", fontsize=10)
    return fig


FAMILY_SEP = " · "  # a size fit's group: the kind within one model family
MARKERS = "osD^vP*X"


def group_label(group: str) -> str:
    """"PPO (RLHF), SmolLM2-135M-Instruct" for the fit group "ppo · SmolLM2-135M-Instruct"."""
    kind, _, family = group.partition(FAMILY_SEP)
    return KIND_LABELS.get(kind, kind) + (f", {family}" if family else "")


def fit_groups(d: pd.DataFrame) -> pd.DataFrame:
    """``d`` with each policy's kind qualified by its model family (column ``family``, "" when unknown): the unit a size
    fit may describe. A curve from one family's small model to another family's large one describes no model."""
    fam = d["family"].fillna("") if "family" in d else pd.Series("", index=d.index)
    return d.assign(policy_kind=np.where(fam != "", d["policy_kind"] + FAMILY_SEP + fam, d["policy_kind"]))


def _size_figure(raw: pd.DataFrame | None, controlled: pd.DataFrame | None, points: pd.DataFrame, dataset: str, source: str):
    """Fitted curves (raw solid, at equal length dashed, 95% bands) for the fit groups in ``raw``; the observed rate of
    every policy in ``points`` with its 95% interval, coloured by kind and marked by family (a group without a curve
    has one size or no finite fit: dots only)."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    points = points.dropna(subset=["n_params"])
    fitted = set(raw["policy_kind"]) if raw is not None else set()
    kinds = sorted(points["policy_kind"].unique(), key=lambda k: (list(KIND_LABELS).index(k) if k in KIND_LABELS else 99, k))
    families = sorted(points["family"].fillna("").unique()) if "family" in points else [""]
    labelled: list[tuple[float, float]] = []
    for group, p in points.groupby(fit_groups(points)["policy_kind"]):
        kind, family = p["policy_kind"].iloc[0], (p["family"].fillna("").iloc[0] if "family" in p else "")
        color, marker = f"C{kinds.index(kind)}", MARKERS[families.index(family) % len(MARKERS)]
        name = group_label(group)
        if group in fitted:
            g = raw[raw["policy_kind"] == group]
            ax.plot(g["n_params"], g["predicted"], color=color, label=f"{name} (raw fit)")
            ax.fill_between(g["n_params"], g["ci_low"], g["ci_high"], alpha=0.15, color=color)
            if controlled is not None:
                c = controlled[controlled["policy_kind"] == group]
                ax.plot(c["n_params"], c["predicted"], ls="--", color=color, label=f"{name} (length-controlled fit)")
        if {"boot_low", "boot_high"} <= set(p.columns):
            ax.errorbar(p["n_params"], p["rate"], yerr=[np.maximum(p["rate"] - p["boot_low"], 0), np.maximum(p["boot_high"] - p["rate"], 0)],
                        fmt="none", ecolor=color, alpha=0.5, capsize=2)
        ax.scatter(p["n_params"], p["rate"], color=color, marker=marker, s=12 + p["n"] / 4,
                   label=None if group in fitted else f"{name} (observed)")
        for r in p.itertuples():  # dots of several kinds at one size and rate: their labels stack, not overprint
            stacked = sum(1 for x, y in labelled if x == r.n_params and abs(y - r.rate) < 0.04)
            labelled.append((r.n_params, r.rate))
            ax.annotate(f"n={r.n}", (r.n_params, r.rate), fontsize=7, xytext=(4, -10 + 8 * stacked), textcoords="offset points",
                        color=color if stacked else "black")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("model size (parameters)")
    ax.set_ylabel("fraction preferred to the reference")
    ax.set_ylim(0, 1)
    ax.set_title(f"{dataset}: preference vs size (95% CI, item-clustered SE), n={int(points['n'].sum())} — {source}", fontsize=10)
    ax.legend(fontsize=8, title="dots: observed rate per policy (area ∝ n)", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return fig


def params_label(n: float | None) -> str:
    """1.3B, 135M, 6.1M."""
    if n is None or pd.isna(n) or not np.isfinite(float(n)):
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.3g}{unit}"
    return f"{int(n)}"


def _size_kinds(d: pd.DataFrame) -> tuple[list[str], list[str], dict[str, str]]:
    """For a size fit: the kinds measured at two sizes or more, those at one size (no slope to identify), and those of
    the former with no finite fit (:func:`separated_kinds`, on every comparison or on those with both summaries
    non-empty, which the length-controlled fit uses), with why."""
    sizes = d.dropna(subset=["n_params"]).groupby("policy_kind")["n_params"].nunique()
    multi = d[d["policy_kind"].isin(sizes[sizes >= 2].index)]
    separated = separated_kinds(multi)
    nonempty = multi[(multi["len_policy"] > 0) & (multi["len_baseline"] > 0)]
    separated.update({k: f"{why} with both summaries non-empty" for k, why in separated_kinds(nonempty).items() if k not in separated})
    return sorted(sizes[sizes >= 2].index), sorted(sizes[sizes < 2].index), separated


def _size_curves(ds: pd.DataFrame, separated: dict[str, str]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Raw and length-controlled size curves of the kinds with a finite fit (None where there is nothing to fit)."""
    fit = ds[~ds["policy_kind"].isin(separated)]
    if fit.empty:
        return None, None
    has_len = bool(((fit["len_policy"] > 0) & (fit["len_baseline"] > 0)).any())
    return size_curve(fit), (size_curve(fit, length=True) if has_len else None)


def _separated_text(separated: dict[str, str]) -> str:
    return ("No fitted curve for " + "; ".join(f"{KIND_LABELS.get(k, k)}: it {why}" for k, why in separated.items())
            + f". A kind gets no curve when one size splits its wins from its losses (none won below it, none lost above "
            f"it, or the reverse: its logistic fit has no finite slope) or when a size has fewer than {SMALL_N} "
            "comparisons; its dots are the observed rates.")


def _headline(rep: "Report", d: pd.DataFrame, rates: pd.DataFrame, dataset: str, baseline: str, source: str) -> list[dict]:
    """The paper's Figure 1 first: fraction preferred to the baseline vs size, per kind with ≥ 2 sizes, raw and at equal
    length, item-clustered CIs, n per point; a sentence per kind at its largest size. Returns the headline numbers."""
    rep.heading(f"Headline: {dataset} summaries preferred to {baseline}, by model size")
    groups = fit_groups(d)
    kinds, _, separated = _size_kinds(groups)
    title_source = source.removesuffix(", not people")
    caption = (f"{dataset}: fraction preferred to {baseline} vs model size (log parameters); colour: kind, marker: model "
               f"family; dots: observed rate with its 95% item-clustered bootstrap interval, n beside each; curves (solid "
               f"raw, dashed at equal length, 95% bands with item-clustered SE) only within one family measured at two "
               f"sizes or more; {source}")
    families = [f for f in sorted(rates["family"].unique()) if f]
    if families:
        rep.text(f"Labels: {source}. Model families: " + "; ".join(families) + ". A size curve is fitted only within one "
                 "family (a line from one family's small model to another's large one describes no model); OpenAI's "
                 "released summaries are a point of reference on the same axes.")
    if not kinds:
        shown = rates.assign(_few=rates["n"] < SMALL_N).sort_values(["_few", "rate"], ascending=[True, False]).drop(columns="_few")
        shown.insert(0, "policy", readable_labels(shown))
        rep.text(f"No policy kind has two sizes in the {dataset} comparisons{' within one model family' if families else ''}, "
                 f"so there is no size curve. The main comparison — the fraction of comparisons in which each policy's "
                 f"summary was preferred to {baseline} (95% item-clustered bootstrap interval; {source}); policies with "
                 f"fewer than {SMALL_N} judgments are given as counts, without a rate or interval:")
        rep.bullets([f"{r.policy}{f', {r.family}' if r.family else ''}{f' ({r.policy_id})' if r.policy_id != r.policy else ''}: "
                     + (f"{r.rate:.1%} [{r.boot_low:.1%}, {r.boot_high:.1%}], n={r.n}" if r.n >= SMALL_N else
                        f"won {r.wins} of {r.n} (too few judgments for a rate)") for r in shown.itertuples()])
        _kind_order(rep, d, rates, baseline)
        if not families or not rates["n_params"].notna().any():
            return []
        rep.figure(_size_figure(None, None, rates, dataset, title_source), f"figure1_{dataset}", caption)
        return [{"policy_kind": r.policy_kind, "family": r.family, "policy_id": r.policy_id, "n_params": float(r.n_params),
                 "rate": float(r.rate), "boot_low": float(r.boot_low), "boot_high": float(r.boot_high), "n": int(r.n)}
                for r in shown.dropna(subset=["n_params"]).itertuples()]  # one size per family: every policy's dot
    ds = groups[groups["policy_kind"].isin(kinds)]
    raw, controlled = _size_curves(ds, separated)
    grouped = rates.assign(group=fit_groups(rates)["policy_kind"])
    headline = []
    for kind in kinds:
        mine = grouped[grouped["group"] == kind].sort_values("n_params")
        top, low = mine.iloc[-1], mine.iloc[0]
        headline.append({"policy_kind": top["policy_kind"], "family": top["family"], "policy_id": top["policy_id"],
                         "n_params": float(top["n_params"]), "rate": float(top["rate"]), "boot_low": float(top["boot_low"]),
                         "boot_high": float(top["boot_high"]), "n": int(top["n"]), "smallest_rate": float(low["rate"]),
                         "smallest_n_params": float(low["n_params"])})
    rep.text(f"Labels: {source}. At each kind's largest size, the fraction of comparisons in which its summary was "
             f"preferred to {baseline} (95% item-clustered bootstrap interval), and the same at its smallest size:")
    rep.bullets([f"{group_label(g)} {params_label(h['n_params'])} ({h['policy_id']}): "
                 f"{h['rate']:.1%} [{h['boot_low']:.1%}, {h['boot_high']:.1%}], n={h['n']}; at "
                 f"{params_label(h['smallest_n_params'])}: {h['smallest_rate']:.1%}" for g, h in zip(kinds, headline)])
    if separated:
        rep.text(_separated_text(separated))
    _kind_order(rep, d, rates, baseline)
    rep.figure(_size_figure(raw, controlled, rates, dataset, title_source), f"figure1_{dataset}", caption)
    return headline


ORDER = ("ppo", "sft", "pretrained")  # the paper's central result: RLHF over SFT over pretrained, at every size


def _kind_order(rep: "Report", d: pd.DataFrame, rates: pd.DataFrame, baseline: str) -> None:
    """Per model family and size: does PPO ≥ SFT ≥ pretrained hold, raw and at equal length? Said with the rates."""
    if "family" not in d:
        return
    table, _ = length_controlled(d) if (d["len_policy"] > 0).any() else (pd.DataFrame(columns=["policy_id", "controlled_rate"]), None)
    controlled = table.set_index("policy_id")["controlled_rate"]
    lines = []
    for (family, size), g in rates[rates["policy_kind"].isin(ORDER)].groupby(["family", "n_params"]):
        present = [k for k in ORDER if k in set(g["policy_kind"])]
        if len(present) < 2:
            continue
        by_kind = g.set_index("policy_kind")
        for what, values in (("raw", by_kind["rate"]), ("at equal length", by_kind["policy_id"].map(controlled))):
            vals = [float(values[k]) for k in present]
            if any(pd.isna(v) for v in vals):
                lines.append(f"{family or 'one family'} {params_label(size)}, {what}: not estimable for every kind")
                continue
            holds = all(a >= b for a, b in zip(vals, vals[1:]))
            lines.append(f"{family or 'one family'} {params_label(size)}, {what}: "
                         + ", ".join(f"{KIND_LABELS[k]} {v:.1%}" for k, v in zip(present, vals))
                         + f" — {' ≥ '.join(KIND_LABELS[k] for k in present)} " + ("holds" if holds else "does NOT hold"))
    if lines:
        rep.text(f"The paper's ordering (PPO ≥ SFT ≥ pretrained in preference to {baseline}), point estimates per family "
                 "and size:")
        rep.bullets(lines)


_TEMPERATURE = re.compile(r"_t(\d*\.?\d+)$")
_TOP_P = re.compile(r"_p(\d*\.\d+)$")


def readable_labels(rates: pd.DataFrame) -> list[str]:
    """"SFT 6.7B, T=0.7" for policy ids such as sup4_6b_t0.7 or sft-d2: the kind, the size and the decoding named in
    the id; the id is appended where two policies would read the same."""
    labels = []
    for r in rates.itertuples():
        parts = [KIND_LABELS.get(r.policy_kind, r.policy_kind)]
        if r.policy_kind in ("external",):
            parts = [r.policy_id]
        size = params_label(r.n_params)
        if size != "-" and r.policy_kind != "external":
            parts[0] += f" {size}"
        t, p = _TEMPERATURE.search(r.policy_id), _TOP_P.search(r.policy_id)
        if t:
            parts.append(f"T={float(t.group(1)):g}")
        if p:
            parts.append(f"top-p={float(p.group(1)):g}")
        labels.append(", ".join(parts))
    counts = pd.Series(labels).value_counts()
    return [f"{lab} [{pid}]" if counts[lab] > 1 else lab for lab, pid in zip(labels, rates["policy_id"])]


def _judges(rep: "Report", tables: dict[str, pd.DataFrame], split: str | None, n_boot: int, seed: int, source: str) -> None:
    """The bundled GPT-4 judge beside this study's labelers on the same posts (OpenAI's 1.3B RLHF summary vs the
    reference), and judge–labeler agreement on the very same pairs. The judge is never pooled with the labelers."""
    ours = comparisons(tables, baseline="ref")  # the labelers' (an LLM judge in the study is left out by default)
    ours = ours[ours["policy_id"] == OPENAI_PPO_POLICY]
    ours = ours[ours["split"] == split] if split else ours
    if ours.empty:
        return
    llm = load_llm_judgments(split or None)
    judge = comparisons(llm, baseline="ref")
    shared = sorted(set(ours["item_id"]) & set(judge["item_id"]))
    rep.heading("An LLM judge beside the labelers")
    if not shared:
        rep.text(f"The bundled GPT-4 verdicts cover none of this study's posts{f' in {split}' if split else ''}.")
        return
    rows = []
    for who, d in ((source, ours), ("LLM judge (GPT-4, bundled verdicts)", judge)):
        d = d[d["item_id"].isin(shared)]
        r = preference_rates(d.assign(policy_id=OPENAI_PPO_POLICY), n_boot=n_boot, rng=rng_for(seed, "judges", who)).iloc[0]
        rows.append({"labels": who, "preferred to ref": f"{r['rate']:.1%} [{r['boot_low']:.1%}, {r['boot_high']:.1%}]",
                     "n": int(r["n"]), "posts": int(r["n_clusters"])})
    rep.text(f"OpenAI's 1.3B RLHF summary vs the human reference on the {len(shared)} posts both judged; item-clustered "
             "95% intervals. The judge's verdicts are kept apart from the labelers' everywhere else in this report.")
    rep.table(pd.DataFrame(rows))
    verdict = judge.set_index("item_id")["outcome"]
    both = ours[ours["item_id"].isin(shared)]
    k = cohen_kappa(both["outcome"].to_numpy(), both["item_id"].map(verdict).to_numpy(), both["item_id"].to_numpy(),
                    n_boot=n_boot, rng=rng_for(seed, "judges", "kappa"))
    rep.text(f"Judge–labeler agreement on the same pairs ({source} vs GPT-4): {k['agreement']:.1%} of {k['n']} judgments; "
             f"Cohen's kappa {k['kappa']:.2f} [{k['ci_low']:.2f}, {k['ci_high']:.2f}] (item bootstrap).")


PAPER_POLICIES = {"rlhf_1_3b": "sup4_ppo_rm4_t.7", "sft_12_9b": "sup4_12b_t0.7", "rlhf_6_7b": "sup4_6b_ppo_rm4_6b_kl14",
                  "sft_6_7b": "sup4_6b"}
PAPER_LENGTH = "6.7B PPO vs the reference on TL;DR: ≈70% → ≈65% (≈ −5 points)"


def _length_row(study: _Study, policy: str, baseline: str, dataset: str, what: str, like: str) -> dict | None:
    """One row of the paper's length comparison from our data: raw → at equal length for ``policy`` vs ``baseline``."""
    d = study.comparisons(baseline)
    d = d[(d["dataset"] == dataset) & (d["policy_id"] == policy)]
    if d.empty:
        return None
    t = length_controlled(d)[0].iloc[0]
    if t["estimable"] != "yes":
        ours = f"{t['raw_rate']:.1%} raw; at equal length not estimable ({t['estimable']})"
    else:
        ours = (f"{t['raw_rate']:.1%} raw → {t['controlled_rate']:.1%} [{t['ci_low']:.1%}, {t['ci_high']:.1%}] at equal length "
                f"({100 * (t['controlled_rate'] - t['raw_rate']):+.1f} points; n={t['n']})")
        if t["extrapolated"]:
            ours += f"; extrapolated: mean log length ratio {t['mean_log_len_ratio']:+.2f}"
    return {"finding": what, "ours": ours, "paper": PAPER_LENGTH, "like for like": like, "source": "App. F"}


def _paper_beside(rep: "Report", study: _Study) -> None:
    """Released labels: our estimates next to the figures the paper publishes, each row saying whether it compares
    like with like; intervals are the ones the tables below give for the same quantities."""
    rows = []
    if study.comparisons(PAPER_POLICIES["sft_12_9b"]).empty:
        h2h = pd.DataFrame()
    else:
        h2h = study.rates(PAPER_POLICIES["sft_12_9b"], "tldr")
        h2h = h2h[h2h["policy_id"] == PAPER_POLICIES["rlhf_1_3b"]]
    if len(h2h):
        r = h2h.iloc[0]
        rows.append({"finding": "1.3B RLHF over 12.9B SFT", "ours": f"{r['rate']:.1%} [{r['boot_low']:.1%}, {r['boot_high']:.1%}] "
                     f"head-to-head (n={r['n']})", "paper": "61% vs 43%, each preferred to the reference",
                     "like for like": "no: the paper compares each with the reference; batch13 has no reference", "source": "Sec. 4.1, Fig. 1"})
    rows.append({"finding": "length control lowers 6.7B RLHF's rate (TL;DR)", "ours": "— (no released TL;DR batch compares 6.7B PPO with the reference)",
                 "paper": PAPER_LENGTH, "like for like": "not measurable from the bundled batches", "source": "App. F"})
    for args in ((PAPER_POLICIES["sft_6_7b"], "ref", "tldr", "length control, 6.7B SFT (T=0) vs the reference (TL;DR, batch18)",
                  "partly: same size, baseline and dataset, but SFT, not PPO"),
                 (PAPER_POLICIES["rlhf_6_7b"], "ref", "cnndm", "length control, 6.7B PPO vs the reference (CNN/DM, batch0)",
                  "partly: same policy and baseline, but news, not TL;DR"),
                 (PAPER_POLICIES["rlhf_1_3b"], PAPER_POLICIES["sft_12_9b"], "tldr", "length control, 1.3B PPO vs 12.9B SFT (TL;DR, batch13)",
                  "no: another size and baseline")):
        row = _length_row(study, *args)
        if row:
            rows.append(row)
    for dataset, paper in (("tldr", "73 ± 2% (weighting not stated)"), ("cnndm", "66.9% (weighting not stated)")):
        a = study.agreement(dataset)  # the agreement table's
        if a and a["n_pairs"]:
            rows.append({"finding": f"labeler–labeler agreement ({dataset})", "ours":
                         f"{a['agreement']:.1%} [{a['ci_low']:.1%}, {a['ci_high']:.1%}] per pair ({a['n_pairs']} pairs); "
                         f"{a['agreement_per_comparison']:.1%} [{a['comparison_ci_low']:.1%}, {a['comparison_ci_high']:.1%}] per "
                         f"comparison ({a['n_comparisons']} comparisons on {a['n_items']} posts)",
                         "paper": paper, "like for like": "yes, on the released labels", "source": "Sec. 3.4 and App. C"})
    rep.heading("The paper beside us")
    rep.text("Our estimates from the released labels next to the figures Stiennon et al. (2020) publish, each row saying "
             f"whether it compares like with like; lengths in {LENGTH_UNIT} (the released policies' own tokens). Intervals: "
             f"rates {BOOT.format(n=study.spec.n_boot)}; at equal length {WALD}; agreement {BOOT.format(n=study.spec.n_boot)}, "
             "the same as in the tables below.")
    rep.table(pd.DataFrame(rows))


def _samples(rep: "Report", tables: dict[str, pd.DataFrame], dataset: str) -> None:
    """One post and every policy's summary of it, so a reader sees what the numbers are about."""
    gens = tables["generations"]
    gens = gens[(gens["dataset"] == dataset) & ~gens["policy_id"].str.startswith("qc-")]
    if gens.empty:
        return
    counts = gens.groupby("item_id")["policy_id"].nunique()
    item_id = sorted(counts[counts == counts.max()].index)[0]
    item = tables["items"].set_index("item_id").loc[item_id]
    rows = gens[gens["item_id"] == item_id].sort_values(["policy_kind", "n_params", "policy_id"]).drop_duplicates("policy_id")
    rep.heading("Sample summaries: one post, every policy")
    body = str(item["body"])
    rep.text(f"{dataset} item {item_id}" + (f" — {item['title']}" if isinstance(item.get("title"), str) and item["title"] else "")
             + ": " + (body[:600] + " …" if len(body) > 600 else body))
    rep.table(pd.DataFrame({"policy": rows["policy_id"], "kind": rows["policy_kind"], "size": rows["n_params"].map(params_label),
                            "summary": rows["text"].map(lambda t: t if t else "(empty)")}))


def _likert_figure(likert: pd.DataFrame, means: pd.DataFrame, source: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in means.itertuples():
        ax.errorbar(r.mean_length_chars, r.overall, yerr=[[r.overall - r.overall_low], [r.overall_high - r.overall]], fmt="o", capsize=3)
        ax.annotate(f"{r.policy_id} (n={r.n})", (r.mean_length_chars, r.overall), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("mean summary length (characters)")
    ax.set_ylabel("mean overall rating (1–7)")
    ax.set_ylim(1, 7)
    ax.set_title(f"Quality vs length — {source}", fontsize=10)
    return fig


@dataclass(frozen=True)
class ReportSpec:
    """What a report covers and how its numbers are drawn; everything but the tables."""

    title: str
    baselines: tuple[str, ...] = ("ref",)
    split: str | None = "valid2"  # preference rates, fits and agreement on this split; None: every split
    n_boot: int = 1000
    seed: int = 0  # every analysis draws from its own generator (seed, analysis, dataset)
    config: dict | None = None
    reward_models: tuple[str, ...] = ()
    policy_kl: dict[str, float] | None = None
    primary_dataset: str | None = None  # the study's dataset: first in every section
    inputs: tuple[str | Path, ...] = ()
    policy_family: dict[str, str] | None = None  # each policy's model family (size curves stay within one)
    labels: str = ""  # whose labels (evalkit.analysis.labels): "" people's if any, else the simulated panel's or the one judge's
    panel_validation: Path | None = None  # the simulated panel's evaluator table, shown under Figure 1
    quality: QualityConfig | None = None  # the exclusion rules (None: nobody is excluded)
    include_excluded: bool = False  # re-admit the excluded labelers


def policy_rates(d: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> pd.DataFrame:
    """Each policy's rate in the comparisons ``d`` (preference_rates) with its mean length (in LENGTH_UNIT) and family."""
    rates = preference_rates(d, n_boot=n_boot, rng=rng)
    rates = rates.merge(d.groupby("policy_id")["len_policy"].mean().rename("mean_tokens"), on="policy_id")
    family = d.drop_duplicates("policy_id").set_index("policy_id")["family"] if "family" in d else pd.Series(dtype=object)
    return rates.assign(family=rates["policy_id"].map(family).astype(object).fillna("").astype(str))


class _Study:
    """The tables and what every section reads of them, computed once: whose labels they are and each baseline's
    comparisons on the report's split."""

    def __init__(self, tables: dict[str, pd.DataFrame], spec: ReportSpec):
        if tables["judgments"].empty:
            raise EvalkitError("no judgments to report on")
        self.all_judgments = tables["judgments"]
        self.judgments, self.labels, self.source = select_labels(tables["judgments"], spec.labels)
        self.excluded = pd.DataFrame(columns=["labeler_id", "reason", "judgments"])
        if spec.quality is not None:
            kept, self.excluded = drop_excluded({**tables, "judgments": self.judgments}, spec.quality)
            if not spec.include_excluded:
                self.judgments = kept["judgments"]
        self.n_all_splits = len(self.judgments)
        # one split rule: every section reads one label set on the report's split, and nothing else
        self.tables, self.spec = {**tables, "judgments": self.judgments}, spec
        if spec.split:
            self.tables = restrict(self.tables, None, spec.split)
        self.judgments = self.tables["judgments"]
        self._comparisons: dict[str, pd.DataFrame] = {}
        self._rates: dict[tuple[str, str], pd.DataFrame] = {}
        self._agreement: dict[str, dict | None] = {}

    def comparisons(self, baseline: str) -> pd.DataFrame:
        if baseline not in self._comparisons:
            self._comparisons[baseline] = family_comparisons(self.tables, baseline, self.spec.policy_family)
        return self._comparisons[baseline]

    def rates(self, baseline: str, dataset: str) -> pd.DataFrame:
        """Each policy's rate against ``baseline`` on ``dataset``, computed once per report (one bootstrap stream), so
        every section that quotes a rate quotes the same interval."""
        key = (baseline, dataset)
        if key not in self._rates:
            d = self.comparisons(baseline)
            self._rates[key] = policy_rates(d[d["dataset"] == dataset], self.spec.n_boot, rng_for(self.spec.seed, "rates", baseline, dataset))
        return self._rates[key]

    def agreement(self, dataset: str) -> dict | None:
        """Labeler–labeler agreement on ``dataset`` (agreement_with_ci), computed once per report; None without
        pairwise judgments there."""
        if dataset not in self._agreement:
            sub = restrict(self.tables, dataset)
            self._agreement[dataset] = None if pairwise_view(sub).empty else agreement_with_ci(
                sub, n_boot=self.spec.n_boot, rng=rng_for(self.spec.seed, "agreement", dataset))
        return self._agreement[dataset]

    def scope(self) -> str:
        """The report's one split rule and its counts, said once at the top."""
        j, items = self.judgments, self.tables["tasks"].loc[self.tables["tasks"]["task_id"].isin(self.judgments["task_id"]), "item_id"]
        where = f"split {self.spec.split} only" if self.spec.split else "every split"
        text = (f"Scope: every analysis below reads {where} — {len(j):,} judgments by {j['labeler_id'].nunique()} labelers on "
                f"{items.nunique():,} posts")
        if self.spec.split and self.n_all_splits != len(j):
            text += f" (of {self.n_all_splits:,} judgments in all splits)"
        text += f"; labels: {self.source}; lengths in {LENGTH_UNIT}."
        if len(self.excluded) and self.spec.split:
            text += " Exception: the [quality] exclusions are decided on each labeler's judgments in every split."
        return text

    def datasets_first(self, datasets) -> list:
        """The study's own dataset first, then the others by name."""
        return sorted(datasets, key=lambda ds: (ds != self.spec.primary_dataset, ds))


def build_report(tables: dict[str, pd.DataFrame], out_dir: str | Path, title: str, baselines: tuple[str, ...] = ("ref",),
                 split: str | None = "valid2", n_boot: int = 1000, seed: int = 0, config: dict | None = None,
                 reward_models: tuple[str, ...] = (), policy_kl: dict[str, float] | None = None,
                 primary_dataset: str | None = None, inputs: tuple[str | Path, ...] = (),
                 policy_family: dict[str, str] | None = None, labels: str = "", panel_validation: Path | None = None,
                 quality: QualityConfig | None = None, include_excluded: bool = False) -> dict[str, Path]:
    """The study's report in ``out_dir``: report.md, report.html, figures, fits.parquet and manifest.json. It is
    built in a folder beside ``out_dir`` and put in its place whole at the end, so a failed or killed report leaves
    the previous one as it was. ``policy_family``: each policy's model family (size curves stay within one)."""
    spec = ReportSpec(title, tuple(baselines), split, n_boot, seed, config, tuple(reward_models), policy_kl, primary_dataset,
                      tuple(inputs), policy_family, labels, panel_validation, quality, include_excluded)
    final = Path(out_dir)
    with artifacts.built_whole(final, lambda f: (artifacts.read_manifest(f) or {}).get("artifact") == "report",
                               "an evalkit report") as staging:
        written = _write_report(tables, staging, spec)
    return {k: final / v.name if isinstance(v, Path) else v for k, v in written.items()}


def _write_report(tables: dict[str, pd.DataFrame], out_dir: Path, spec: ReportSpec) -> dict:
    """The report, section by section (each: the analysis in, its text, tables and figures out)."""
    rep, study = Report(out_dir, spec.title), _Study(tables, spec)
    rep.text(study.scope())
    headline = _section_headline(rep, study)
    _section_panel(rep, study)
    if set(study.judgments["labeler_kind"].dropna()) == {"imported"}:
        _paper_beside(rep, study)
    _judges(rep, study.tables, spec.split, spec.n_boot, spec.seed, study.source)
    _section_other_labels(rep, study)
    _section_excluded(rep, study)
    for baseline in spec.baselines:
        _section_preferred_to(rep, study, baseline)
    _section_agreement(rep, study)
    _likert_and_strengths(rep, study.tables, study.source, spec.n_boot, spec.seed)
    _section_reward_models(rep, study)
    _section_kl(rep, study)
    manifest = artifacts.build_manifest("report", dict(spec.config or {}, title=spec.title, baselines=list(spec.baselines), split=spec.split,
                                                       n_boot=spec.n_boot, labels=study.labels), inputs=[p for p in spec.inputs if Path(p).is_file()],
                                        seeds={"bootstrap": spec.seed, "per_analysis": "derive_seed(seed, analysis, dataset)"},
                                        outputs={"figures": len(rep.figures), "fits": sum(len(f) for f in rep.fits)},
                                        extra={"headline": headline})
    return {**rep.write(manifest), "headline": headline}


def _section_excluded(rep: Report, study: _Study) -> None:
    """Who the [quality] rules exclude, with their reason and judgments: left out of every analysis below, unless
    re-admitted."""
    if study.excluded.empty:
        return
    n = int(study.excluded["judgments"].sum())
    if study.spec.include_excluded:
        rep.text(f"Excluded by the [quality] rules but re-admitted (--include-excluded): {len(study.excluded)} labelers, {n} judgments.")
    else:
        rep.text(f"Excluded by the [quality] rules: {len(study.excluded)} labelers, {n} judgments, left out of every analysis "
                 "below (kept in judgments.parquet; `evalkit report --include-excluded` re-admits them).")
    rep.table(study.excluded)


def _section_panel(rep: Report, study: _Study) -> None:
    """Under Figure 1, when its labels are the simulated panel's: the panel's evaluator row against real human labels
    (written when the labels were made), beside the human row, the length baseline and the panel's judge."""
    path = study.spec.panel_validation
    if study.labels != SIMULATED or path is None or not Path(path).is_file():
        return
    table = pd.read_csv(path)
    rep.text("How far the simulated panel can be trusted: its row in the evaluator table (`evalkit judge validate`) on the "
             "released batches' valid2 human labels, which neither the panel nor its judge was fitted on. "
             "`human_agreement`: leave one label out and predict the majority of the others (the panel: one simulated "
             "labeler in place of the left-out human); `pair_agreement_*`: labeler–labeler agreement; `prefers_longer`: "
             f"pairs differing by more than {LONGER_BY_CHARS} characters; `kappa_gpt4`: against the bundled GPT-4 verdicts.")
    cols = [c for c in ("judge", "human_agreement", "loo_batch13", "loo_batch18", "loo_batch0_cnndm", "prefers_longer",
                        "pair_agreement_tldr", "pair_agreement_cnndm", "kappa_gpt4") if c in table]
    rep.table(table[cols].round(3))


def _section_other_labels(rep: Report, study: _Study) -> None:
    """Other label sets of the study (judges, the simulated panel) beside the report's own, on the tasks both labelled:
    per-item agreement; never pooled."""
    others = machine_sets(study.all_judgments, study.labels)
    if not others:
        return
    tasks = study.tables["tasks"].set_index("task_id")
    def choices(j):
        t = tasks.loc[j["task_id"]]
        pair = [f"{i}|{'|'.join(sorted(p))}" for i, p in zip(t["item_id"], zip(t["gen_id_left"], t["gen_id_right"]))]
        return pd.DataFrame({"pair": pair, "item_id": t["item_id"].to_numpy(), "chosen": j["preferred_gen_id"].to_numpy()}).dropna()
    mine = choices(study.judgments.dropna(subset=["preferred_gen_id"]))
    rows = []
    for other in others:
        theirs = choices(set_judgments(study.all_judgments, other).dropna(subset=["preferred_gen_id"]))
        theirs = theirs.drop_duplicates("pair").set_index("pair")["chosen"]
        shared = mine[mine["pair"].isin(theirs.index)]
        agree = (shared["chosen"] == shared["pair"].map(theirs)).mean() if len(shared) else float("nan")
        rows.append({"labels": describe(set_judgments(study.all_judgments, other), other), "shared judgments": len(shared),
                     "items": shared["item_id"].nunique(), f"agreement with {study.labels}": "—" if shared.empty else f"{agree:.1%}"})
    rep.heading("Other labels of this study, kept apart")
    rep.text(f"Every number above reads {study.source} only (report.labels chooses; `all` pools). The study also has these "
             "labels; agreement is per judgment of the report's labels with the other set's choice on the same pair.")
    rep.table(pd.DataFrame(rows))


def _section_headline(rep: Report, study: _Study) -> list[dict]:
    """Figure 1 on the study's dataset (preference to the first baseline vs size) and one post summarised by every
    policy; returns the headline rates."""
    spec = study.spec
    if not spec.baselines:
        return []
    comp = study.comparisons(spec.baselines[0])
    datasets = list(comp["dataset"].unique())
    first = spec.primary_dataset if spec.primary_dataset in datasets else (sorted(datasets)[0] if datasets else None)
    if first is None:
        return []
    headline = _headline(rep, comp[comp["dataset"] == first], study.rates(spec.baselines[0], first), first, spec.baselines[0], study.source)
    _samples(rep, study.tables, first)
    return headline


def _section_preferred_to(rep: Report, study: _Study, baseline: str) -> None:
    """Per dataset: rates against ``baseline`` (table and figure), preference vs size, and length control."""
    comp = study.comparisons(baseline)
    rep.heading(f"Preferred to {baseline}")
    if comp.empty:
        rep.text(f"No comparisons with {baseline} in this data.")
        return
    for dataset in study.datasets_first(comp["dataset"].unique()):
        d = comp[comp["dataset"] == dataset]
        rates = _rates_part(rep, study, d, dataset, baseline)
        if rates.empty:
            continue
        _size_part(rep, study, d, rates, dataset, baseline)
        _length_part(rep, d, dataset, baseline)


def _rates_part(rep: Report, study: _Study, d: pd.DataFrame, dataset: str, baseline: str) -> pd.DataFrame:
    """The rates table and figure; returns the rates of the policies with enough judgments."""
    spec = study.spec
    all_rates = study.rates(baseline, dataset).copy()
    all_rates.insert(0, "policy", readable_labels(all_rates))
    rates = all_rates[all_rates["n"] >= SMALL_N].reset_index(drop=True)
    few = all_rates[all_rates["n"] < SMALL_N]
    rep.fits.append(_rate_fits(all_rates, f"rate:{dataset}:{baseline}", spec.n_boot))
    rep.text(f"{dataset}: fraction of comparisons in which the policy's summary was preferred to {baseline}; mean "
             f"summary length in {LENGTH_UNIT}; n_clusters: the posts the judgments are on.")
    shown = rates.assign(size=rates["n_params"].map(params_label), mean_tokens=rates["mean_tokens"].map("{:.1f}".format))
    rep.table(shown[["policy", "policy_id", "size", "mean_tokens", "wins", "n", "n_clusters", "rate", "boot_low", "boot_high"]],
              intervals="boot_low–boot_high: " + BOOT.format(n=spec.n_boot))
    if len(few):
        rep.text(f"Too few judgments for a rate (fewer than {SMALL_N}; counted here, not in the table or the figure): "
                 + "; ".join(f"{r.policy} ({r.policy_id}): {r.wins} of {r.n}" for r in few.itertuples()) + ".")
    if rates.empty:
        return rates
    rep.figure(_rates_figure(rates, dataset, baseline, study.source), f"preferred_{baseline}_{dataset}".replace(".", "_"),
               f"{dataset}: fraction preferred to {baseline} per policy, 95% item-clustered bootstrap intervals, n judgments and items per policy; {study.source}")
    zero = rates[(rates["wins"] == 0) | (rates["wins"] == rates["n"])]
    for r in zero.itertuples():
        rep.text(f"Note: {r.policy_id} won {r.wins} of {r.n}; its rate sits at a bound and only the interval is informative.")
    return rates


WILSON = "Wilson score (judgments treated as independent)"


def _rate_fits(rates: pd.DataFrame, analysis: str, n_boot: int) -> pd.DataFrame:
    """The rates as ``fits`` rows, one per policy and interval method: the report shows the bootstrap interval; the
    Wilson one is kept here, labelled, for a reader who recomputes the counts."""
    rows = [{"analysis": analysis, "term": r.policy_id, "estimate": float(r.rate), "std_err": np.nan, "ci_low": float(lo), "ci_high": float(hi),
             "p_value": np.nan, "n_obs": int(r.n), "n_clusters": int(r.n_clusters), "method": method}
            for r in rates.itertuples() for method, lo, hi in ((BOOT.format(n=n_boot), r.boot_low, r.boot_high), (WILSON, r.wilson_low, r.wilson_high))]
    return artifacts.conform(pd.DataFrame(rows), "fits")


def _size_part(rep: Report, study: _Study, d: pd.DataFrame, rates: pd.DataFrame, dataset: str, baseline: str) -> None:
    """Preference vs size, on the kinds measured at two or more sizes (one size leaves its slope unidentified) and
    with a finite fit."""
    grouped = fit_groups(d)
    kinds, one_size, separated = _size_kinds(grouped)
    ds = grouped[grouped["policy_kind"].isin(kinds)]
    if one_size:
        rep.text(f"Preference vs size leaves out {', '.join(one_size)}: measured at one size only, a size slope "
                 "for it is not identified.")
    if ds.empty:
        rep.text(f"Preference vs size: not fitted — no {dataset} policy kind is measured at two or more sizes.")
        return
    raw, controlled = _size_curves(ds, separated)
    if separated:
        rep.text(_separated_text(separated))
    shown = rates.assign(family=rates["policy_id"].map(d.drop_duplicates("policy_id").set_index("policy_id")["family"]) if "family" in d else "")
    shown = shown[fit_groups(shown)["policy_kind"].isin(ds["policy_kind"])]
    rep.figure(_size_figure(raw, controlled, shown, dataset, study.source), f"size_{baseline}_{dataset}",
               f"{dataset}: predicted preference vs size per policy kind, raw and at equal length; {study.source}")
    fit = ds[~ds["policy_kind"].isin(separated)]
    clusters = fit["item_id"].nunique()
    if raw is not None:
        rep.fits.append(fit_table(size_fit(fit), f"size:{dataset}:{baseline}", clusters))
        _labeler_effect_check(rep, fit, dataset, baseline)
    if controlled is not None:
        rep.fits.append(fit_table(size_fit(fit, length=True), f"size+length:{dataset}:{baseline}", clusters))


def _labeler_effect_check(rep: Report, fit: pd.DataFrame, dataset: str, baseline: str) -> None:
    """The size GLM again with a labeler random intercept, beside the item-clustered fit (labelers differ in
    leniency; a slope that moves when that is modelled rests on who labelled what)."""
    if fit["labeler_id"].nunique() < 2:
        return
    mixed = size_fit_labeler_effect(fit).assign(analysis=f"size+labeler:{dataset}:{baseline}")
    rep.fits.append(artifacts.conform(mixed, "fits"))
    clustered = rep.fits[-2].set_index("term")
    slopes = [t for t in mixed["term"] if "log_n_params" in t]
    parts = [f"{t}: {mixed.set_index('term').loc[t, 'estimate']:+.3f} (sd {mixed.set_index('term').loc[t, 'std_err']:.3f}) "
             f"vs {clustered.loc[t, 'estimate']:+.3f} (item-clustered SE {clustered.loc[t, 'std_err']:.3f})" for t in slopes if t in clustered.index]
    rep.text(f"{dataset}: the size fit with a labeler random intercept (binomial mixed GLM, variational Bayes, "
             f"{fit['labeler_id'].nunique()} labelers) beside the item-clustered GLM — " + "; ".join(parts) + ".")


def _length_part(rep: Report, d: pd.DataFrame, dataset: str, baseline: str) -> None:
    """Length control (paper App. F): each policy's rate predicted at equal length."""
    if not (d["len_policy"] > 0).any():
        return
    table, result = length_controlled(d)
    empty, out, extra = int(table["n_empty"].sum()), table[table["estimable"] != "yes"], table[table["extrapolated"]]
    rep.text(f"Length control (paper App. F): logistic regression of the outcome on policy and log(length ratio), lengths "
             f"in {LENGTH_UNIT}, one length slope shared by all policies, predicted at equal length; own_slope_rate is the "
             "same prediction from the policy's own slope (a check of the shared slope). The raw rate counts every comparison"
             + (f"; {empty} comparison(s) with an empty summary count in it but not in the length model "
                "(their length ratio is undefined)" if empty else "") + "."
             + (f" Not estimable (fewer than {SMALL_N} comparisons, or won all or none; left out of the fit): "
                + "; ".join(f"{r.policy_id} ({r.estimable})" for r in out.itertuples()) + "." if len(out) else "")
             + (f" Extrapolated to equal length from a mean |log length ratio| above {EXTRAPOLATION_LOG_RATIO} "
                f"(read with care): {', '.join(extra['policy_id'])}." if len(extra) else ""))
    rep.table(table.drop(columns=["separated"]), intervals="ci_low–ci_high: " + WALD + ", from the GLM with the shared slope")
    if result is not None:
        rep.fits.append(fit_table(result, f"length:{dataset}:{baseline}", d["item_id"].nunique()))


def _section_agreement(rep: Report, study: _Study) -> None:
    rep.heading("Agreement and position bias")
    if pairwise_view(study.tables).empty:
        rep.text("No pairwise judgments: pairwise agreement and position bias are not measured.")
        return
    found = study.datasets_first(study.tables["items"]["dataset"].unique())
    _pairwise_agreement(rep, study, found)


def _section_reward_models(rep: Report, study: _Study) -> None:
    if not study.spec.reward_models:
        return
    rep.heading("Reward-model accuracy vs size")
    table, summary = rm_accuracy_by_size(list(study.spec.reward_models))
    rep.table(table, intervals="ci_low–ci_high: Wilson score, the held-out pairs treated as independent")
    slope = summary["accuracy_per_doubling"]
    rep.text("Accuracy gained per doubling of size: " + (f"{100 * slope:.2f} points" if slope is not None else f"not measured ({summary['why_not']})")
             + " (the paper: ≈1.8 points).")


def _section_kl(rep: Report, study: _Study) -> None:
    if not study.spec.policy_kl:
        return
    comp = study.comparisons(study.spec.baselines[0])
    known = {p: k for p, k in study.spec.policy_kl.items() if p in set(comp["policy_id"])}
    rep.heading("Preference vs KL from SFT")
    if known:
        table = kl_vs_preference(comp, known).drop(columns=["ci_low", "ci_high"])
        rates = pd.concat([study.rates(study.spec.baselines[0], ds) for ds in comp["dataset"].unique()])
        table = table.merge(rates[["policy_id", "boot_low", "boot_high"]].drop_duplicates("policy_id"), on="policy_id", how="left")
        rep.table(table, intervals="boot_low–boot_high: the rate's interval from the tables above (" + BOOT.format(n=study.spec.n_boot) + ")")
    else:
        rep.text("None of the policies with a known KL from SFT has comparisons with the baseline.")


def family_comparisons(tables: dict[str, pd.DataFrame], baseline: str, policy_family: dict[str, str] | None) -> pd.DataFrame:
    """The comparisons view with each policy's model family (column ``family``) when the study knows them."""
    comp = comparisons(tables, baseline=baseline)
    return comp.assign(family=comp["policy_id"].map(policy_family).fillna("")) if policy_family else comp


def restrict(tables: dict[str, pd.DataFrame], dataset: str | None = None, split: str | None = None) -> dict[str, pd.DataFrame]:
    """The tables limited to the tasks (and their judgments) on items of one dataset and/or split."""
    keep = tables["items"]
    if dataset:
        keep = keep[keep["dataset"] == dataset]
    if split:
        keep = keep[keep["split"] == split]
    tasks = tables["tasks"][tables["tasks"]["item_id"].isin(keep["item_id"])]
    return {**tables, "tasks": tasks, "judgments": tables["judgments"][tables["judgments"]["task_id"].isin(tasks["task_id"])]}


MIN_ALPHA_POSTS = 10  # posts with a comparison judged twice or more: fewer, and an alpha is not reported


def _alpha_row(pv: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> dict:
    """Krippendorff's alpha on the report's coding (oriented_by_record: the first-recorded summary won), with its
    item-clustered interval, or "—" and the counts when it rests on fewer than MIN_ALPHA_POSTS posts."""
    nan = {"alpha": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    a = krippendorff_alpha_ci(pv, "pair", "labeler_id", "first_won", "nominal", n_boot=n_boot, rng=rng)
    # the 9-point confidence turned to the first-recorded summary, as an ordinal, where every judgment has one
    c = (krippendorff_alpha_ci(pv, "pair", "labeler_id", "first_confidence", "ordinal", n_boot=n_boot, rng=rng)
         if pv["first_confidence"].notna().all() else nan)
    if a["n_clusters"] < MIN_ALPHA_POSTS:
        a, c = {**a, **nan}, nan
    return {"alpha": a["alpha"], "alpha_low": a["ci_low"], "alpha_high": a["ci_high"], "alpha_confidence": c["alpha"],
            "confidence_low": c["ci_low"], "confidence_high": c["ci_high"], "comparisons": a["n_units"], "posts": a["n_clusters"]}


def _pairwise_agreement(rep: Report, study: _Study, datasets: list[str]) -> None:
    """Agreement, alpha and position bias per dataset on the report's split, each with its interval and counts."""
    tables, n_boot, seed = study.tables, study.spec.n_boot, study.spec.seed
    rows, positions = [], []
    for dataset in datasets:
        agree = study.agreement(dataset)
        if agree is None:
            continue
        sub = restrict(tables, dataset)
        pos = position_effect(sub)
        pv = oriented_by_record(sub)
        alpha = _alpha_row(pv, n_boot, rng_for(seed, "alpha", dataset))
        rows.append({"dataset": dataset, "agreement_by_pair": agree["agreement"], "pair_low": agree["ci_low"], "pair_high": agree["ci_high"],
                     "agreement_by_comparison": agree["agreement_per_comparison"], "comparison_low": agree["comparison_ci_low"],
                     "comparison_high": agree["comparison_ci_high"], "n_pairs": agree["n_pairs"],
                     "n_comparisons": agree["n_comparisons"], "n_posts": agree["n_items"], **alpha})
        positions.append({"dataset": dataset, "left_chosen_adjusted": pos["adjusted_left_rate"], "left_low": pos["ci_low"],
                          "left_high": pos["ci_high"], "left_chosen_naive": pos["naive_left_rate"], "n_judgments": pos["n"],
                          "n_posts": pos["n_clusters"], "left_out": pos["n_left_out"]})
        by_source = pv.groupby("source")
        if by_source.ngroups > 1:  # alpha per batch: a pooled alpha hides batches that differ
            per = [{"dataset": dataset, "source": src, "n_judgments": len(g), **_alpha_row(g, n_boot, rng_for(seed, "alpha", dataset, src))}
                   for src, g in by_source]
            rep.text(f"{dataset}: Krippendorff's alpha per batch (source file), on the same coding:")
            rep.table(pd.DataFrame(per), intervals="alpha_low–alpha_high and confidence_low–confidence_high: " + BOOT.format(n=n_boot))
    if not rows:
        rep.text("No pairwise judgments on this split: agreement and position bias are not measured.")
        return
    table = pd.DataFrame(rows)
    rep.text("Labeler–labeler agreement per dataset: over every two judgments of the same comparison (the same two "
             "summaries of a post) by different labelers (agreement_by_pair, so a comparison judged by k labelers weighs "
             "k(k−1)/2), and per comparison (agreement_by_comparison: each comparison's share of agreeing pairs, "
             "averaged), with the comparisons judged twice or more and their posts. Krippendorff's alpha (nominal) codes "
             "each judgment as whether the comparison's first-recorded summary won (the order its first task stored, "
             "before any left/right swap), a coding no renaming of policies changes; alpha_confidence (ordinal) codes the "
             "9-point confidence turned the same way (1: definitely the first-recorded summary). Both are given from "
             f"{MIN_ALPHA_POSTS} posts or more.")
    rep.table(table, intervals="pair_low–pair_high, comparison_low–comparison_high, alpha_low–alpha_high and confidence_low–confidence_high: "
              + BOOT.format(n=n_boot) + ", one set of resamples per dataset for the two agreements")
    for r in table.itertuples():
        if r.n_pairs == 0:
            rep.text(f"{r.dataset}: no pair of summaries was judged by two different labelers, so agreement is not measured.")
    rep.text("Position bias: the share of judgments choosing the left summary, adjusted for which policy sat on each side "
             "(Bradley–Terry with a side effect, at two equal summaries) and naive, over the same judgments; left_out: "
             "judgments of policies with fewer than 10, which make the fit singular.")
    rep.table(pd.DataFrame(positions), intervals="left_low–left_high: " + WALD)
    per = per_labeler(tables)
    per = per.merge(labeler_position(tables)[["labeler_id", "left_excess"]], on="labeler_id", how="left")
    small = per[per["n"] < SMALL_N]
    rep.text(f"Labelers with at least {SMALL_N} judgments (left_excess: left choices beyond what the policies on each side "
             f"predict; agreement_with_others: with the other labelers' majority, from {MIN_SHARED} shared comparisons or "
             "more; check_accuracy and failed_checks: over their gold and attention tasks, — where they had none)"
             + (f"; {len(small)} labelers with fewer are counted above but not listed." if len(small) else ":"))
    rep.table(per[per["n"] >= SMALL_N])
    flagged = per[per["failed_checks"] > 0]
    if len(flagged):
        rep.text(f"Flagged (kept: within the [quality] rules, or re-admitted): {', '.join(flagged['labeler_id'])} failed some gold or attention checks.")


def _likert_and_strengths(rep: Report, tables: dict[str, pd.DataFrame], source: str, n_boot: int, seed: int) -> None:
    likert = likert_view(tables)
    if len(likert):
        rep.heading("Likert ratings (1–7)")
        means = likert_means(likert, n_boot=n_boot, rng=rng_for(seed, "likert"))
        rep.text(f"Mean rating per policy; {source}.")
        rep.table(means, intervals="<axis>_low–<axis>_high: " + BOOT.format(n=n_boot))
        rep.figure(_likert_figure(likert, means, source), "likert_overall_vs_length",
                   f"overall rating vs summary length, per policy (means with 95% intervals); {source}")
        if likert["policy_id"].nunique() > 1:
            adjusted, fit = length_adjusted_means(likert)
            rep.text("Length-adjusted overall means (regression on policy and log length, at the pooled mean length).")
            rep.table(adjusted, intervals="ci_low–ci_high: cluster-robust Wald (clusters: posts), from that regression")
            rep.fits.append(fit_table(fit, "likert_length", likert["item_id"].nunique()))
        if likert.groupby("item_id")["labeler_id"].nunique().max() >= 2:
            unit = likert["item_id"] + "|" + likert["policy_id"]
            a = krippendorff_alpha(likert.assign(unit=unit), "unit", "labeler_id", "overall", "ordinal")
            rep.text(f"Krippendorff's alpha (ordinal, overall rating): {a:.3f}.")

    rep.heading("Bradley–Terry strengths")
    items = tables["items"].set_index("item_id")["dataset"]
    for dataset in sorted(tables["items"]["dataset"].unique()):
        keep = tables["tasks"]["item_id"].map(items) == dataset
        sub = {**tables, "tasks": tables["tasks"][keep]}
        if pairwise_view(sub).empty:
            continue
        bt = bradley_terry(sub, n_boot=min(n_boot, 200), rng=rng_for(seed, "bradley-terry", dataset))
        rep.text(f"{dataset}: log-odds strengths with the reference at 0. Checked before fitting: a policy with fewer than "
                 f"{SMALL_N} judgments, or whose wins and losses do not link it both ways to the reference's group (it won "
                 "all, or lost all, of those comparisons: no finite strength), is not estimable — no number, the reason "
                 "in `estimable`.")
        rep.table(bt.drop(columns=["boot_estimable"]), intervals=f"ci_low–ci_high: {BOOT.format(n=min(n_boot, 200))}, each resample "
                  "checked the same way; an interval only where the policy is estimable in 95% of the resamples or more")
