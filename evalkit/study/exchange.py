"""Crowd exchange: blind task exports for crowd platforms, and importing their answers as judgments.

Exports (``csv``, ``jsonl``, ``labelstudio``) carry what a labeler needs — the post (subreddit, title, text) or the
article, the summaries as shown (left/right) and the question — and an opaque ``task_id``; never a policy name or a
generation id. Answers come back as CSV or JSON Lines with ``task_id``, ``labeler_id`` and either ``confidence``
(the 9-point scale: 1 = definitely left … 9 = definitely right; 5 is not an answer) or the four 1–7 Likert ratings,
or as Label Studio's JSON export of the exported project. An import is all or nothing: every row is checked (its line
named on error) before ``judgments.parquet`` is rewritten, and re-importing the same file changes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pandas as pd

from evalkit import artifacts
from evalkit.data.io import existing_file, iter_jsonl, read_text_utf8
from evalkit.errors import EvalkitError
from evalkit.seeds import stable_hash
from evalkit.vocab import confidence_side

EXPORT_FORMATS = ("csv", "jsonl", "labelstudio")
LIKERT_AXES = ("overall", "accuracy", "coverage", "coherence")
PAIRWISE_QUESTION = "Which summary is better? 1 = definitely left … 9 = definitely right (no 5)."
LIKERT_QUESTION = "Rate the summary from 1 (worst) to 7 (best) on overall quality, accuracy, coverage and coherence."
CONFIDENCE_LABELS = {1: "Definitely left", 2: "Very likely left", 3: "Likely left", 4: "Possibly left",
                     6: "Possibly right", 7: "Likely right", 8: "Very likely right", 9: "Definitely right"}


def load_study_tables(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = Path(folder)
    if not (folder / "tasks.parquet").is_file():
        raise EvalkitError(f"no tasks.parquet in {folder}; run `evalkit study build` first")
    return {name: artifacts.read_table(folder / f"{name}.parquet", name) for name in ("tasks", "generations", "items")}


def blind_rows(tables: dict[str, pd.DataFrame]) -> list[dict]:
    """One labeler-facing record per task: texts as shown, no policy names, no generation ids."""
    text = tables["generations"].set_index("gen_id")["text"]
    items = tables["items"].set_index("item_id")
    rows = []
    for t in tables["tasks"].itertuples():
        item = items.loc[t.item_id]
        row = {"task_id": t.task_id, "study_id": t.study_id, "labeler_id": t.labeler_id, "batch": int(t.batch),
               "kind": t.kind, "subreddit": item["subreddit"] if isinstance(item["subreddit"], str) else "",
               "title": item["title"] if isinstance(item["title"], str) else "", "text": item["body"],
               "summary_left": text[t.gen_id_left],
               "summary_right": text[t.gen_id_right] if isinstance(t.gen_id_right, str) else "",
               "question": PAIRWISE_QUESTION if t.kind == "pairwise" else LIKERT_QUESTION}
        rows.append(row)
    return rows


def labelstudio_config() -> str:
    """The Label Studio labeling config matching the export (pairwise choice with confidence; Likert ratings)."""
    choices = "".join(f'<Choice value="{v}"/>' for v in CONFIDENCE_LABELS.values())
    ratings = "".join(f'<Rating name="{a}" toName="text" maxRating="7" visibleWhen="task-data" whenTagName="kind" />' for a in LIKERT_AXES)
    return ('<View><Header value="$title"/><Text name="text" value="$text"/>'
            '<Header value="Left"/><Text name="summary_left" value="$summary_left"/>'
            '<Header value="Right"/><Text name="summary_right" value="$summary_right"/>'
            f'<Choices name="preference" toName="text" choice="single">{choices}</Choices>{ratings}'
            '<TextArea name="note" toName="text" rows="2"/></View>')


def export_tasks(folder: str | Path, fmt: str, out: str | Path) -> Path:
    if fmt not in EXPORT_FORMATS:
        raise EvalkitError(f"unknown export format {fmt!r}; expected one of: {', '.join(EXPORT_FORMATS)}")
    rows = blind_rows(load_study_tables(folder))
    out = Path(out)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        data = buf.getvalue()
    elif fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        data = json.dumps([{"data": r} for r in rows], ensure_ascii=False, indent=1)
        artifacts.write_json(out.with_suffix(".config.json"), {"label_config": labelstudio_config()})
    encoded = data.encode("utf-8")
    return artifacts.atomic_write(out, lambda tmp: Path(tmp).write_bytes(encoded))


# ----------------------------------------------------------------------------------------------------------- import

def _int_in(value, lo: int, hi: int, where: str, name: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and pd.isna(value)):
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise EvalkitError(f"{where}: {name} is {value!r}; expected an integer {lo}-{hi}") from None
    if not lo <= number <= hi:
        raise EvalkitError(f"{where}: {name} is {number}; expected an integer {lo}-{hi}")
    return number


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for every answer in a CSV, JSON Lines or Label Studio JSON file."""
    path = existing_file(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(read_text_utf8(path), newline=""))
        if not reader.fieldnames or "task_id" not in reader.fieldnames or "labeler_id" not in reader.fieldnames:
            raise EvalkitError(f"{path}: missing column 'task_id' or 'labeler_id'; expected task_id, labeler_id, confidence or {', '.join(LIKERT_AXES)}")
        return [(f"{path}:{i}", dict(r)) for i, r in enumerate(reader, start=2)]
    if path.suffix.lower() == ".json":
        try:
            exported = json.loads(read_text_utf8(path))
        except json.JSONDecodeError as exc:
            raise EvalkitError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
        return _labelstudio_records(path, exported)
    return [(f"{path}:{n}", r) for n, r in iter_jsonl(path)]


