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


def build_tasks(cfg: StudyConfig, generations: pd.DataFrame, items: pd.DataFrame, dataset: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's tasks and the generations they show (the QC summaries added).

    ``dataset``: the study's own dataset by default; the transfer dataset gets pairwise tasks against the same baseline
    for every policy that summarised it, ``min(items_per_policy, transfer_items)`` items each."""
    design = cfg.design
    study_id = cfg.id
    transfer = dataset is not None and dataset != cfg.data.dataset
    dataset = dataset or cfg.data.dataset
    key = f"{cfg.id}:{cfg.study.seed}" + (f":{dataset}" if transfer else "")  # every seeded choice derives from the study and its seed
    kind = "pairwise" if transfer else design.kind or ("likert" if dataset == "cnndm" else "pairwise")
    if kind not in artifacts.TASK_KINDS:
        raise EvalkitError(f"{cfg.path}: design.kind {kind!r}; expected pairwise or likert")
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
    for name, value in (("overlap_fraction", design.overlap_fraction), ("gold_fraction", design.gold_fraction),
                        ("attention_fraction", design.attention_fraction)):
        if not 0 <= value <= 1:
            raise EvalkitError(f"{cfg.path}: design.{name} is {value}; expected a fraction in [0, 1]")
    labelers = labeler_ids(cfg)
    if design.overlap_fraction > 0 and design.overlap_labelers > len(labelers):
        raise EvalkitError(f"{cfg.path}: overlap needs {design.overlap_labelers} labelers but the study has {len(labelers)}")

    # the first sample of each policy on each item
    first = gens.sort_values(["policy_id", "item_id", "sample_idx"]).drop_duplicates(["policy_id", "item_id"])
    by = first.set_index(["policy_id", "item_id"])["gen_id"]
    item_sets = {p: set(first.loc[first["policy_id"] == p, "item_id"]) for p in policies}
    base_items = set(first.loc[first["policy_id"] == baseline, "item_id"]) if kind == "pairwise" else None

    # 1. items, balanced: the items every policy (and the baseline) has, in a seeded order
    units = []
    common = set.intersection(*item_sets.values()) & (base_items if base_items is not None else set.intersection(*item_sets.values()))
    order = sorted(common)
    rng_for(key, "items").shuffle(order)
    wanted = design.items_per_policy if not transfer else min(design.items_per_policy, cfg.data.transfer_items or design.items_per_policy)
    chosen = order[:wanted]
    if len(chosen) < wanted:
        log.warning("only %d %s items have generations from every policy (asked for %d)", len(chosen), dataset, wanted)
    if not chosen:
        raise EvalkitError(f"{cfg.path}: no item has generations from every policy ({', '.join(policies)})")
    for policy in policies:
        for item_id in chosen:
            unit = stable_hash(key, "main", policy, item_id)
            if kind == "pairwise":
                units.append(_task(study_id, kind, item_id, by[(policy, item_id)], by[(baseline, item_id)], "main", unit))
            else:
                units.append(_task(study_id, kind, item_id, by[(policy, item_id)], None, "main", unit))
    if kind == "likert" and baseline in known:  # the reference is rated too
        for item_id in chosen:
            if (baseline, item_id) in by.index:
                units.append(_task(study_id, kind, item_id, by[(baseline, item_id)], None, "main", stable_hash(key, "main", baseline, item_id)))

    # 2. quality control with known answers (pairwise), built from the items' references
    item_rows = items.set_index("item_id")
    with_ref = [i for i in chosen if i in item_rows.index and isinstance(item_rows.loc[i, "reference"], str)]
    qc_gens: list[dict] = []
    rng = rng_for(key, "qc")
    if kind == "pairwise" and len(with_ref) >= 2:
        n_gold = int(round(design.gold_fraction * len(units)))
        n_attention = int(round(design.attention_fraction * len(units)))
        for role, count in (("gold", n_gold), ("attention", n_attention)):
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
                unit = stable_hash(key, role, k, item_id)
                units.append(_task(study_id, kind, item_id, right_gen["gen_id"], wrong_gen["gen_id"], role, unit,
                                   expected_gen=right_gen["gen_id"]))

    # 3. assignment: main units round-robin over labelers in a seeded order; overlap units to several labelers
    tasks = []
    main_idx = [i for i, u in enumerate(units) if u["role"] == "main"]
    overlap = set(rng_for(key, "overlap").choice(main_idx, size=int(round(design.overlap_fraction * len(main_idx))), replace=False).tolist()) if main_idx else set()
    perm = rng_for(key, "assign").permutation(len(units))
    for slot, i in enumerate(perm):
        unit = units[i]
        if i in overlap:
            start = slot % len(labelers)
            for j in range(design.overlap_labelers):
                tasks.append({**unit, "role": "overlap", "labeler_id": labelers[(start + j) % len(labelers)]})
        else:
            tasks.append({**unit, "labeler_id": labelers[slot % len(labelers)]})

    # 4. batches per labeler, with sentinel pairs spread over every batch
    out = []
    for labeler in labelers:
        own = [t for t in tasks if t["labeler_id"] == labeler]
        size = max(1, design.batch_size)
        for b, start in enumerate(range(0, len(own), size)):
            batch = [{**t, "batch": b} for t in own[start: start + size]]
            if design.sentinel_policy and kind == "pairwise" and not transfer:
                for k in range(design.sentinels_per_batch):
                    item_id = chosen[int(rng_for(key, "sentinel", labeler, b, k).integers(len(chosen)))]
                    if (design.sentinel_policy, item_id) in by.index:
                        unit = stable_hash(key, "sentinel", labeler, b, k)
                        batch.append({**_task(study_id, kind, item_id, by[(design.sentinel_policy, item_id)], by[(baseline, item_id)],
                                              "sentinel", unit), "labeler_id": labeler, "batch": b})
            out += batch
    df = pd.DataFrame(out)
    df["task_id"] = [f"t-{stable_hash(t['unit_id'], t['labeler_id'], t['role'])}" for t in out]
    # a labeler's tasks are shown in a seeded order within each batch
    df["_order"] = [derive_seed(key, "order", t) for t in df["task_id"]]
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
    out = cfg.out_dir / "study"
    n_labels = collected_labels(out) if out.is_dir() else 0
    if n_labels and not archive:
        raise EvalkitError(f"{out} already holds {n_labels} collected judgment(s); rebuilding would mix stale tasks with "
                           "new ones. Re-run with --archive to move it aside (judgments exported there) or use another study.out_dir")
    if n_labels and archive:
        log.warning("archived the labelled study to %s", archive_study(out))
    else:  # an unlabelled database of the old tasks (the app re-creates it) and simulated answers to them (re-made)
        for name in ("labels.sqlite", "labels.sqlite-wal", "labels.sqlite-shm", "judgments.parquet"):
            (out / name).unlink(missing_ok=True)

    gen_path = Path(cfg.design.generations) if cfg.design.generations else cfg.out_dir / "generations" / "generations.parquet"
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
