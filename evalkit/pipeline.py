"""Stages that write artifact folders, shared by the CLI and notebooks.

Each stage resolves its config and inputs, skips itself when ``manifest.json`` in its output folder has the same
fingerprint (same config, same input bytes) and every output exists, and otherwise writes every table atomically and
the manifest last, so an interrupted run is simply re-run.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from evalkit import artifacts
from evalkit.checkpoints import read_metadata
from evalkit.config import StudyConfig, load_study
from evalkit.data import bundled_path, comparison_batch, load_openai_comparisons, load_openai_ppo_summaries
from evalkit.data.bundled import CNNDM_CSV, TLDR_CSV
from evalkit.data.openai import merge_tables
from evalkit.data.tldr import OPENAI_PPO_FAMILY, OPENAI_PPO_POLICY
from evalkit.errors import EvalkitError
from evalkit.generate import Policy, checkpoint_fingerprint, generate
from evalkit.judges import LengthJudge, evaluator_table, make_judge
from evalkit.report.build import build_report
from evalkit.study.build import build_study
from evalkit.study.exchange import load_study_tables
from evalkit.study.items import read_judgments, study_items_of, transfer_items_of
from evalkit.study.simulate import PANEL_VALIDATION, calibrate, panel_row, simulate_judgments
from evalkit.train.best_of_n import read_best_of_n
from evalkit.train.ladder import format_summary, ladder_checkpoints, run_ladder
from evalkit.train.presets import ladder_config, ladder_dict, lineage_digest, size_family, size_names
from evalkit.vocab import LADDER_STAGES, ladder_policy_id

log = logging.getLogger(__name__)

TABLES = ("items", "generations", "tasks", "judgments")


@dataclass
class StageResult:
    out_dir: Path
    tables: dict[str, pd.DataFrame]
    skipped: bool


def _write_tables(out_dir: Path, tables: dict[str, pd.DataFrame], manifest: dict) -> None:
    for name in TABLES:
        artifacts.write_table(tables[name], out_dir / f"{name}.parquet", name)
    artifacts.write_manifest(out_dir, manifest)


def _read_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: artifacts.read_table(out_dir / f"{name}.parquet", name) for name in TABLES}


def import_openai(files: Iterable[str], out_dir: str | Path, force: bool = False) -> StageResult:
    """Released comparison files (paths or bundled short names) → items, generations, tasks, judgments in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [comparison_batch(f) for f in files]
    config = {"stage": "import-openai", "files": [p.name for p in paths]}
    outputs = [f"{n}.parquet" for n in TABLES]
    if not force and artifacts.up_to_date(out_dir, config, paths, outputs):
        log.info("%s is up to date; skipping", out_dir)
        return StageResult(out_dir, _read_tables(out_dir), skipped=True)
    tables = load_openai_comparisons(paths)
    manifest = artifacts.build_manifest("openai-comparisons", config, inputs=paths,
                                        outputs={n: len(t) for n, t in tables.items()})
    _write_tables(out_dir, tables, manifest)
    return StageResult(out_dir, tables, skipped=False)


