"""`evalkit run`: every stage a spec declares (train → generate → build → label → report), cached and resumable."""

import io
import json
import os
import re
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from evalkit.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_default_study_quick_profile_end_to_end(tmp_path, monkeypatch):
    """The default study's --quick profile trains one real lineage at every kind (SmolLM2; Gemma's entry switched off),
    generates on TL;DR and CNN/DM, builds, simulates and reports with the size figure first; a re-run skips every
    stage and changes nothing."""
    monkeypatch.chdir(tmp_path)
    out = invoke("run", ROOT / "studies/default", "--quick")
    run_dir, report = tmp_path / "runs/default-quick", tmp_path / "reports/default-quick"
    for name in ("pretrained-smollm2", "sft-smollm2", "ppo-smollm2", "bo2-smollm2"):
        assert name in out
    assert "gemma" not in out
    gens = pd.read_parquet(run_dir / "generations/generations.parquet")
    assert set(gens["dataset"]) == {"tldr", "cnndm"}
    assert {"ref", "lead3", "openai-ppo-1.3b", "sft-smollm2", "bo2-smollm2"} <= set(gens["policy_id"])
    tasks = pd.read_parquet(run_dir / "study/tasks.parquet")
    assert set(tasks["item_id"].str.split("-").str[0]) == {"tldr", "cnndm"}
    # the report opens with the paper's Figure 1: preference vs size, with its numbers and whose labels they are
    md = (report / "report.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## Headline: tldr summaries preferred to ref, by model size")
    first = md.split("## ")[1]
    # a rate with its interval, or (the quick profile's few judgments) the counts without one
    assert "SIMULATED" in first and "preferred to ref" in first and ("], n=" in first or "too few judgments for a rate" in first) and "![" in first
    assert (report / "figure1_tldr.png").is_file() and "Sample summaries" in sections[1]
    headline = [line for line in out.splitlines() if "preferred to the reference" in line]
    assert len(headline) >= 3
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert set(stages) == {"data", "train", "generate", "build", "labels", "report"} and all(s["seconds"] >= 0 for s in stages.values())

    before = {p: p.read_bytes() for p in [run_dir / "generations/generations.parquet", run_dir / "study/judgments.parquet", report / "report.md"]}
    again = invoke("run", ROOT / "studies/default", "--quick")
    for stage in ("train", "generate", "build", "labels", "report"):
        assert f"[{stage}] up to date" in again
    assert {p: p.read_bytes() for p in before} == before


