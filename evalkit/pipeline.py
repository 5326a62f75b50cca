"""Stages that write artifact folders, shared by the CLI and notebooks.

Each stage resolves its config and inputs, skips itself when ``manifest.json`` in its output folder has the same
fingerprint (same config, same input bytes) and every output exists, and otherwise writes every table atomically and
the manifest last, so an interrupted run is simply re-run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from evalkit import artifacts
from evalkit.config import StudyConfig
from evalkit.data import bundled_path, comparison_batch, load_items, load_openai_comparisons, load_openai_ppo_summaries
from evalkit.data.bundled import CNNDM_CSV, TLDR_CSV
from evalkit.data.openai import merge_tables

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


def study_items_of(cfg: StudyConfig) -> pd.DataFrame:
    """The items a study is about: its dataset split (the first ``n_items`` by id when set)."""
    items = load_items(cfg.data.dataset, cfg.data.split, cfg.data.path)
    if cfg.data.n_items:
        items = items.sort_values("item_id").head(cfg.data.n_items)
    return items.reset_index(drop=True)


def prepare_study_data(cfg: StudyConfig, force: bool = False) -> StageResult:
    """The study's items, the released human comparisons and external summaries, as one folder of tables.

    This is the part of ``evalkit run`` that exists before models are trained: it loads the study's items, imports the
    released human labels named in the spec and adds OpenAI's released 1.3B RLHF summaries as an external policy.
    """
    out_dir = cfg.out_dir / "data"
    comparison_paths = [comparison_batch(f) for f in cfg.released.comparisons]
    data_path = Path(cfg.data.path) if cfg.data.path else bundled_path(TLDR_CSV if cfg.data.dataset == "tldr" else CNNDM_CSV)
    inputs = [data_path, *comparison_paths]
    config = {"stage": "study-data", **cfg.to_dict()}
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


def generate_for_study(cfg: StudyConfig, items: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """The study's policies ([[policies]]) and baselines ([generate].baselines) on its items → ``<out>/generations``."""
    from evalkit.generate import Decoding, Policy, generate

    g = cfg.generate
    policies = [Policy.from_config(p) for p in cfg.policies]
    dec = Decoding(temperature=g.temperature, top_p=g.top_p, n_samples=g.n_samples, seed=g.seed, max_query_tokens=g.max_query_tokens or None)
    return generate(items, policies, cfg.out_dir / "generations", dec, g.baselines, batch_size=g.batch_size, progress=progress)


def answer_with_panel(cfg: StudyConfig, seed: int = 0):
    """Answer the study's built tasks with the calibrated simulated panel; its judgments (marked simulated) replace
    earlier simulated ones in ``judgments.parquet`` and keep every other judgment."""
    from evalkit.study.exchange import load_study_tables
    from evalkit.study.simulate import calibrate, simulate_judgments

    folder = cfg.out_dir / "study"
    tables = load_study_tables(folder)
    model = calibrate()
    model.save(folder / "panel_model.json")
    sim = simulate_judgments(model, tables, seed)
    target = folder / "judgments.parquet"
    if target.is_file():
        old = artifacts.read_table(target, "judgments")
        sim = pd.concat([old[old["labeler_kind"] != "simulated"], sim], ignore_index=True)
    artifacts.write_table(sim, target, "judgments")
    return sim, model


def simulate_study(cfg: StudyConfig, seed: int = 0):
    """Build the study's tasks, then answer them with the simulated panel."""
    from evalkit.study.build import build_study

    built = build_study(cfg)
    sim, model = answer_with_panel(cfg, seed)
    return built, sim, model


def report_study(cfg: StudyConfig, out_dir: str | Path | None = None) -> dict[str, Path]:
    """``evalkit report``: the study's judgments (or the released comparisons it names) → ``reports/<id>/``."""
    from evalkit.data import comparison_batch, load_openai_comparisons
    from evalkit.errors import EvalkitError
    from evalkit.generate import Policy
    from evalkit.models import read_metadata
    from evalkit.report.build import build_report
    from evalkit.study.exchange import load_study_tables
    from evalkit.train.best_of_n import read_best_of_n

    r = cfg.report
    if r.source == "released":
        tables = load_openai_comparisons([comparison_batch(b) for b in cfg.released.comparisons])
    elif r.source == "study":
        tables = load_study_tables(cfg.out_dir / "study")
        target = cfg.out_dir / "study" / "judgments.parquet"
        if not target.is_file():
            raise EvalkitError(f"no judgments at {target}; collect, import or simulate some first")
        tables["judgments"] = artifacts.read_table(target, "judgments")
    else:
        raise EvalkitError(f"{cfg.path}: report.source {r.source!r}; expected study or released")
    policy_kl = {}
    for policy in map(Policy.from_config, cfg.policies):  # PPO: the KL measured in training; best-of-N: log N - (N-1)/N
        spec = read_best_of_n(policy.checkpoint) if Path(policy.checkpoint).is_dir() else None
        kl = spec["kl_from_sft"] if spec else read_metadata(policy.checkpoint).get("final_kl")
        if kl is not None:
            policy_kl[policy.policy_id] = float(kl)
    out = Path(out_dir or f"reports/{cfg.id}")
    return build_report(tables, out, cfg.study.title or cfg.id, r.baselines, r.split or None, r.n_boot, cfg.study.seed,
                        config=cfg.to_dict(), reward_models=r.reward_models, policy_kl=policy_kl)