def _labelstudio_records(path: Path, exported) -> list[tuple[str, dict]]:
    if not isinstance(exported, list):
        raise EvalkitError(f"{path}: expected Label Studio's JSON export (a list of tasks), got {type(exported).__name__}")
    by_label = {v: k for k, v in CONFIDENCE_LABELS.items()}
    out = []
    for i, task in enumerate(exported):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise EvalkitError(f"{path}: task {i} has no 'data' object; expected Label Studio's JSON export")
        data = task["data"]
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise EvalkitError(f"{path}: task {i}: 'annotations' should be a list of objects, got {annotations!r:.60}")
        for j, ann in enumerate(annotations):
            if not isinstance(ann.get("result") or [], list) or not all(isinstance(r, dict) for r in ann.get("result") or []):
                raise EvalkitError(f"{path}: task {i} annotation {j}: 'result' should be a list of objects")
            rec = {"task_id": data.get("task_id"), "labeler_id": str(ann.get("completed_by") or data.get("labeler_id") or ""),
                   "submitted_at": ann.get("created_at"), "duration_s": ann.get("lead_time")}
            for res in ann.get("result") or []:
                value, name = res.get("value") or {}, res.get("from_name")
                if name == "preference" and value.get("choices"):
                    rec["confidence"] = by_label.get(value["choices"][0], value["choices"][0])
                elif name in LIKERT_AXES:
                    rec[name] = value.get("rating")
                elif name == "note" and value.get("text"):
                    rec["note"] = " ".join(value["text"])
            out.append((f"{path}: task {i} annotation {j}", rec))
    return out


