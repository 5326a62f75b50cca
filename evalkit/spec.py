"""Typed frozen dataclasses from TOML tables and ``section.key=value`` overrides, and the value checks every trainer
config shares: an unknown key or a value of the wrong type is an error naming where it came from and the key. The
study spec (``evalkit.config``) and the ladder presets (``evalkit.train.presets``) are both built with these."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from evalkit.errors import EvalkitError
from evalkit.vocab import check_precision

# field metadata for a dataclass field that is not read from the spec file
NOT_A_KEY = {"key": False}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise EvalkitError(f"{where}: expected a table, got {value!r}")
        return from_mapping(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise EvalkitError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise EvalkitError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    # a field marked NOT_A_KEY (StudyConfig.path: where the spec came from) is never read from the file
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)]
    unknown = [k for k in mapping if k not in names]
    if unknown:
        raise EvalkitError(f"{where}: unknown key '{unknown[0]}'; known: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()})


def _parse_override(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", ""):
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if tp in (int, float):
            return tp(text)
        if origin is tuple:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        return text
    except ValueError:
        raise EvalkitError(f"--set {key}={text}: expected {_type_name(tp)}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw TOML dict, parsing each value as its field's type."""
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise EvalkitError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        hints = typing.get_type_hints(cls)
        node = raw
        i = 0
        while i < len(parts) - 1:
            part = parts[i]
            tp = hints.get(part)
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp) else None
            if inner is not None and dataclasses.is_dataclass(inner):  # [[array]] of tables: section.INDEX.key
                entries = node.get(part, [])
                index = parts[i + 1] if i + 1 < len(parts) - 1 else ""
                if not index.isdigit() or int(index) >= len(entries):
                    raise EvalkitError(f"--set {key}: expected {part}.N.key with N below {len(entries)} (the [[{part}]] entries)")
                node[part] = entries = [dict(e) for e in entries]
                node = entries[int(index)]
                hints = typing.get_type_hints(inner)
                i += 2
                continue
            if tp is None or not dataclasses.is_dataclass(tp):
                raise EvalkitError(f"--set {key}: unknown section '{part}'; known: {', '.join(n for n, t in hints.items() if dataclasses.is_dataclass(t))}")
            hints = typing.get_type_hints(tp)
            node = node.setdefault(part, {})
            i += 1
        leaf = parts[-1]
        if leaf not in hints:
            raise EvalkitError(f"--set {key}: unknown key '{leaf}'; known: {', '.join(hints)}")
        node[leaf] = _parse_override(value.strip(), hints[leaf], key)
    return raw


POSITIVE = {"steps", "iterations", "epochs", "batch_size", "rollouts", "minibatch_size", "ppo_epochs", "n", "depth",
            "seq_len", "pretrain_steps", "pretrain_seq_len", "pretrain_batch", "sft_steps", "sft_batch", "rm_epochs",
            "ppo_iterations", "ppo_rollouts", "ppo_minibatch", "best_of_n", "max_query_tokens", "max_summary_tokens"}


def check_values(cfg, where: str) -> None:
    """Trainer and ladder configs: counts that must be positive are, rates are finite and positive, nothing is
    negative or NaN (a negative step count would otherwise train nothing and say it succeeded)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "precision":
            check_precision(v, f"{where}: precision")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise EvalkitError(f"{where}: {f.name} is {v}; expected a finite number")
        if f.name in POSITIVE and v < 1:
            raise EvalkitError(f"{where}: {f.name} is {v}; expected a positive integer")
        if (f.name == "lr" or f.name.endswith("_lr")) and v <= 0:
            raise EvalkitError(f"{where}: {f.name} is {v}; expected a learning rate above 0")
        if f.name == "vocab_size" and v < 300:
            raise EvalkitError(f"{where}: vocab_size is {v}; expected at least 300 (256 bytes plus merges and specials)")
        if v < 0 and f.name not in ("seed",):
            raise EvalkitError(f"{where}: {f.name} is {v}; expected 0 or more")