def prepare_study_data(cfg: StudyConfig, force: bool = False) -> StageResult:
    """The study's items, the released human comparisons and external summaries, as one folder of tables.

    This is the part of ``evalkit run`` that exists before models are trained: it loads the study's items, imports the
    released human labels named in the spec and adds OpenAI's released 1.3B RLHF summaries as an external policy.
    """
    out_dir = cfg.layout.data_dir
    comparison_paths = [comparison_batch(f) for f in cfg.released.comparisons]
    data_path = Path(cfg.data.path) if cfg.data.path else bundled_path(TLDR_CSV if cfg.data.dataset == "tldr" else CNNDM_CSV)
    inputs = [data_path, *comparison_paths]
    spec = cfg.to_dict()
    config = {"stage": "study-data", "data": spec["data"], "released": spec["released"]}  # all it reads
    outputs = [f"{n}.parquet" for n in TABLES]
    if not force and artifacts.up_to_date(out_dir, config, inputs, outputs):
        log.info("%s is up to date; skipping", out_dir)
        return StageResult(out_dir, _read_tables(out_dir), skipped=True)

    items = study_items_of(cfg)
    parts = []
    if comparison_paths:
        parts.append(load_openai_comparisons(comparison_paths))
    empty = {name: artifacts.empty_table(name) for name in TABLES}
    gens = empty["generations"]
    if cfg.released.external_summaries and cfg.data.dataset == "tldr" and not cfg.data.path:
        gens = load_openai_ppo_summaries(cfg.data.split)
        gens = gens[gens["item_id"].isin(items["item_id"])]
    study_items = {**empty, "items": items.drop(columns=[c for c in items.columns if c == "source_id"]), "generations": gens}
    tables = merge_tables([study_items, *parts])
    manifest = artifacts.build_manifest("study-data", config, inputs=inputs, seeds={"study": cfg.study.seed},
                                        outputs={n: len(t) for n, t in tables.items()})
    _write_tables(out_dir, tables, manifest)
    return StageResult(out_dir, tables, skipped=False)


# ------------------------------------------------------------------------------------------------------- training

@functools.lru_cache(maxsize=16)  # a run asks for it in every stage; the spec is frozen
def study_ladders(cfg: StudyConfig) -> tuple[tuple, ...]:
    """Each ``[[train]]`` ladder as ``(TrainConfig, LadderConfig, folder)``. A folder is named by its lineages (bases,
    depths); inside it each stage is kept or made again by its own key, so a changed trainer setting re-trains the
    stage it belongs to and what is built on it, never checkpoints it does not touch."""
    def stages(kinds: set[str]) -> str:  # SFT and an RM under PPO and best-of-N
        return ",".join(s for s in LADDER_STAGES if s in kinds or (s in ("sft", "rm") and kinds & {"ppo", "best_of_n"}))

    out = []
    for t in (t for t in cfg.train if t.kinds):  # an entry with no kinds is switched off
        ladder = ladder_config(t.preset, t.depths or None, t.bases or None, (*t.set, f"stages={stages(set(t.kinds))}"))
        out.append((t, ladder, Path(t.out_dir) if t.out_dir else cfg.layout.ladder_dir(lineage_digest(ladder))))
    return tuple(out)


def train_for_study(cfg: StudyConfig, echo=print) -> list[dict]:
    """Run (or resume) the study's ladders; each summary's ``ran`` lists the stages that ran this time."""
    summaries = []
    for _, ladder, out in study_ladders(cfg):
        summary = run_ladder(ladder, out)
        for line in format_summary(summary["summary"]) if summary.get("ran") else []:
            echo("  " + line)
        summaries.append({**summary, "out_dir": out})
    return summaries


def _ladder_policies(cfg: StudyConfig) -> list[tuple]:
    """The ladders' policies (named ``<kind>-<size>``) with their ladder size: ``(Policy, size)``."""
    out = []
    for t, ladder, folder in study_ladders(cfg):
        for row in ladder_checkpoints(ladder, folder):
            if row["kind"] not in t.kinds:
                continue
            n = read_best_of_n(row["checkpoint"])["n"] if row["kind"] == "best_of_n" else None
            out.append((Policy(ladder_policy_id(row["kind"], row["size"], n), row["checkpoint"]), row["size"]))
    return out


def study_families(cfg: StudyConfig) -> dict[str, str]:
    """Each known policy's model family (ladder sizes and OpenAI's released summaries); [[policies]] have none."""
    return {**{p.policy_id: size_family(size) for p, size in _ladder_policies(cfg)}, OPENAI_PPO_POLICY: OPENAI_PPO_FAMILY}


def study_policies(cfg: StudyConfig) -> list:
    """Every checkpoint policy of the study: the ladder's (named ``<kind>-<size>``) then ``[[policies]]``."""
    policies = [p for p, _ in _ladder_policies(cfg)]
    policies += [Policy.from_config(p) for p in cfg.policies]
    ids = [p.policy_id for p in policies]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise EvalkitError(f"{cfg.path}: policy id {dup!r} is used twice (ladder policies are named <kind>-<size>)")
    return policies


