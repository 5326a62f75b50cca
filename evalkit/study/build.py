"""``evalkit study build``: generations → labeling tasks, with the study hygiene chosen by code, not by hand.

- Items are balanced across policies: every policy is evaluated on the same items where their generations allow.
- Left/right order is decided per task by a seed derived from (study, task) and recorded as ``is_swapped``.
- ``overlap_fraction`` of the main tasks go to ``overlap_labelers`` labelers each (``role="overlap"``; copies share
  a ``unit_id``), for labeler–labeler agreement.
- Gold tasks (a summary of a different post against the right one) and attention tasks (the reference with its
  words shuffled against the reference) have a known answer in ``expected`` (the correct side).
- Sentinel pairs (``sentinel_policy`` vs the baseline) recur in every batch to detect drift.
- Nothing a labeler sees names a policy: tasks carry only generation ids.
Same spec and seed → byte-identical tables.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evalkit import artifacts
from evalkit.config import StudyConfig
from evalkit.data.openai import imported_gen_id
from evalkit.errors import EvalkitError
from evalkit.seeds import derive_seed, rng_for, stable_hash
from evalkit.study.items import read_judgments, study_items_of, transfer_items_of
from evalkit.study.serve import collect_judgments

log = logging.getLogger(__name__)

QC_POLICIES = {"gold": "qc-other-post", "attention": "qc-shuffled-words"}


def labeler_ids(cfg: StudyConfig) -> list[str]:
    ids = list(cfg.labelers.ids) or [f"labeler-{i + 1:02d}" for i in range(cfg.labelers.count)]
    if len(set(ids)) != len(ids) or not ids:
        raise EvalkitError(f"{cfg.path}: labelers must be distinct and at least one; got {ids}")
    return ids


def _qc_generation(kind: str, item: dict, text: str) -> dict:
    policy = QC_POLICIES[kind]
    return {"gen_id": "gen-" + stable_hash("qc", policy, item["item_id"], text), "item_id": item["item_id"],
            "dataset": item["dataset"], "split": item["split"], "policy_id": policy, "policy_kind": "external",
            "n_params": None, "checkpoint": None, "temperature": None, "top_p": None, "seed": None, "sample_idx": 0,
            "text": text, "n_tokens": None, "hit_eos": None}


def _task(study_id: str, kind: str, item_id: str, first: str, second: str | None, role: str, unit: str,
          expected_gen: str | None = None) -> dict:
    """A task with its seeded left/right order; ``expected`` names the side of ``expected_gen``."""
    swapped = second is not None and derive_seed(study_id, "swap", unit) % 2 == 1  # unit ids already hash the seed
    left, right = (second, first) if swapped else (first, second)
    expected = None
    if expected_gen is not None:
        expected = "left" if expected_gen == left else "right"
    return {"study_id": study_id, "kind": kind, "item_id": item_id, "gen_id_left": left, "gen_id_right": right,
            "is_swapped": swapped, "role": role, "expected": expected, "unit_id": unit}


@dataclass(frozen=True)
class _Plan:
    """What one dataset's tasks are built from: the kind, the baseline, the policies compared, the labelers, the seed
    key, and each (policy, item)'s first generation."""

    study_id: str
    key: str  # every seeded choice derives from the study, its seed (and the transfer dataset)
    kind: str
    dataset: str
    transfer: bool
    baseline: str
    policies: list[str]
    labelers: list[str]
    by: pd.Series  # (policy_id, item_id) -> gen_id of its first sample
    known: list[str]


