"""Schemas of every table that stages exchange, their validation, atomic Parquet I/O and ``manifest.json``.

Stages talk only through these files. A table is validated before it is written and after it is read, so a
malformed table is caught at the boundary, with a message naming the column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from evalkit import __version__
from evalkit.errors import EvalkitError
from evalkit.vocab import DATASETS, LABELER_KINDS, POLICY_KINDS, SIDES, SPLITS, TASK_KINDS, TASK_ROLES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1



@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # str | int | float | bool | timestamp
    nullable: bool = False
    allowed: tuple | None = None
    value_range: tuple[float, float] | None = None


_ARROW = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def _c(name: str, kind: str, nullable: bool = False, allowed=None, value_range=None) -> Column:
    return Column(name, kind, nullable, tuple(allowed) if allowed else None, value_range)


SCHEMAS: dict[str, tuple[Column, ...]] = {
    "items": (
        _c("item_id", "str"),
        _c("dataset", "str", allowed=DATASETS),
        _c("split", "str", allowed=SPLITS),
        _c("subreddit", "str", nullable=True),
        _c("title", "str", nullable=True),
        _c("body", "str"),
        _c("reference", "str", nullable=True),
        _c("source", "str"),
    ),
    "generations": (
        _c("gen_id", "str"),
        _c("item_id", "str"),
        _c("dataset", "str", allowed=DATASETS),
        _c("split", "str", allowed=SPLITS),
        _c("policy_id", "str"),
        _c("policy_kind", "str", allowed=POLICY_KINDS),
        _c("n_params", "int", nullable=True),
        _c("checkpoint", "str", nullable=True),
        _c("temperature", "float", nullable=True),
        _c("top_p", "float", nullable=True),
        _c("seed", "int", nullable=True),
        _c("sample_idx", "int"),
        _c("text", "str"),
        _c("n_tokens", "int", nullable=True),
        _c("hit_eos", "bool", nullable=True),
    ),
    "tasks": (
        _c("task_id", "str"),
        _c("study_id", "str"),
        _c("kind", "str", allowed=TASK_KINDS),
        _c("item_id", "str"),
        _c("gen_id_left", "str"),
        _c("gen_id_right", "str", nullable=True),
        _c("is_swapped", "bool"),
        _c("batch", "int"),
        _c("labeler_id", "str", nullable=True),
        _c("role", "str", allowed=TASK_ROLES),
        _c("expected", "str", nullable=True),
    ),
    "judgments": (
        _c("judgment_id", "str"),
        _c("task_id", "str"),
        _c("labeler_id", "str"),
        _c("labeler_kind", "str", allowed=LABELER_KINDS),
        _c("preferred", "str", nullable=True, allowed=SIDES),
        _c("preferred_gen_id", "str", nullable=True),
        _c("confidence", "int", nullable=True, value_range=(1, 9)),
        _c("overall", "int", nullable=True, value_range=(1, 7)),
        _c("accuracy", "int", nullable=True, value_range=(1, 7)),
        _c("coverage", "int", nullable=True, value_range=(1, 7)),
        _c("coherence", "int", nullable=True, value_range=(1, 7)),
        _c("note", "str", nullable=True),
        _c("submitted_at", "timestamp", nullable=True),
        _c("duration_s", "float", nullable=True),
        _c("source", "str"),
    ),
    "comparisons": (
        _c("item_id", "str"),
        _c("labeler_id", "str"),
        _c("policy_id", "str"),
        _c("policy_kind", "str", allowed=POLICY_KINDS),
        _c("n_params", "int", nullable=True),
        _c("baseline_id", "str"),
        _c("outcome", "int", value_range=(0, 1)),
        _c("len_policy", "float", nullable=True),
        _c("len_baseline", "float", nullable=True),
        _c("dataset", "str", allowed=DATASETS),
        _c("split", "str", allowed=SPLITS),
    ),
    "quality": (  # a trainer's held-out summaries, one row per post (evalkit.train.quality); rm_score/kl_to_sft follow
        _c("item_id", "str"),
        _c("text", "str"),
        _c("n_tokens", "int"),
        _c("finished", "bool"),
        _c("rouge_l", "float", value_range=(0, 1)),
    ),
    "fits": (
        _c("analysis", "str"),
        _c("term", "str"),
        _c("estimate", "float", nullable=True),
        _c("std_err", "float", nullable=True),
        _c("ci_low", "float", nullable=True),
        _c("ci_high", "float", nullable=True),
        _c("p_value", "float", nullable=True),
        _c("n_obs", "int"),
        _c("n_clusters", "int", nullable=True),
        _c("method", "str"),
    ),
}

KEYS = {"quality": "item_id", "items": "item_id", "generations": "gen_id", "tasks": "task_id", "judgments": "judgment_id"}


def _schema(name: str) -> tuple[Column, ...]:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise EvalkitError(f"unknown artifact '{name}'; known: {', '.join(SCHEMAS)}") from None


def _kind_ok(series: pd.Series, kind: str) -> bool:
    values = series.dropna()
    if values.empty:
        return True
    if kind == "str":
        return pd.api.types.is_string_dtype(series.dtype) or bool(values.map(lambda v: isinstance(v, str)).all())
    if kind == "int":
        if pd.api.types.is_bool_dtype(series.dtype):
            return False
        if pd.api.types.is_integer_dtype(series.dtype):
            return True
        if pd.api.types.is_float_dtype(series.dtype):
            return bool((values == values.round()).all())
        return False
    if kind == "float":
        return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)
    if kind == "bool":
        return pd.api.types.is_bool_dtype(series.dtype) or bool(values.map(lambda v: isinstance(v, bool)).all())
    if kind == "timestamp":
        return pd.api.types.is_datetime64_any_dtype(series.dtype)
    raise AssertionError(kind)


def validate(df: pd.DataFrame, name: str, where: str = "") -> pd.DataFrame:
    """Check ``df`` against the schema ``name``; raise EvalkitError naming the first bad column.

    Extra columns are allowed (kept after the schema's own). Returns ``df`` for chaining.
    """
    at = f" in {where}" if where else ""
    for col in _schema(name):
        if col.name not in df.columns:
            raise EvalkitError(f"{name} table{at} is missing column '{col.name}' ({col.kind}); has: {', '.join(map(str, df.columns))}")
        series = df[col.name]
        if not _kind_ok(series, col.kind):
            raise EvalkitError(f"{name} table{at}: column '{col.name}' should hold {col.kind} values, found dtype {series.dtype}")
        n_null = int(series.isna().sum())
        if n_null and not col.nullable:
            raise EvalkitError(f"{name} table{at}: column '{col.name}' has {n_null} missing values; it may not be empty")
        if col.allowed is not None:
            bad = sorted(set(series.dropna().astype(str)) - set(col.allowed))
            if bad:
                raise EvalkitError(f"{name} table{at}: column '{col.name}' has unknown value {bad[0]!r}; expected one of: {', '.join(col.allowed)}")
        if col.value_range is not None:
            values = series.dropna()
            lo, hi = col.value_range
            out = values[(values < lo) | (values > hi)]
            if len(out):
                raise EvalkitError(f"{name} table{at}: column '{col.name}' has value {out.iloc[0]!r} outside [{lo}, {hi}]")
    key = KEYS.get(name)
    if key is not None and df[key].duplicated().any():
        dup = df.loc[df[key].duplicated(), key].iloc[0]
        raise EvalkitError(f"{name} table{at}: duplicate {key} {dup!r}")
    return df


def to_arrow(df: pd.DataFrame, name: str) -> pa.Table:
    """Convert a validated frame to Arrow with the schema's column order and types (extra columns follow)."""
    cols = _schema(name)
    fields, arrays = [], []
    for col in cols:
        typ = _ARROW[col.kind]
        series = df[col.name]
        if col.kind == "int":
            values = [None if pd.isna(v) else int(v) for v in series]
        elif col.kind == "float":
            values = [None if pd.isna(v) else float(v) for v in series]
        elif col.kind == "bool":
            values = [None if pd.isna(v) else bool(v) for v in series]
        elif col.kind == "timestamp":
            series = pd.to_datetime(series, utc=True)
            values = [None if pd.isna(v) else v.to_pydatetime() for v in series]
        else:
            values = [None if pd.isna(v) else str(v) for v in series]
        arrays.append(pa.array(values, type=typ))
        fields.append(pa.field(col.name, typ, nullable=col.nullable))
    known = {c.name for c in cols}
    for extra in (c for c in df.columns if c not in known):
        arr = pa.Array.from_pandas(df[extra])
        arrays.append(arr)
        fields.append(pa.field(str(extra), arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={b"evalkit.artifact": name.encode(), b"evalkit.schema_version": str(SCHEMA_VERSION).encode()}))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sweep_dead(folder: Path, pattern: str) -> None:
    """Remove leftovers named by ``pattern`` (a regex whose group 1 is a pid) whose writing process is gone: what a
    killed process left half-written. A live process's files are never touched."""
    if not folder.is_dir():
        return
    rx = re.compile(pattern)
    for entry in folder.iterdir():
        m = rx.fullmatch(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, writer) -> Path:
    """Write through ``writer(tmp_path)`` into a temp file beside ``path``, fsync it, then rename over ``path``: a
    reader, or a process killed at any moment, sees the old file or the new one, never half of one. Temp files that a
    killed writer left for the same path are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead(path.parent, rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def staging_dir(final: str | os.PathLike, owned, what: str) -> Path:
    """A fresh empty folder beside ``final`` to build it in (see :func:`publish_dir`); leftovers of killed builds of
    the same folder are removed. :func:`publish_dir` replaces ``final`` whole, so ``final`` must be absent, empty, or
    ``owned(final)`` — a folder of ``what`` ("an evalkit report") built before; anything else is refused here, before
    any work, and nothing of it is touched."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise EvalkitError(f"{final} is a file; {what} is a folder, so give an empty or new folder")
    if final.is_dir() and any(final.iterdir()) and not owned(final):
        raise EvalkitError(f"{final} holds files that are not {what}; {what} replaces its folder whole, so give an "
                           "empty or new folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead(final.parent, rf"\.{re.escape(final.name)}\.(?:building|old)-(\d+)")
    staging = final.parent / f".{final.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish_dir(staging: Path, final: str | os.PathLike) -> Path:
    """Put the folder built in ``staging`` in place of ``final`` by two renames: whoever reads ``final`` sees the old
    folder whole or the new one whole. A process killed between the renames leaves no ``final`` (the next build
    makes it) and the old one beside it, removed by the next :func:`staging_dir`."""
    final = Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def built_whole(final: str | os.PathLike, owned, what: str):
    """``with built_whole(folder, owned, what) as staging:`` build the folder's files in ``staging``; on success the
    folder is replaced whole (:func:`publish_dir`), on failure ``staging`` is removed and the folder left as it was.
    ``owned`` and ``what`` guard a folder of other files (:func:`staging_dir`)."""
    staging = staging_dir(final, owned, what)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, final)


def write_table(df: pd.DataFrame, path: str | os.PathLike, name: str) -> Path:
    """Validate ``df`` as artifact ``name`` and write it to ``path`` atomically (temp file, then rename)."""
    validate(df, name, where=str(path))
    table = to_arrow(df, name)
    path = Path(path)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_table(path: str | os.PathLike, name: str | None = None) -> pd.DataFrame:
    """Read a Parquet artifact; with ``name``, validate it against that schema."""
    path = Path(path)
    if not path.is_file():
        raise EvalkitError(f"no such table: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EvalkitError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    df = table.to_pandas()
    if name is not None:
        validate(df, name, where=str(path))
        df = conform(df, name)
    return df


_PANDAS_DTYPES = {"str": "str", "int": "int64", "float": "float64", "bool": "bool", "timestamp": "datetime64[us, UTC]"}
_PANDAS_NULLABLE = {"int": "Int64", "bool": "boolean"}


def conform(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The canonical pandas dtypes of artifact ``name`` (schema columns first, in order; extra columns kept after).

    Tables built in memory and tables read back from Parquet then compare equal.
    """
    cols = _schema(name)
    out = df.copy()
    for col in cols:
        if col.name not in out.columns:
            continue
        dtype = _PANDAS_NULLABLE.get(col.kind) if col.nullable else None
        dtype = dtype or _PANDAS_DTYPES[col.kind]
        if col.kind == "timestamp":
            out[col.name] = pd.to_datetime(out[col.name], utc=True).astype(dtype)
        else:
            out[col.name] = out[col.name].astype(dtype)
    order = [c.name for c in cols if c.name in out.columns]
    return out[order + [c for c in out.columns if c not in order]]


def empty_table(name: str) -> pd.DataFrame:
    """A table with the schema's columns and no rows."""
    return conform(pd.DataFrame({c.name: [] for c in _schema(name)}), name)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write JSON atomically."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8") + b"\n"

    def writer(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(Path(path), writer)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# provenance

_PACKAGES = ("evalkit", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "scipy", "statsmodels", "matplotlib", "click")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: Iterable[str] = _PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(start: str | os.PathLike | None = None) -> dict[str, object]:
    """The commit and dirty flag of the git checkout holding evalkit's source (None when it is not a checkout)."""
    where = Path(start) if start else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def describe_inputs(paths: Iterable[str | os.PathLike]) -> list[dict[str, object]]:
    return [{"path": str(p), "sha256": sha256_file(p), "bytes": os.path.getsize(p)} for p in paths]


def fingerprint(config: Mapping, inputs: list[dict[str, object]]) -> str:
    """A hash of the resolved config and the inputs' contents: equal fingerprints mean a stage need not re-run."""
    payload = json.dumps({"config": config, "inputs": sorted(i["sha256"] for i in inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def build_manifest(artifact: str, config: Mapping, inputs: Iterable[str | os.PathLike] = (), seeds: Mapping | None = None,
                   outputs: Mapping[str, int] | None = None, extra: Mapping | None = None) -> dict:
    described = describe_inputs(inputs)
    return {
        "artifact": artifact,
        "schema_version": SCHEMA_VERSION,
        "evalkit_version": __version__,
        "git": git_state(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config),
        "seeds": dict(seeds or {}),
        "inputs": described,
        "fingerprint": fingerprint(config, described),
        "outputs": dict(outputs or {}),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **dict(extra or {}),
    }


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping) -> Path:
    return write_json(Path(out_dir) / "manifest.json", manifest)


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s", path)
        return None


def up_to_date(out_dir: str | os.PathLike, config: Mapping, inputs: Iterable[str | os.PathLike], outputs: Iterable[str]) -> bool:
    """True when ``out_dir`` holds a manifest with the same fingerprint and every named output file exists."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return False
    if manifest.get("fingerprint") != fingerprint(config, describe_inputs(inputs)):
        return False
    return all(readable(Path(out_dir) / name) for name in outputs)


def readable(path: Path) -> bool:
    """The file exists and is whole: a Parquet footer that parses, JSON that loads (a truncated write fails both)."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".parquet":
            _ = pq.ParquetFile(path).metadata
        elif path.suffix == ".json":
            json.loads(path.read_text("utf-8"))
    except Exception:  # noqa: BLE001 - any failure to parse means "not whole"
        log.warning("%s is damaged; it will be made again", path)
        return False
    return True
