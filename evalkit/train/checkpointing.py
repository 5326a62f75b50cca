"""A trainer's folder: its config (``trainer_config.json``), progress (``metrics.jsonl``), resume state (step,
optimizer and weights together, one file written atomically), and the finished checkpoint (HF weights + tokenizer +
``evalkit.json`` + ``manifest.json``, the manifest last); DDP replicas checked identical before it is written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evalkit import artifacts
from evalkit.checkpoints import write_metadata
from evalkit.distributed import Dist, broadcast_object, init_distributed
from evalkit.errors import EvalkitError
from evalkit.models import raw_bytes

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "trainer_config.json"
_last_progress: dict[str, float] = {}  # when each folder last logged a progress line


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(raw_bytes(p))
    return h.hexdigest()


def check_replicas_in_sync(model: torch.nn.Module, d: Dist) -> list[str]:
    """Every rank's weight digest; raises when DDP replicas have drifted apart."""
    digest = weights_digest(model)
    if not d.enabled:
        return [digest]
    gathered: list[Any] = [None] * d.world
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"DDP replicas differ after training: {gathered}")
    return gathered


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def prepare_out_dir(out_dir: Path, cfg: Any, resume: bool) -> dict | None:
    """Create ``out_dir``; return the resume state when a run with the same config was interrupted there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, cfg_path = out_dir / STATE_FILE, out_dir / CONFIG_FILE
    if resume and state_path.is_file() and cfg_path.is_file():
        if json.loads(cfg_path.read_text()) == config_dict(cfg):
            try:
                state = torch.load(state_path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 — any unreadable state means the same thing: start over
                state = {}
            if "weights" in state:
                return state
            log.warning("%s: its resume state is unreadable or from an older evalkit; starting afresh", out_dir)
        else:
            log.warning("%s holds a run with another config; starting afresh", out_dir)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    return None


def start_run(out_dir: Path, cfg: Any, resume: bool) -> tuple[Dist, dict | None]:
    """Join the process group (under torchrun) and prepare ``out_dir`` on rank 0; every rank gets the resume state."""
    d = init_distributed(cfg.threads)
    state = prepare_out_dir(out_dir, cfg, resume) if d.main else None
    if d.enabled:
        state = broadcast_object(state, d)
    return d, state


def append_metrics(out_dir: Path, row: dict) -> None:
    """One metrics row; also a progress log line (``evalkit`` logger, INFO) at most every 15 s per folder."""
    with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=float) + "\n")
        fh.flush()
    key, now = str(out_dir), time.monotonic()
    if "step" in row and now - _last_progress.get(key, 0.0) >= 15:
        _last_progress[key] = now
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k in ("step", "loss", "val_loss", "accuracy"))
        log.info("%s/%s: %s", Path(out_dir).parent.name, Path(out_dir).name, shown)


def read_metrics(folder: str | Path) -> list[dict]:
    """The metric rows; a last line cut short (the process was killed while appending it) is left out."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text("utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise EvalkitError(f"{path}: line {n + 1} is not a JSON metrics row") from None
    return rows


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metric rows logged after the saved step (they are logged again on resume)."""
    rows = [r for r in read_metrics(out_dir) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    artifacts.atomic_write(out_dir / METRICS_FILE, lambda tmp: Path(tmp).write_bytes(text))


def save_state(out_dir: Path, cfg: Any, state: dict, models: dict[str, torch.nn.Module]) -> None:
    """The resume state — step, optimizer, and the training ``models``' weights — in one file written atomically, so
    a process killed at any moment leaves the previous state or this one, never weights of one step beside the
    optimizer of another. The config is written first: a state is only ever read beside its config."""
    artifacts.write_json(out_dir / CONFIG_FILE, config_dict(cfg))
    weights = {name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in models.items()}
    artifacts.atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save({**state, "weights": weights}, tmp))


def load_weights(state: dict | None, models: dict[str, torch.nn.Module]) -> None:
    """Put the weights saved by :func:`save_state` back into freshly built ``models`` (nothing when not resuming)."""
    if state:
        for name, m in models.items():
            m.load_state_dict(state["weights"][name])


def finish_checkpoint(out_dir: Path, cfg: Any, stage: str, inputs: list[Path], extra: dict) -> None:
    """Mark a checkpoint complete: metadata, trainer_config.json and manifest.json; the resume state is removed."""
    write_metadata(out_dir, stage=stage, **extra)
    artifacts.write_json(out_dir / CONFIG_FILE, config_dict(cfg))
    files = [p for p in inputs if p.is_file()]
    manifest = artifacts.build_manifest(f"checkpoint:{stage}", config_dict(cfg), inputs=files, seeds={"seed": getattr(cfg, "seed", None)}, extra={"metadata": extra})
    artifacts.write_manifest(out_dir, manifest)
    (out_dir / STATE_FILE).unlink(missing_ok=True)


def input_files(folder: str | Path | None) -> list[Path]:
    if not folder:
        return []
    folder = Path(folder)
    return sorted(p for p in folder.glob("*.safetensors")) + [p for p in (folder / "tokenizer.json",) if p.is_file()]