SPEC = """
[study]
id = "resume"
seed = 3
simulate = true
out_dir = "{out}"

[data]
n_items = 8
transfer = "cnndm"
transfer_items = 4

[released]
comparisons = []

[[train]]
preset = "tiny"
depths = [1]
set = ["pretrain_steps=10", "sft_steps=4", "ppo_iterations=3", "ppo_rollouts=4", "ppo_minibatch=4", "best_of_n=2",
       "eval_posts=4", "bon_eval_posts=4", "rm_max_pairs=16"]

[generate]
batch_size = 3
baselines = ["ref", "lead3"]

[design]
items_per_policy = 8

[labelers]
count = 3
"""


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Generations and judgments by what they are about (gen ids hash the checkpoint's own manifest, which differs
    between two training runs by its timestamps)."""
    gens = pd.read_parquet(run_dir / "generations/generations.parquet")
    judg = pd.read_parquet(run_dir / "study/judgments.parquet")
    tasks = pd.read_parquet(run_dir / "study/tasks.parquet")
    label = gens.set_index("gen_id")["policy_id"]
    judg = judg.merge(tasks[["task_id", "item_id", "gen_id_left", "gen_id_right", "role"]], on="task_id")
    judg = pd.DataFrame({"item_id": judg["item_id"], "labeler_id": judg["labeler_id"], "role": judg["role"],
                         "left": judg["gen_id_left"].map(label), "right": judg["gen_id_right"].map(label),
                         "preferred": judg["preferred"]})
    return {"generations": gens[["policy_id", "item_id", "sample_idx", "text"]].sort_values(["policy_id", "item_id"]).reset_index(drop=True),
            "judgments": judg.dropna(subset=["left"]).sort_values(list(judg.columns)).reset_index(drop=True)}


# where `evalkit run` is SIGKILLed: the first output line that shows it inside each stage
KILL_POINTS = (
    ("train", re.compile(r"ppo 2: score")),                      # mid-PPO, after pretraining, SFT and the RM
    ("generate", re.compile(r"\[generate\] running|\b[1-9]\d*/\d+ \[")),  # generation started / a batch decoded
    ("build", re.compile(r"\[build\] running")),
    ("labels", re.compile(r"\[labels\] running")),
    ("report", re.compile(r"\[report\] running")),
)


def _kill_at(spec: Path, pattern: re.Pattern, cwd: Path) -> str:
    """Run ``evalkit run spec`` in its own process and SIGKILL it at the first output line matching ``pattern``."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-u", "-m", "evalkit", "run", str(spec)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:  # tqdm's carriage returns end lines too (universal newlines)
        seen.append(line)
        if pattern.search(line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait() == -signal.SIGKILL, "".join(seen[-20:])  # killed, not finished or failed
    return "".join(seen)


def _nothing_half_written(*roots: Path) -> list[str]:
    """Every file a reader would take as finished parses whole; return the temp files a killed writer left."""
    import pyarrow.parquet as pq
    from safetensors import safe_open

    temps = []
    for root in roots:
        for f in (p for p in root.rglob("*") if p.is_file()):
            if f.name.startswith(".") or ".building-" in str(f) or ".old-" in str(f):
                temps.append(str(f.relative_to(root)))
            elif f.suffix == ".parquet":
                pq.read_table(f)
            elif f.suffix == ".json":
                json.loads(f.read_text("utf-8"))
            elif f.suffix == ".safetensors" and (f.parent / "manifest.json").is_file():  # a finished checkpoint
                with safe_open(str(f), "pt") as fh:
                    [fh.get_tensor(k) for k in fh.keys()]
    return temps


@pytest.mark.slow
def test_run_sigkilled_in_every_stage_resumes_to_what_an_uninterrupted_run_writes(tmp_path, monkeypatch):
    """`evalkit run` SIGKILLed inside training (mid-PPO), generation, study build, the simulated labels and the
    report, then run again each time: every file left behind is whole (or a temp file the next run removes), and the
    final generations, judgments and fits equal an uninterrupted run's."""
    monkeypatch.chdir(tmp_path)
    specs = {}
    for name in ("whole", "broken"):
        specs[name] = tmp_path / f"{name}.toml"
        specs[name].write_text(SPEC.format(out=tmp_path / name))
    invoke("run", specs["whole"])
    report = tmp_path / "reports/resume"  # both runs' study id: the broken run's report replaces the whole run's
    whole_report = {p.name: p.read_bytes() for p in report.iterdir()}
    broken = tmp_path / "broken"
    for stage, pattern in KILL_POINTS:
        out = _kill_at(specs["broken"], pattern, tmp_path)
        assert f"[{stage}] running" in out, out[-2000:]
        assert f"[{stage}] up to date" not in out
        _nothing_half_written(broken, tmp_path / "reports")
    # killed while writing its own, the run left the previous report in place, whole
    assert {p.name: p.read_bytes() for p in report.iterdir()} == whole_report
    out = invoke("run", specs["broken"])
    assert "[train] up to date" in out and "[labels] up to date" in out  # finished stages are kept, not redone
    assert _nothing_half_written(broken, tmp_path / "reports") == []  # the killed writers' temp files are gone
    whole, resumed = _tables(tmp_path / "whole"), _tables(broken)
    pd.testing.assert_frame_equal(whole["generations"], resumed["generations"])
    pd.testing.assert_frame_equal(whole["judgments"], resumed["judgments"])
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(whole_report["fits.parquet"])), pd.read_parquet(report / "fits.parquet"))
    # the same numbers, word for word (where the text names its run's folder, the folders differ)
    assert (report / "report.md").read_text().replace(str(broken), str(tmp_path / "whole")) == whole_report["report.md"].decode()