def _plan(cfg: StudyConfig, generations: pd.DataFrame, dataset: str | None) -> _Plan:
    """The spec's design checked against the generations at hand (the spec's own values were checked when it was
    loaded: ``config.validate_study``)."""
    design = cfg.design
    transfer = dataset is not None and dataset != cfg.data.dataset
    dataset = dataset or cfg.data.dataset
    key = f"{cfg.id}:{cfg.study.seed}" + (f":{dataset}" if transfer else "")
    kind = "pairwise" if transfer else design.kind or ("likert" if dataset == "cnndm" else "pairwise")
    gens = generations[generations["dataset"] == dataset]
    known = sorted(gens["policy_id"].unique())
    baseline = design.baseline
    if kind == "pairwise" and baseline not in known:
        raise EvalkitError(f"{cfg.path}: baseline policy {baseline!r} has no generations; known: {', '.join(known) or 'none'}")
    policies = [p for p in design.policies if p in known] if transfer and design.policies else list(design.policies) or [p for p in known if p != baseline]
    for p in policies + ([design.sentinel_policy] if design.sentinel_policy and not transfer else []):
        if p not in known:
            raise EvalkitError(f"{cfg.path}: unknown policy {p!r}; known: {', '.join(known)}")
    if not policies:
        raise EvalkitError(f"{cfg.path}: no policies to evaluate besides the baseline {baseline!r}")
    labelers = labeler_ids(cfg)
    if design.overlap_fraction > 0 and design.overlap_labelers > len(labelers):
        raise EvalkitError(f"{cfg.path}: overlap needs {design.overlap_labelers} labelers but the study has {len(labelers)}")
    first = gens.sort_values(["policy_id", "item_id", "sample_idx"]).drop_duplicates(["policy_id", "item_id"])
    return _Plan(cfg.id, key, kind, dataset, transfer, baseline, policies, labelers, first.set_index(["policy_id", "item_id"])["gen_id"], known)


def _main_units(cfg: StudyConfig, plan: _Plan) -> tuple[list[str], list[dict]]:
    """1. items, balanced: the items every policy (and the baseline) has, in a seeded order; one unit per policy and
    item (Likert: the baseline is rated too). Returns (the chosen items, the units)."""
    design = cfg.design
    items_of = plan.by.reset_index()
    item_sets = {p: set(items_of.loc[items_of["policy_id"] == p, "item_id"]) for p in plan.policies}
    base_items = set(items_of.loc[items_of["policy_id"] == plan.baseline, "item_id"]) if plan.kind == "pairwise" else None
    shared = set.intersection(*item_sets.values()) & (base_items if base_items is not None else set.intersection(*item_sets.values()))
    order = sorted(shared)
    rng_for(plan.key, "items").shuffle(order)
    wanted = design.items_per_policy if not plan.transfer else min(design.items_per_policy, cfg.data.transfer_items or design.items_per_policy)
    chosen = order[:wanted]
    if len(chosen) < wanted:
        log.warning("only %d %s items have generations from every policy (asked for %d)", len(chosen), plan.dataset, wanted)
    if not chosen:
        raise EvalkitError(f"{cfg.path}: no item has generations from every policy ({', '.join(plan.policies)})")
    units = []
    for policy in plan.policies:
        for item_id in chosen:
            unit = stable_hash(plan.key, "main", policy, item_id)
            right = plan.by[(plan.baseline, item_id)] if plan.kind == "pairwise" else None
            units.append(_task(plan.study_id, plan.kind, item_id, plan.by[(policy, item_id)], right, "main", unit))
    if plan.kind == "likert" and plan.baseline in plan.known:  # the reference is rated too
        for item_id in chosen:
            if (plan.baseline, item_id) in plan.by.index:
                units.append(_task(plan.study_id, plan.kind, item_id, plan.by[(plan.baseline, item_id)], None, "main",
                                   stable_hash(plan.key, "main", plan.baseline, item_id)))
    return chosen, units


def _check_units(cfg: StudyConfig, plan: _Plan, items: pd.DataFrame, chosen: list[str], n_units: int) -> tuple[list[dict], list[dict]]:
    """2. quality control with known answers (pairwise), built from the items' references: gold (another post's
    reference vs this post's) and attention (the reference with its words shuffled). Returns (units, their
    generations)."""
    item_rows = items.set_index("item_id")
    with_ref = [i for i in chosen if i in item_rows.index and isinstance(item_rows.loc[i, "reference"], str)]
    units, qc_gens = [], []
    rng = rng_for(plan.key, "qc")
    if plan.kind != "pairwise" or len(with_ref) < 2:
        return units, qc_gens
    counts = (("gold", int(round(cfg.design.gold_fraction * n_units))), ("attention", int(round(cfg.design.attention_fraction * n_units))))
    for role, count in counts:
        for k in range(count):
            item_id = with_ref[int(rng.integers(len(with_ref)))]
            item = {"item_id": item_id, **item_rows.loc[item_id].to_dict()}
            right_text = item["reference"]
            if role == "gold":
                other = with_ref[(with_ref.index(item_id) + 1 + int(rng.integers(len(with_ref) - 1))) % len(with_ref)]
                wrong_text = item_rows.loc[other, "reference"]
            else:
                words = right_text.split()
                wrong_text = " ".join(words[i] for i in rng.permutation(len(words))) if len(words) > 3 else right_text[::-1]
            right_gen = {**_qc_generation(role, item, right_text), "policy_id": "ref", "policy_kind": "ref",
                         "gen_id": imported_gen_id("ref", item_id, right_text)}
            wrong_gen = _qc_generation(role, item, wrong_text)
            qc_gens += [right_gen, wrong_gen]
            units.append(_task(plan.study_id, plan.kind, item_id, right_gen["gen_id"], wrong_gen["gen_id"], role,
                               stable_hash(plan.key, role, k, item_id), expected_gen=right_gen["gen_id"]))
    return units, qc_gens