def _duration(value, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds < 0:
        raise EvalkitError(f"{where}: duration_s is {value!r}; expected seconds, a finite number of 0 or more")
    return seconds


def _timestamp(value, where: str):
    if value is None or value == "":
        return None
    stamp = pd.to_datetime(value, utc=True, errors="coerce")
    if pd.isna(stamp):
        raise EvalkitError(f"{where}: submitted_at is {value!r}; expected an ISO 8601 time, e.g. 2026-11-30T10:00:00Z")
    return stamp


def human_judgment_id(task_id: str, labeler_id: str) -> str:
    """One human judgment per task and labeler, whatever its source (a file under any name, the web app)."""
    return "j-" + stable_hash(task_id, labeler_id)


def parse_answers(path: str | Path, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Answers → judgments rows (swap undone); raises on the first bad row, naming its line."""
    path = Path(path)
    tasks = tables["tasks"].set_index("task_id")
    study_ids = set(tables["tasks"]["study_id"])
    rows = []
    records = _records(path)
    if not records:
        raise EvalkitError(f"{path}: no answers")
    for where, rec in records:
        task_id = str(rec.get("task_id") or "").strip()
        if task_id not in tasks.index:
            raise EvalkitError(f"{where}: unknown task id {task_id!r} (not in this study's tasks)")
        if rec.get("study_id") and str(rec["study_id"]) not in study_ids:
            raise EvalkitError(f"{where}: study {rec['study_id']!r} is not this study ({', '.join(sorted(study_ids))})")
        labeler = str(rec.get("labeler_id") or "").strip()
        if not labeler:
            raise EvalkitError(f"{where}: missing labeler_id")
        task = tasks.loc[task_id]
        row = {"task_id": task_id, "labeler_id": labeler, "note": (str(rec.get("note") or "").strip() or None),
               "submitted_at": _timestamp(rec.get("submitted_at"), where), "duration_s": _duration(rec.get("duration_s"), where),
               "preferred": None, "preferred_gen_id": None, "confidence": None, **{a: None for a in LIKERT_AXES}}
        if task["kind"] == "pairwise":
            confidence = _int_in(rec.get("confidence"), 1, 9, where, "confidence")
            side = confidence_side(confidence) if confidence is not None else None
            if side is None:
                raise EvalkitError(f"{where}: confidence is {rec.get('confidence')!r}; expected 1-4 (left) or 6-9 (right)")
            row.update(confidence=confidence, preferred=side, preferred_gen_id=task[f"gen_id_{side}"])
        else:
            for axis in LIKERT_AXES:
                row[axis] = _int_in(rec.get(axis), 1, 7, where, axis)
            if row["overall"] is None:
                raise EvalkitError(f"{where}: missing the overall rating (1-7)")
        row["judgment_id"] = human_judgment_id(task_id, labeler)
        row.update(labeler_kind="human", source=path.name)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["submitted_at"] = pd.to_datetime(df["submitted_at"], utc=True, errors="coerce")
    dup = df["judgment_id"].duplicated()
    if dup.any():
        raise EvalkitError(f"{path}: task {df.loc[dup, 'task_id'].iloc[0]} answered twice by {df.loc[dup, 'labeler_id'].iloc[0]}")
    return artifacts.conform(df, "judgments")


def import_answers(folder: str | Path, path: str | Path) -> pd.DataFrame:
    """Add a file of answers to ``<folder>/judgments.parquet`` (all rows or none)."""
    folder = Path(folder)
    tables = load_study_tables(folder)
    new = parse_answers(path, tables)
    target = folder / "judgments.parquet"
    old = artifacts.read_table(target, "judgments") if target.is_file() else artifacts.empty_table("judgments")
    # the same task answered by the same labeler is one judgment: a re-import (under any file name) adds nothing,
    # a different answer is refused rather than kept twice
    known = old.set_index("judgment_id")
    clash = new[new["judgment_id"].isin(known.index)]
    for r in clash.itertuples():
        prev = known.loc[r.judgment_id]
        same = (prev["preferred"] == r.preferred) if isinstance(r.preferred, str) else prev["overall"] == r.overall
        if not same:
            raise EvalkitError(f"{path}: task {r.task_id} by {r.labeler_id} is already answered differently (from "
                               f"{prev['source']}); nothing imported")
    merged = pd.concat([old, new[~new["judgment_id"].isin(old["judgment_id"])]], ignore_index=True)
    artifacts.write_table(merged, target, "judgments")
    return merged
