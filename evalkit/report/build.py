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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evalkit import artifacts  # noqa: E402
from evalkit.analysis.agreement import bradley_terry, labeler_agreement, pairwise_view, per_labeler  # noqa: E402
from evalkit.analysis.likert import krippendorff_alpha, length_adjusted_means, likert_means, likert_view  # noqa: E402
from evalkit.analysis.preference import comparisons, fit_table, length_controlled, preference_rates, size_curve, size_fit  # noqa: E402
from evalkit.errors import EvalkitError  # noqa: E402

log = logging.getLogger(__name__)

KIND_LABELS = {"pretrained": "pretrained (zero-shot)", "sft": "SFT", "ppo": "PPO (RLHF)", "best_of_n": "best-of-N",
               "external": "external", "ref": "reference", "lead3": "lead-3"}
KIND_WORDS = {"human": "human labels", "imported": "imported human labels (OpenAI release)", "simulated": "SIMULATED labels",
              "llm": "LLM-judge labels"}


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

    def table(self, df: pd.DataFrame, floatfmt: str = "{:.3f}") -> None:
        shown = df.copy()
        for c in shown.columns:
            if pd.api.types.is_float_dtype(shown[c]):
                shown[c] = shown[c].map(lambda v: "—" if pd.isna(v) else floatfmt.format(v))
        header = "| " + " | ".join(map(str, shown.columns)) + " |"
        lines = [header, "|" + "---|" * len(shown.columns)] + ["| " + " | ".join(map(str, r)) + " |" for r in shown.itertuples(index=False)]
        self.md.append("\n".join(lines) + "\n")
        self.html.append(shown.to_html(index=False, escape=True, border=0, classes="t"))

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


def label_source(judgments: pd.DataFrame) -> str:
    kinds = sorted(judgments["labeler_kind"].dropna().unique())
    return ", ".join(KIND_WORDS.get(k, k) for k in kinds) or "no labels"


def _rates_figure(rates: pd.DataFrame, dataset: str, baseline: str, source: str):
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rates) + 1.5))
    y = np.arange(len(rates))
    # clipped at 0: at 0 or n wins the Wilson bound can miss the rate by a rounding error
    ax.errorbar(rates["rate"], y, xerr=[np.maximum(rates["rate"] - rates["wilson_low"], 0), np.maximum(rates["wilson_high"] - rates["rate"], 0)],
                fmt="o", capsize=3)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, [f"{p} (n={n})" for p, n in zip(rates["policy_id"], rates["n"])])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction preferred to {baseline} (95% Wilson interval)")
    ax.set_title(f"{dataset}: preferred to {baseline} — {source}", fontsize=10)
    return fig


def _size_figure(raw: pd.DataFrame, controlled: pd.DataFrame | None, points: pd.DataFrame, dataset: str, source: str):
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for kind, g in raw.groupby("policy_kind"):
        line, = ax.plot(g["n_params"], g["predicted"], label=f"{KIND_LABELS.get(kind, kind)} (raw)")
        ax.fill_between(g["n_params"], g["ci_low"], g["ci_high"], alpha=0.15, color=line.get_color())
        if controlled is not None:
            c = controlled[controlled["policy_kind"] == kind]
            ax.plot(c["n_params"], c["predicted"], ls="--", color=line.get_color(), label=f"{KIND_LABELS.get(kind, kind)} (length-controlled)")
        p = points[points["policy_kind"] == kind]
        ax.scatter(p["n_params"], p["rate"], color=line.get_color(), s=12 + p["n"] / 4)
        for r in p.itertuples():
            ax.annotate(f"n={r.n}", (r.n_params, r.rate), fontsize=7, xytext=(4, -10), textcoords="offset points")
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


