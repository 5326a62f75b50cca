"""Reading user files with errors that name the file, the line and what was expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from evalkit.errors import EvalkitError


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalkitError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise EvalkitError(f"{path}: empty file")
    return path


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; a malformed line raises with its number."""
    path = existing_file(path)
    seen = False
    with open(path, encoding="utf-8") as fh:
        for lineno, line in _utf8_lines(fh, path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise EvalkitError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise EvalkitError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            seen = True
            yield lineno, obj
    if not seen:
        raise EvalkitError(f"{path}: no records (only blank lines)")


def _utf8_lines(fh, path):
    lineno = 0
    try:
        for lineno, line in enumerate(fh, start=1):
            yield lineno, line
    except UnicodeDecodeError as exc:
        raise EvalkitError(f"{path}:{lineno + 1}: not UTF-8 text (byte {exc.start} of its block); save the file as UTF-8") from None


def read_text_utf8(path: Path) -> str:
    try:
        return Path(path).read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalkitError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None


def read_json_object(path: Path) -> dict:
    """A JSON object from a file; unreadable JSON or another type is an error naming the file."""
    try:
        obj = json.loads(Path(path).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalkitError(f"{path}: not readable JSON ({exc}); restore it or make it again") from None
    if not isinstance(obj, dict):
        raise EvalkitError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def require_str(obj: dict, key: str, where: str, allow_none: bool = False) -> None:
    value = obj.get(key)
    if not isinstance(value, str) and not (allow_none and value is None):
        raise EvalkitError(f"{where}: field '{key}' is {value!r}; expected a string")


def require_keys(obj: dict, keys: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in obj:
            raise EvalkitError(f"{where}: missing field '{key}'; expected fields: {', '.join(keys)}")


def read_csv_columns(path: str | Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV as strings; every column in ``required`` must be present."""
    path = existing_file(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise EvalkitError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise EvalkitError(f"{path}: missing column '{missing[0]}'; expected columns: {', '.join(required)}")
    if df.empty:
        raise EvalkitError(f"{path}: no rows")
    return df
