"""What evalkit records beside a checkpoint's weights (``evalkit.json``: its kind, size, precision, contract, quality),
and what a checkpoint folder's ``config.json`` says, read without building a model (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from evalkit.artifacts import write_json
from evalkit.data.io import read_json_object
from evalkit.errors import EvalkitError

METADATA_FILE = "evalkit.json"


def write_metadata(folder: str | Path, **fields) -> dict:
    """Merge ``fields`` into the folder's ``evalkit.json`` (atomically)."""
    path = Path(folder) / METADATA_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    meta = {**old, **fields}
    write_json(path, meta)
    return meta


def read_metadata(folder: str | Path) -> dict:
    """The folder's ``evalkit.json``; empty for a checkpoint evalkit did not make."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    return read_json_object(path)


def model_context(config: dict | object) -> int:
    """Positions a Hugging Face causal LM can attend over (``n_positions`` / ``max_position_embeddings``), from its
    config object or its ``config.json`` (a multimodal config's ``text_config`` too)."""
    get = config.get if isinstance(config, dict) else (lambda name, default=None: getattr(config, name, default))
    for name in ("n_positions", "max_position_embeddings"):
        value = get(name, None)
        if value:
            return int(value)
    text = get("text_config", None)
    return model_context(text) if text else 2048


def checkpoint_folder(folder: str | Path) -> Path:
    """The folder, if it is a Hugging Face checkpoint (it has a ``config.json``); a one-line error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalkitError(f"no checkpoint folder at {folder}")
    if not (folder / "config.json").is_file():
        raise EvalkitError(f"{folder} is not a Hugging Face checkpoint: config.json is missing")
    return folder


def config_context(folder: str | Path) -> int:
    """The context a checkpoint folder's ``config.json`` declares."""
    return model_context(read_json_object(checkpoint_folder(folder) / "config.json"))