def _headline(rep: "Report", d: pd.DataFrame, dataset: str, baseline: str, source: str, n_boot: int, seed: int) -> list[dict]:
    """The paper's Figure 1 first: fraction preferred to the baseline vs size, per kind with ≥ 2 sizes, raw and at equal
    length, item-clustered CIs, n per point; a sentence per kind at its largest size. Returns the headline numbers."""
    rep.heading(f"Headline: {dataset} summaries preferred to {baseline}, by model size")
    sizes = d.dropna(subset=["n_params"]).groupby("policy_kind")["n_params"].nunique()
    kinds = sorted(sizes[sizes >= 2].index)
    if not kinds:
        rep.text(f"No policy kind has two sizes in the {dataset} comparisons, so there is no size curve; the per-policy rates follow.")
        return []
    ds = d[d["policy_kind"].isin(kinds)]
    rates = preference_rates(ds, n_boot=n_boot, rng=np.random.default_rng(seed))
    raw = size_curve(ds)
    has_len = bool(((ds["len_policy"] > 0) & (ds["len_baseline"] > 0)).any())
    controlled = size_curve(ds, length=True) if has_len else None
    headline = []
    for kind in kinds:
        top = rates[rates["policy_kind"] == kind].sort_values("n_params").iloc[-1]
        low = rates[rates["policy_kind"] == kind].sort_values("n_params").iloc[0]
        headline.append({"policy_kind": kind, "policy_id": top["policy_id"], "n_params": float(top["n_params"]),
                         "rate": float(top["rate"]), "boot_low": float(top["boot_low"]), "boot_high": float(top["boot_high"]),
                         "n": int(top["n"]), "smallest_rate": float(low["rate"]), "smallest_n_params": float(low["n_params"])})
    rep.text(f"Labels: {source}. At each kind's largest size, the fraction of comparisons in which its summary was "
             f"preferred to {baseline} (95% item-clustered bootstrap interval), and the same at its smallest size:")
    rep.bullets([f"{KIND_LABELS.get(h['policy_kind'], h['policy_kind'])} {params_label(h['n_params'])} ({h['policy_id']}): "
                 f"{h['rate']:.1%} [{h['boot_low']:.1%}, {h['boot_high']:.1%}], n={h['n']}; at "
                 f"{params_label(h['smallest_n_params'])}: {h['smallest_rate']:.1%}" for h in headline])
    title_source = "SIMULATED panel" if "SIMULATED" in source else source
    rep.figure(_size_figure(raw, controlled, rates, dataset, title_source), f"figure1_{dataset}",
               f"{dataset}: fraction preferred to {baseline} vs model size (log parameters) per kind; solid raw, dashed at "
               f"equal length; bands: 95% CI with item-clustered SE; dots: observed rate, n beside each; {source}")
    return headline


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