def test_run_stops_for_labels_when_not_simulated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "study.toml"
    spec.write_text(textwrap.dedent(f"""
        [study]
        id = "real-labels"
        out_dir = "{tmp_path / 'run'}"
        [data]
        n_items = 6
        [released]
        comparisons = []
        [generate]
        baselines = ["ref", "openai-ppo-1.3b"]
        [design]
        items_per_policy = 6
        """))
    out = invoke("run", spec)
    assert "has no judgments yet" in out and "evalkit study serve" in out and "report:" not in out
    assert (tmp_path / "run/study/tasks.parquet").is_file()


def test_released_study_runs_through_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = invoke("run", ROOT / "studies/openai_released", "--set", "report.n_boot=50")
    assert "report: reports/openai_released/report.html" in out
    assert (tmp_path / "reports/openai_released/report.md").is_file()


def test_quick_needs_a_profile_and_train_overrides_are_checked(tmp_path):
    from evalkit.config import load_study
    from evalkit.errors import EvalkitError

    spec = tmp_path / "study.toml"
    spec.write_text("[study]\nid = 'x'\n")
    with pytest.raises(EvalkitError, match="--quick needs a study.quick"):
        load_study(spec, quick=True)
    with pytest.raises(EvalkitError, match=r"train.N.key with N below 2"):
        load_study(ROOT / "studies/default", ["train.5.preset=tiny"])
    with pytest.raises(EvalkitError, match="train\\[0\\].kinds has 'rlhf'"):
        load_study(ROOT / "studies/default", ["train.0.kinds=rlhf"])
    cfg = load_study(ROOT / "studies/default", ["train.1.kinds=pretrained"])
    assert cfg.train[1].kinds == ("pretrained",) and cfg.train[0].kinds == ("pretrained", "sft", "ppo", "best_of_n")
    # the quick profile's run and report folders are the config's own, beside the full study's
    quick = load_study(ROOT / "studies/default", quick=True)
    assert quick.out_dir == Path("runs/default-quick") and quick.report_dir == Path("reports/default-quick")
    moved = load_study(ROOT / "studies/default", ["report.out_dir=elsewhere/r"], quick=True)
    assert moved.report_dir == Path("elsewhere/r-quick") and load_study(ROOT / "studies/default").report_dir == Path("reports/default")


def test_a_stage_reruns_only_when_what_it_reads_changes(tmp_path, monkeypatch):
    """Each stage's key covers only the part of the spec it reads: a report setting re-runs the report alone (the
    built study and its labels are kept), a design setting re-builds and re-labels but does not re-generate."""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "study.toml"
    spec.write_text(textwrap.dedent(f"""
        [study]
        id = "keys"
        seed = 5
        simulate = true
        out_dir = "{tmp_path / 'run'}"
        [data]
        n_items = 8
        [released]
        comparisons = []
        [generate]
        baselines = ["ref", "lead3", "openai-ppo-1.3b"]
        [design]
        items_per_policy = 8
        [labelers]
        count = 3
        judge = "features"
        [report]
        n_boot = 50
        """))
    invoke("run", spec)
    judgments = (tmp_path / "run/study/judgments.parquet").read_bytes()
    out = invoke("run", spec, "--set", "report.n_boot=60")
    assert "[data] up to date" in out
    for stage in ("generate", "build", "labels"):
        assert f"[{stage}] up to date" in out, out
    assert "[report] running" in out
    assert (tmp_path / "run/study/judgments.parquet").read_bytes() == judgments
    out = invoke("run", spec, "--set", "report.n_boot=60", "--set", "design.gold_fraction=0.2")
    assert "[generate] up to date" in out and "[build] running" in out and "[labels] running" in out and "[report] running" in out
    # the simulated labels are drawn with the study's seed (recorded in the labels stage's key)
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["stages"]["labels"]["skipped"] is False