def _assign(cfg: StudyConfig, plan: _Plan, units: list[dict]) -> list[dict]:
    """3. assignment: units round-robin over labelers in a seeded order; overlap units to several labelers."""
    main_idx = [i for i, u in enumerate(units) if u["role"] == "main"]
    overlap = set(rng_for(plan.key, "overlap").choice(main_idx, size=int(round(cfg.design.overlap_fraction * len(main_idx))), replace=False).tolist()) if main_idx else set()
    tasks, labelers = [], plan.labelers
    for slot, i in enumerate(rng_for(plan.key, "assign").permutation(len(units))):
        unit = units[i]
        if i in overlap:
            start = slot % len(labelers)
            for j in range(cfg.design.overlap_labelers):
                tasks.append({**unit, "role": "overlap", "labeler_id": labelers[(start + j) % len(labelers)]})
        else:
            tasks.append({**unit, "labeler_id": labelers[slot % len(labelers)]})
    return tasks


def _batches(cfg: StudyConfig, plan: _Plan, tasks: list[dict], chosen: list[str]) -> list[dict]:
    """4. batches per labeler, with sentinel pairs spread over every batch."""
    design, out = cfg.design, []
    for labeler in plan.labelers:
        own = [t for t in tasks if t["labeler_id"] == labeler]
        size = max(1, design.batch_size)
        for b, start in enumerate(range(0, len(own), size)):
            batch = [{**t, "batch": b} for t in own[start: start + size]]
            if design.sentinel_policy and plan.kind == "pairwise" and not plan.transfer:
                for k in range(design.sentinels_per_batch):
                    item_id = chosen[int(rng_for(plan.key, "sentinel", labeler, b, k).integers(len(chosen)))]
                    if (design.sentinel_policy, item_id) in plan.by.index:
                        unit = stable_hash(plan.key, "sentinel", labeler, b, k)
                        batch.append({**_task(plan.study_id, plan.kind, item_id, plan.by[(design.sentinel_policy, item_id)],
                                              plan.by[(plan.baseline, item_id)], "sentinel", unit), "labeler_id": labeler, "batch": b})
            out += batch
    return out


