"""evalkit report on the released human labels: runs in seconds, self-contained HTML, figures in PNG and SVG,
tidy fits, the exact counts, and plain words where an analysis cannot run."""

import re

from conftest import run_cli

from evalkit import artifacts


def test_openai_released_report(tmp_path):
    out = tmp_path / "rep"
    proc = run_cli("report", "studies/openai_released", "--out", out, check=True)
    assert "report.html" in proc.stdout
    md = (out / "report.md").read_text()
    for label, pid, size, wins, n in (("SFT 6.7B", "sup4_6b", "6.7B", 30, 85), ("SFT 6.7B, T=0.7", "sup4_6b_t0.7", "6.7B", 20, 84),
                                      ("SFT 6.7B, top-p=0.95", "sup4_6b_p.95", "6.7B", 12, 84),
                                      ("PPO (RLHF) 6.7B", "sup4_6b_ppo_rm4_6b_kl14", "6.7B", 38, 74),
                                      ("pretrained 6.7B, T=0.7", "pretrain_6b_t.7", "6.7B", 22, 73),
                                      ("PPO (RLHF) 1.3B, T=0.7", "sup4_ppo_rm4_t.7", "1.3B", 598, 832)):
        assert re.search(rf"\| {re.escape(label)} \| {re.escape(pid)} \| {size} \| [\d.]+ \| {wins} \| {n} \|", md), pid
    # agreement per dataset on the report's split (valid2), with item-resampled intervals, and the paper beside it
    # both weightings, with the comparisons and posts they rest on (35 comparisons on 30 posts give 649 pairs)
    assert "| tldr | 0.715 | 0.627 | 0.800 | 0.647 |" in md and "| 649 | 35 | 30 |" in md and "| cnndm | 0.786 |" in md
    assert "| labeler–labeler agreement (tldr) | 71.5% [" in md and "(35 comparisons on 30 posts)" in md
    # one interval per quantity: the paper table quotes the rates table's interval
    assert "| 1.3B RLHF over 12.9B SFT | 71.9% [67.7%, 75.7%] head-to-head (n=832)" in md
    assert "| sup4_ppo_rm4_t.7 | 1.3B | 39.4 | 598 | 832 | 689 | 0.719 | 0.677 | 0.757 |" in md
    assert "Too few judgments for a rate (fewer than 20" in md and "sup4_6b_p.7): 1 of 1" in md
    # one split for every analysis, said once: Bradley–Terry's reference has valid2's 279 judgments, not 339
    assert "Scope: every analysis below reads split valid2 only — 1,823 judgments by 30 labelers" in md
    assert "| ref | 0.000 | 0.000 | 0.000 | 207 | 279 | reference (0 by definition) |" in md
    assert "| sup4_6b_p.7 | — | — | — | 2 | 2 | too few judgments (2 < 20) |" in md
    assert "| batch18.json | 554 | — | — | — | — | — | — | 6 | 1 |" in md  # an alpha on one post is not given
    assert "not fitted — no tldr policy kind is measured at two or more sizes" in md  # degenerate input, said in words
    assert "leaves out sft: measured at one size only" in md and "No policy kind has two sizes in the tldr" in md
    assert "imported human labels" in md and "nan" not in md.lower()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and not re.search(r"src=['\"](?!data:)", html)
    for name in ("preferred_ref_tldr", "preferred_ref_cnndm", "preferred_sup4_12b_t0_7_tldr"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").is_file()
    fits = artifacts.read_table(out / "fits.parquet", "fits")
    rate = fits[(fits["analysis"] == "rate:tldr:ref") & (fits["term"] == "sup4_6b")].set_index("method")["ci_low"].round(3).to_dict()
    assert rate == {"item-clustered bootstrap percentile (1000 replicates; clusters: posts)": 0.258,  # shown in the report
                    "Wilson score (judgments treated as independent)": 0.260}  # kept, labelled, for recomputation
    length = fits[fits["analysis"] == "length:tldr:sup4_12b_t0.7"].set_index("term")
    assert length.loc["log_len_ratio", "estimate"] > 0 and length.loc["log_len_ratio", "n_clusters"] > 500
    manifest = artifacts.read_manifest(out)
    assert manifest["config"]["baselines"] == ["ref", "sup4_12b_t0.7"] and manifest["outputs"]["figures"] == 3
    assert sorted(i["path"].rsplit("/", 1)[-1] for i in manifest["inputs"]) == ["batch0_cnndm.json", "batch13.json", "batch18.json"]
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])


def test_length_control_lowers_the_rlhf_head_to_head(tmp_path):
    out = tmp_path / "rep"
    run_cli("report", "studies/openai_released", "--out", out, "--set", "report.n_boot=100", check=True)
    md = (out / "report.md").read_text()
    row = re.search(r"\| sup4_ppo_rm4_t\.7 \| ([0-9.]+) \| ([0-9.]+) \|", md)
    raw, controlled = float(row.group(1)), float(row.group(2))
    assert raw == round(598 / 832, 3) and controlled < raw - 0.05  # the paper: length control lowers RLHF's numbers