def study_reward_models(cfg: StudyConfig) -> list[str]:
    """The ladder's reward models (for accuracy vs size) plus any the report section names."""
    rms = [str(out / n / "rm") for _, ladder, out in study_ladders(cfg) for n in size_names(ladder) if (out / n / "rm" / "manifest.json").is_file()]
    return rms + [r for r in cfg.report.reward_models if r not in rms]


def generate_for_study(cfg: StudyConfig, items: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """The study's policies (ladder and [[policies]]) and baselines ([generate].baselines) on its items and on its
    transfer items → ``<out>/generations``."""
    g = cfg.generate
    policies = study_policies(cfg)
    transfer = transfer_items_of(cfg)
    if len(transfer):
        items = pd.concat([items, transfer], ignore_index=True)
    return generate(items, policies, cfg.layout.generations_dir, g.decoding(), g.baselines, batch_size=g.batch_size, progress=progress)


def answer_with_panel(cfg: StudyConfig, seed: int = 0):
    """Answer the study's built tasks with the calibrated simulated panel; its judgments (marked simulated) replace
    earlier simulated ones in ``judgments.parquet`` and keep every other judgment."""
    folder = cfg.layout.study_dir
    tables = load_study_tables(folder)
    judge = make_judge(cfg.labelers.judge)
    model = calibrate(judge, seed)
    model.save(folder / "panel_model.json")
    validation = evaluator_table([LengthJudge(), judge] if judge.judge_id != "length" else [judge],
                                 extra_rows=[lambda pairs, gpt4: panel_row(model, judge, pairs, gpt4, seed)])
    artifacts.atomic_write(folder / PANEL_VALIDATION, lambda tmp: validation.to_csv(tmp, index=False))
    sim = simulate_judgments(model, judge, tables, seed)
    target = folder / "judgments.parquet"
    if target.is_file():
        old = read_judgments(target)
        sim = pd.concat([old[old["labeler_kind"] != "simulated"], sim], ignore_index=True)
    artifacts.write_table(sim, target, "judgments")
    return sim, model


def simulate_study(cfg: StudyConfig, seed: int = 0):
    """Build the study's tasks, then answer them with the simulated panel."""
    built = build_study(cfg)
    sim, model = answer_with_panel(cfg, seed)
    return built, sim, model


def report_study(cfg: StudyConfig, out_dir: str | Path | None = None) -> dict[str, Path]:
    """``evalkit report``: the study's judgments (or the released comparisons it names) → ``reports/<id>/``."""
    r = cfg.report
    inputs: list[Path] = []
    if r.source == "released":
        inputs = [comparison_batch(b) for b in cfg.released.comparisons]
        tables = load_openai_comparisons(inputs)
    elif r.source == "study":
        tables = load_study_tables(cfg.layout.study_dir)
        target = cfg.layout.judgments
        if not target.is_file():
            raise EvalkitError(f"no judgments at {target}; collect, import or simulate some first")
        tables["judgments"] = artifacts.read_table(target, "judgments")
        inputs = [cfg.layout.study_table(n) for n in ("items", "generations", "tasks", "judgments")]
    else:
        raise EvalkitError(f"{cfg.path}: report.source {r.source!r}; expected study or released")
    policy_kl = {}
    for policy in study_policies(cfg):  # PPO: the KL measured in training; best-of-N: log N - (N-1)/N
        spec = read_best_of_n(policy.checkpoint) if Path(policy.checkpoint).is_dir() else None
        kl = spec["kl_from_sft"] if spec else read_metadata(policy.checkpoint).get("final_kl")
        if kl is not None:
            policy_kl[policy.policy_id] = float(kl)
    out = Path(out_dir or cfg.report_dir)
    with warnings.catch_warnings():  # separated or rank-deficient fits are said in the report's words, not as warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", module="statsmodels")
        return build_report(tables, out, cfg.study.title or cfg.id, r.baselines, r.split or None, r.n_boot, cfg.study.seed,
                            config=cfg.to_dict(), reward_models=tuple(study_reward_models(cfg)), policy_kl=policy_kl,
                            primary_dataset=cfg.data.dataset, inputs=tuple(inputs),
                            policy_family=study_families(cfg) if r.source == "study" else None, labels=r.labels,
                            panel_validation=cfg.layout.study_dir / PANEL_VALIDATION if r.source == "study" else None,
                            quality=cfg.quality, include_excluded=r.include_excluded)


# ------------------------------------------------------------------------------------------------------- evalkit run

RUN_STAGES = ("data", "train", "generate", "build", "labels", "report")


def _study_files(cfg: StudyConfig) -> list[Path]:
    return [cfg.layout.study_table(n) for n in ("tasks", "generations", "items")]


def run_study(cfg: StudyConfig, force: bool = False, echo=print) -> dict:
    """``evalkit run``: every stage the spec declares, in order — study data → ladder training → generation (study
    items and transfer items) → study build → labels (the simulated panel when ``simulate``) → report.

    Each stage is keyed by its config and the hashes of its inputs, recorded in ``<out>/run.json`` with its timing when
    it finishes; a re-run skips stages whose key and outputs are unchanged, and an interrupted run resumes (training
    and generation also resume inside the stage: finished checkpoints and written generation parts are kept).
    """
    run_path = cfg.layout.run_json
    try:
        previous = json.loads(run_path.read_text("utf-8")).get("stages", {}) if run_path.is_file() else {}
    except json.JSONDecodeError:
        previous = {}
    record: dict[str, dict] = {}
    started = time.perf_counter()
    result: dict = {"stages": record, "run_json": run_path}

    def whole(outputs: list[Path], hashes: dict) -> bool:  # outputs as this run left them (not truncated or edited)
        return all(p.is_file() and hashes.get(str(p)) == artifacts.sha256_file(p) for p in outputs)

    def step(name: str, config: dict, inputs: list[Path], fn, outputs: list[Path] = (), done=lambda: True):
        key = artifacts.fingerprint(json.loads(json.dumps(config, default=str)), artifacts.describe_inputs([p for p in inputs if Path(p).is_file()]))
        prev = previous.get(name, {})
        if not force and prev.get("key") == key and done() and whole(list(outputs), prev.get("outputs", {})):
            record[name] = {**prev, "skipped": True}
            echo(f"[{name}] up to date (skipped; took {prev.get('seconds', 0):.0f}s when it ran)")
            return None
        echo(f"[{name}] running ({RUN_STAGES.index(name) + 1}/{len(RUN_STAGES)}; {time.perf_counter() - started:.0f}s elapsed)")
        t0 = time.perf_counter()
        out = fn()
        record[name] = {"key": key, "seconds": round(time.perf_counter() - t0, 1), "skipped": False,
                        "outputs": {str(p): artifacts.sha256_file(p) for p in outputs if Path(p).is_file()}}
        artifacts.write_json(run_path, {"study": cfg.id, "stages": {**previous, **record}})
        return out

    spec = cfg.to_dict()
    res = prepare_study_data(cfg, force=force)
    record["data"] = {"skipped": res.skipped, "seconds": round(time.perf_counter() - started, 1)}
    echo(f"[data] {'up to date' if res.skipped else 'written'}: {res.out_dir}")

    ladders = study_ladders(cfg)
    if ladders:
        step("train", {"ladders": [[ladder_dict(lc), str(d)] for _, lc, d in ladders]}, [], lambda: train_for_study(cfg, echo),
             done=lambda: all(_ladder_complete(d) for _, _, d in ladders))
        result["ladder_dirs"] = [d for _, _, d in ladders]

    report_dir = cfg.report_dir
    if cfg.report.source == "released":  # a report on the released labels alone: nothing to generate or label
        return _run_report(cfg, step, report_dir, [], result, started)
    items = study_items_of(cfg)
    policies = study_policies(cfg)
    gen_path = cfg.layout.generations
    if policies or cfg.generate.baselines:
        gen_key = {"generate": spec["generate"], "data": spec["data"],
                   "policies": [[p.policy_id, p.checkpoint, checkpoint_fingerprint(p.checkpoint)] for p in policies]}
        step("generate", gen_key, [], lambda: generate_for_study(cfg, items, progress=True), [gen_path])
    result["policies"] = [p.policy_id for p in policies]

    if not gen_path.is_file():
        echo("no generations: declare [[policies]], a [train] ladder or [generate].baselines to build a study")
        return result

    # each stage's key covers only the parts of the spec it reads: a report setting never re-keys the study build
    build_key = {"stage": "study-build", "data": spec["data"], "design": spec["design"], "labelers": spec["labelers"],
                 "seed": cfg.study.seed, "out": str(cfg.out_dir)}
    step("build", build_key, [gen_path], lambda: build_study(cfg), _study_files(cfg))
    judgments = cfg.layout.judgments
    if cfg.study.simulate:
        step("labels", {"simulate": True, "seed": cfg.study.seed, "judge": cfg.labelers.judge}, _study_files(cfg), lambda: answer_with_panel(cfg, cfg.study.seed), [judgments])
    elif not judgments.is_file():
        result["waiting_for_labels"] = True
        echo(f"[labels] the study is built in {cfg.layout.study_dir} and has no judgments yet. Collect them with "
             f"`evalkit study serve {cfg.path}` (labelers in a browser) or `evalkit study export` / `evalkit study import`, "
             f"or set study.simulate = true for a dry run; then run `evalkit run {cfg.path}` again for the report.")
        return result
    return _run_report(cfg, step, report_dir, [*_study_files(cfg), judgments], result, started)


def _run_report(cfg: StudyConfig, step, report_dir: Path, inputs: list[Path], result: dict, started: float) -> dict:
    spec = cfg.to_dict()
    rms = study_reward_models(cfg)
    report_key = {"report": spec["report"], "study": spec["study"], "released": spec["released"], "rms": rms, "out": str(report_dir)}
    if cfg.report.source == "released":
        inputs = [comparison_batch(b) for b in cfg.released.comparisons]
    paths = step("report", report_key, [*inputs, *[Path(r) / "manifest.json" for r in rms]], lambda: report_study(cfg, report_dir),
                 [report_dir / n for n in ("report.html", "report.md", "fits.parquet", "manifest.json")])
    manifest = artifacts.read_manifest(report_dir) or {}
    result["report"] = report_dir / "report.html"
    result["headline"] = (paths or {}).get("headline") if paths else manifest.get("headline", [])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _ladder_complete(ladder_dir: Path) -> bool:
    path = ladder_dir / "ladder.json"
    try:
        return path.is_file() and "summary" in json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return False


@dataclass(frozen=True)
class RunRecord:
    """What ``run`` did: each stage's record (its key, seconds, whether it was skipped, its outputs' hashes), the
    policies, the ladder folders, the report and its headline rates; ``waiting_for_labels`` when a study without a
    simulated panel has no judgments yet."""

    study: StudyConfig
    stages: dict[str, dict]
    run_json: Path
    policies: list[str] = field(default_factory=list)
    ladder_dirs: list[Path] = field(default_factory=list)
    report: Path | None = None
    headline: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    waiting_for_labels: bool = False


def run(spec: str | Path | StudyConfig = "studies/default", overrides: Iterable[str] = (), quick: bool = False,
        force: bool = False, echo=print) -> RunRecord:
    """``evalkit run`` for a notebook and the CLI alike: a study spec (a folder, its study.toml, or a loaded
    ``StudyConfig``) run through every stage it declares; see ``run_study``."""
    cfg = spec if isinstance(spec, StudyConfig) else load_study(spec, list(overrides), quick=quick)
    result = run_study(cfg, force=force, echo=echo)
    return RunRecord(study=cfg, stages=result["stages"], run_json=result["run_json"], policies=result.get("policies", []),
                     ladder_dirs=result.get("ladder_dirs", []), report=result.get("report"), headline=result.get("headline") or [],
                     seconds=result.get("seconds", 0.0), waiting_for_labels=bool(result.get("waiting_for_labels")))