def build_report(tables: dict[str, pd.DataFrame], out_dir: str | Path, title: str, baselines: tuple[str, ...] = ("ref",),
                 split: str | None = "valid2", n_boot: int = 1000, seed: int = 0, config: dict | None = None,
                 reward_models: tuple[str, ...] = (), policy_kl: dict[str, float] | None = None,
                 primary_dataset: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rep = Report(out_dir, title)
    judg = tables["judgments"]
    if judg.empty:
        raise EvalkitError("no judgments to report on")
    source = label_source(judg)
    headline: list[dict] = []
    if baselines:
        comp = comparisons(tables, baseline=baselines[0])
        comp = comp[comp["split"] == split] if split else comp
        datasets = list(comp["dataset"].unique())
        first = primary_dataset if primary_dataset in datasets else (sorted(datasets)[0] if datasets else None)
        if first is not None:
            headline = _headline(rep, comp[comp["dataset"] == first], first, baselines[0], source, n_boot, seed)
            _samples(rep, tables, first)
    rep.text(f"Labels: {source}. {len(judg)} judgments by {judg['labeler_id'].nunique()} labelers"
             + (f"; preference rates on split {split} only." if split else "."))

    for baseline in baselines:
        comp = comparisons(tables, baseline=baseline)
        if split:
            comp = comp[comp["split"] == split]
        rep.heading(f"Preferred to {baseline}")
        if comp.empty:
            rep.text(f"No comparisons with {baseline} in this data.")
            continue
        groups = sorted(comp.groupby("dataset"), key=lambda g: (g[0] != primary_dataset, g[0]))  # the study's dataset first
        for dataset, d in groups:
            rates = preference_rates(d, n_boot=n_boot, rng=rng)
            rep.text(f"{dataset}: fraction of comparisons in which the policy's summary was preferred to {baseline}, with a "
                     f"Wilson interval and an item-clustered bootstrap interval ({n_boot} replicates).")
            rep.table(rates[["policy_id", "policy_kind", "n_params", "wins", "n", "rate", "wilson_low", "wilson_high", "boot_low", "boot_high"]])
            rep.figure(_rates_figure(rates, dataset, baseline, source), f"preferred_{baseline}_{dataset}".replace(".", "_"),
                       f"{dataset}: fraction preferred to {baseline} per policy, 95% Wilson intervals, n per policy; {source}")
            zero = rates[(rates["wins"] == 0) | (rates["wins"] == rates["n"])]
            for r in zero.itertuples():
                rep.text(f"Note: {r.policy_id} won {r.wins} of {r.n}; its rate sits at a bound and only the interval is informative.")
            # preference vs size, on the kinds measured at two or more sizes (one size leaves its slope unidentified)
            kinds_at = d.dropna(subset=["n_params"]).groupby("policy_kind")["n_params"].nunique()
            one_size = sorted(kinds_at[kinds_at < 2].index)
            ds = d[d["policy_kind"].isin(kinds_at[kinds_at >= 2].index)]
            if one_size:
                rep.text(f"Preference vs size leaves out {', '.join(one_size)}: measured at one size only, a size slope "
                         "for it is not identified.")
            if ds.empty:
                rep.text(f"Preference vs size: not fitted — no {dataset} policy kind is measured at two or more sizes.")
            else:
                raw = size_curve(ds)
                has_len = bool((ds["len_policy"] > 0).any())
                controlled = size_curve(ds, length=True) if has_len else None
                rep.figure(_size_figure(raw, controlled, rates[rates["policy_kind"].isin(ds["policy_kind"])], dataset, source), f"size_{baseline}_{dataset}",
                           f"{dataset}: predicted preference vs size per policy kind, raw and at equal length; {source}")
                clusters = ds["item_id"].nunique()
                rep.fits.append(fit_table(size_fit(ds), f"size:{dataset}:{baseline}", clusters))
                if has_len:
                    rep.fits.append(fit_table(size_fit(ds, length=True), f"size+length:{dataset}:{baseline}", clusters))
            empty = int((d["len_policy"].fillna(0) <= 0).sum() + (d["len_baseline"].fillna(0) <= 0).sum())
            if (d["len_policy"] > 0).any():
                table, result = length_controlled(d)
                rep.text("Length control (paper App. F): logistic regression on policy and log(length ratio), predicted at equal length"
                         + (f"; {empty} comparison(s) with an empty summary left out." if empty else ".")
                         + " Policies that won all or none of their comparisons get no controlled estimate.")
                rep.table(table)
                rep.fits.append(fit_table(result, f"length:{dataset}:{baseline}", d["item_id"].nunique()))

    rep.heading("Agreement and position bias")
    if pairwise_view(tables).empty:
        rep.text("No pairwise judgments: pairwise agreement and position bias are not measured.")
    else:
        _pairwise_agreement(rep, tables)
    _likert_and_strengths(rep, tables, source, n_boot, rng)
    if reward_models:
        from evalkit.analysis.rm_eval import rm_accuracy_by_size

        rep.heading("Reward-model accuracy vs size")
        table, summary = rm_accuracy_by_size(list(reward_models))
        rep.table(table)
        slope = summary["accuracy_per_doubling"]
        rep.text("Accuracy gained per doubling of size: " + (f"{100 * slope:.2f} points" if slope is not None else "not measured (one size)")
                 + " (the paper: ≈1.8 points).")
    if policy_kl:
        from evalkit.analysis.rm_eval import kl_vs_preference

        comp = comparisons(tables, baseline=baselines[0])
        comp = comp[comp["split"] == split] if split else comp
        known = {p: k for p, k in policy_kl.items() if p in set(comp["policy_id"])}
        rep.heading("Preference vs KL from SFT")
        if known:
            rep.table(kl_vs_preference(comp, known))
        else:
            rep.text("None of the policies with a known KL from SFT has comparisons with the baseline.")
    manifest = artifacts.build_manifest("report", dict(config or {}, title=title, baselines=list(baselines), split=split,
                                                       n_boot=n_boot), seeds={"bootstrap": seed},
                                        outputs={"figures": len(rep.figures), "fits": sum(len(f) for f in rep.fits)},
                                        extra={"headline": headline})
    return {**rep.write(manifest), "headline": headline}


def _pairwise_agreement(rep: Report, tables: dict[str, pd.DataFrame]) -> None:
    agree = labeler_agreement(tables)
    if agree["n_pairs"] == 0:
        rep.text("No pair of summaries was judged by two different labelers, so labeler–labeler agreement is not measured.")
    else:
        rep.text(f"Labeler–labeler agreement: {agree['agreement']:.1%} over {agree['n_pairs']} pairs of judgments of the same "
                 f"two summaries by different labelers.")
    per = per_labeler(tables)
    left = (pairwise_left_rate(tables))
    rep.text(f"Position bias: the left summary was chosen in {left:.1%} of pairwise judgments (50% = none).")
    rep.table(per)
    flagged = per[per["failed_checks"] > 0]
    if len(flagged):
        rep.text(f"Flagged (kept, not dropped): {', '.join(flagged['labeler_id'])} failed gold or attention checks.")

    pv = pairwise_view(tables)
    if pv.groupby("pair")["labeler_id"].nunique().max() >= 2:
        first_won = (pv["preferred_gen_id"] == pv["pair"].str.split(" | ", regex=False).str[0]).astype(int)
        alpha = krippendorff_alpha(pv.assign(first_won=first_won), "pair", "labeler_id", "first_won", "nominal")
        rep.text(f"Krippendorff's alpha (nominal: which of the two summaries won, over pairs judged more than once): {alpha:.3f}.")


def _likert_and_strengths(rep: Report, tables: dict[str, pd.DataFrame], source: str, n_boot: int, rng) -> None:
    likert = likert_view(tables)
    if len(likert):
        rep.heading("Likert ratings (1–7)")
        means = likert_means(likert, n_boot=n_boot, rng=rng)
        rep.text(f"Mean rating per policy with item-clustered bootstrap 95% intervals; {source}.")
        rep.table(means)
        rep.figure(_likert_figure(likert, means, source), "likert_overall_vs_length",
                   f"overall rating vs summary length, per policy (means with 95% intervals); {source}")
        if likert["policy_id"].nunique() > 1:
            adjusted, fit = length_adjusted_means(likert)
            rep.text("Length-adjusted overall means (regression on policy and log length, at the pooled mean length).")
            rep.table(adjusted)
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
        bt = bradley_terry(sub, n_boot=min(n_boot, 200), rng=rng)
        rep.text(f"{dataset}: log-odds strengths with the reference at 0 (item bootstrap 95% intervals); "
                 "policies never compared with the reference's component are left out.")
        rep.table(bt)


def pairwise_left_rate(tables: dict[str, pd.DataFrame]) -> float:
    j = tables["judgments"].dropna(subset=["preferred"])
    return float((j["preferred"] == "left").mean()) if len(j) else float("nan")