def build_tasks(cfg: StudyConfig, generations: pd.DataFrame, items: pd.DataFrame, dataset: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's tasks and the generations they show (the QC summaries added).

    ``dataset``: the study's own dataset by default; the transfer dataset gets pairwise tasks against the same baseline
    for every policy that summarised it, ``min(items_per_policy, transfer_items)`` items each."""
    plan = _plan(cfg, generations, dataset)
    chosen, units = _main_units(cfg, plan)
    checks, qc_gens = _check_units(cfg, plan, items, chosen, len(units))
    out = _batches(cfg, plan, _assign(cfg, plan, units + checks), chosen)
    df = pd.DataFrame(out)
    df["task_id"] = [f"t-{stable_hash(t['unit_id'], t['labeler_id'], t['role'])}" for t in out]
    # a labeler's tasks are shown in a seeded order within each batch
    df["_order"] = [derive_seed(plan.key, "order", t) for t in df["task_id"]]
    df = df.sort_values(["labeler_id", "batch", "_order"]).drop(columns="_order").reset_index(drop=True)
    df = artifacts.conform(df, "tasks")

    used = set(df["gen_id_left"]) | set(df["gen_id_right"].dropna())
    shown = pd.concat([generations[generations["gen_id"].isin(used)], pd.DataFrame(qc_gens)], ignore_index=True)
    shown = artifacts.conform(shown.drop_duplicates("gen_id"), "generations").sort_values("gen_id").reset_index(drop=True)
    return df, shown


def collected_labels(folder: Path) -> int:
    """Judgments by people (or imported) in a built study: the web app's database and judgments.parquet, not the
    simulated panel's (which a rebuild simply re-makes)."""
    n = 0
    db = folder / "labels.sqlite"
    if db.is_file():
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                n += conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise EvalkitError(f"{db}: not a readable labels database ({exc}); move it aside or restore it") from None
    target = folder / "judgments.parquet"
    if target.is_file():
        judg = read_judgments(target)
        n += int((judg["labeler_kind"] != "simulated").sum())
    return n


def archive_study(folder: Path) -> Path:
    """Move a built study aside (``study.archived-<UTC time>``) after writing the web app's judgments to
    judgments.parquet there, so nothing collected is lost."""
    if (folder / "labels.sqlite").is_file():
        collect_judgments(folder)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = folder.with_name(f"{folder.name}.archived-{stamp}")
    shutil.move(str(folder), dest)
    return dest


def build_study(cfg: StudyConfig, archive: bool = False) -> dict[str, object]:
    """Read the study's generations and items, build tasks, write ``<out>/study/{tasks,generations,items}.parquet``.

    A study whose labels were already collected (the web app's database or imported answers) is not rebuilt over:
    that would mix stale tasks with new ones. ``archive`` moves it aside first, its judgments exported."""
    out = cfg.layout.study_dir
    n_labels = collected_labels(out) if out.is_dir() else 0
    if n_labels and not archive:
        raise EvalkitError(f"{out} already holds {n_labels} collected judgment(s); rebuilding would mix stale tasks with "
                           "new ones. Re-run with --archive to move it aside (judgments exported there) or use another study.out_dir")
    if n_labels and archive:
        log.warning("archived the labelled study to %s", archive_study(out))
    else:  # an unlabelled database of the old tasks (the app re-creates it) and simulated answers to them (re-made)
        for name in ("labels.sqlite", "labels.sqlite-wal", "labels.sqlite-shm", "judgments.parquet"):
            (out / name).unlink(missing_ok=True)

    gen_path = Path(cfg.design.generations) if cfg.design.generations else cfg.layout.generations
    if not gen_path.is_file():
        raise EvalkitError(f"no generations at {gen_path}; run `evalkit generate` (or `evalkit run`) first, or set design.generations")
    generations = artifacts.read_table(gen_path, "generations")
    items = study_items_of(cfg)
    tasks, shown = build_tasks(cfg, generations, items)
    transfer = transfer_items_of(cfg)
    if len(transfer) and (generations["dataset"] == cfg.data.transfer).any():
        t_tasks, t_shown = build_tasks(cfg, generations, transfer, cfg.data.transfer)
        t_tasks["batch"] += int(tasks["batch"].max()) + 1  # the transfer batches follow the main ones
        tasks = pd.concat([tasks, t_tasks], ignore_index=True)
        shown = artifacts.conform(pd.concat([shown, t_shown], ignore_index=True).drop_duplicates("gen_id"), "generations")
        shown = shown.sort_values("gen_id").reset_index(drop=True)
        items = pd.concat([items, transfer], ignore_index=True)
    artifacts.write_table(tasks, out / "tasks.parquet", "tasks")
    artifacts.write_table(shown, out / "generations.parquet", "generations")
    artifacts.write_table(items[items["item_id"].isin(tasks["item_id"])].reset_index(drop=True), out / "items.parquet", "items")
    counts = tasks["role"].value_counts().to_dict()
    artifacts.write_manifest(out, artifacts.build_manifest("tasks", {"stage": "study-build", **cfg.to_dict()}, inputs=[gen_path],
                                                           seeds={"study": cfg.study.seed}, outputs={"tasks": len(tasks), **counts}))
    return {"out_dir": out, "tasks": tasks, "generations": shown, "roles": counts}