def test_report_without_judgments_is_a_clear_error(tmp_path):
    proc = run_cli("report", "studies/default", "--set", f"study.out_dir={tmp_path}", "--out", tmp_path / "r")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_likert_study_report(tmp_path):
    import csv

    import numpy as np
    from conftest import baseline_study

    from evalkit.study.exchange import import_answers

    settings = [f"study.out_dir={tmp_path}", "design.kind=likert", "design.items_per_policy=30", "labelers.count=3",
                "report.split="]
    tasks = baseline_study(tmp_path, *settings[1:])[1]["tasks"]
    rng = np.random.default_rng(0)
    answers = tmp_path / "answers.csv"
    with answers.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["task_id", "labeler_id", "overall", "accuracy", "coverage", "coherence"])
        w.writeheader()
        for t in tasks.itertuples():
            w.writerow({"task_id": t.task_id, "labeler_id": t.labeler_id, **{a: int(rng.integers(3, 8)) for a in ("overall", "accuracy", "coverage", "coherence")}})
    import_answers(tmp_path / "study", answers)
    out = tmp_path / "rep"
    run_cli("report", "studies/default", "--out", out, *[x for s in settings for x in ("--set", s)], "--set", "report.n_boot=100", check=True)
    md = (out / "report.md").read_text()
    assert "## Likert ratings (1–7)" in md and "Length-adjusted overall means" in md
    assert "Krippendorff's alpha (ordinal, overall rating)" in md
    assert (out / "likert_overall_vs_length.svg").is_file()
    assert "No comparisons with ref in this data." in md  # a Likert-only study has no pairwise comparisons


def test_report_with_reward_models(tmp_path):
    from evalkit.checkpoints import write_metadata

    folders = []
    for n_params, acc in ((1_000_000, 0.55), (4_000_000, 0.59)):
        f = tmp_path / f"rm{n_params}"
        f.mkdir()
        write_metadata(f, n_params=n_params, held_out_accuracy=acc, n_held_out=500)
        folders.append(str(f))
    out = tmp_path / "rep"
    run_cli("report", "studies/openai_released", "--out", out, "--set", "report.n_boot=50",
            "--set", "report.reward_models=" + ",".join(folders), check=True)
    md = (out / "report.md").read_text()
    assert "## Reward-model accuracy vs size" in md and "Accuracy gained per doubling of size: 2.00 points" in md


def tables_from_comparisons(comp):
    """Study tables whose pairwise judgments reproduce a comparisons frame (policy vs ref, one judgment per row)."""
    import pandas as pd

    from evalkit import artifacts

    gens, tasks, judg, items = [], [], [], {}
    for k, r in enumerate(comp.itertuples()):
        items[r.item_id] = {"item_id": r.item_id, "dataset": "tldr", "split": "valid2", "subreddit": "s", "title": "t",
                            "body": "post", "reference": " ".join(["r"] * int(r.len_baseline)), "source": "sim"}
        g_pol, g_ref = f"gp{k}", f"gr{k}"
        for gid, policy, kind, n, text in ((g_pol, r.policy_id, r.policy_kind, r.n_params, " ".join(["x"] * int(r.len_policy))),
                                           (g_ref, "ref", "ref", None, " ".join(["r"] * int(r.len_baseline)))):
            gens.append({"gen_id": gid, "item_id": r.item_id, "dataset": "tldr", "split": "valid2", "policy_id": policy,
                         "policy_kind": kind, "n_params": n, "checkpoint": None, "temperature": None, "top_p": None,
                         "seed": None, "sample_idx": 0, "text": text, "n_tokens": None, "hit_eos": None})
        tasks.append({"task_id": f"t{k}", "study_id": "sim", "kind": "pairwise", "item_id": r.item_id, "gen_id_left": g_pol,
                      "gen_id_right": g_ref, "is_swapped": False, "batch": 0, "labeler_id": "sim", "role": "main", "expected": None})
        judg.append({"judgment_id": f"j{k}", "task_id": f"t{k}", "labeler_id": "sim", "labeler_kind": "simulated",
                     "preferred": "left" if r.outcome else "right", "preferred_gen_id": g_pol if r.outcome else g_ref,
                     "confidence": 2 if r.outcome else 8, "overall": None, "accuracy": None, "coverage": None, "coherence": None,
                     "note": None, "submitted_at": None, "duration_s": None, "source": "sim"})
    return {"items": artifacts.conform(pd.DataFrame(list(items.values())), "items"),
            "generations": artifacts.conform(pd.DataFrame(gens), "generations"),
            "tasks": artifacts.conform(pd.DataFrame(tasks), "tasks"), "judgments": artifacts.conform(pd.DataFrame(judg), "judgments")}


def test_figure_1_from_a_study_with_sizes(tmp_path):
    import numpy as np
    from test_analysis import simulate_study

    from evalkit.report.build import build_report

    comp = simulate_study(np.random.default_rng(5), n_items=60)
    comp["len_policy"] = comp["len_policy"].round().clip(lower=1)
    paths = build_report(tables_from_comparisons(comp), tmp_path / "rep", "sizes", n_boot=100)
    md = paths["md"].read_text()
    assert "size_ref_tldr.png" in md and "SIMULATED panel, not people" in md
    fits = artifacts.read_table(paths["fits"], "fits")
    raw = fits[fits["analysis"] == "size:tldr:ref"].set_index("term")
    assert raw.loc["log_n_params", "n_clusters"] == 60 and raw.loc["log_n_params", "estimate"] > 0
    assert "size+length:tldr:ref" in set(fits["analysis"])
    assert (tmp_path / "rep" / "size_ref_tldr.svg").is_file()
