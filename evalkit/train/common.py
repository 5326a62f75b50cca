"""What every trainer shares: the leak-checked training corpus, distributed set-up, deterministic batch order,
checkpoint folders (HF weights + tokenizer + trainer_config.json + metrics.jsonl + manifest.json) and resume state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from evalkit import artifacts
from evalkit.checkpoints import write_metadata
from evalkit.decoding import pad_batch
from evalkit.distributed import Dist, broadcast_object, init_distributed
from evalkit.errors import EvalkitError
from evalkit.models import decoder_layers, final_norm, final_norm_attr, layers_attr, position_ids, raw_bytes, swapped, top_blocks
from evalkit.seeds import derive_seed

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "trainer_config.json"


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


def batch_order(n: int, batch_size: int, seed: int, epoch: int, d: Dist) -> list[np.ndarray]:
    """This rank's batches for one epoch: a permutation seeded by (seed, epoch), global batches split across ranks."""
    perm = np.random.default_rng(derive_seed("batch-order", seed, epoch)).permutation(n)
    global_bs = batch_size * d.world
    out = []
    for start in range(0, n - global_bs + 1, global_bs):
        out.append(perm[start: start + global_bs][d.rank:: d.world])
    return out


# -------------------------------------------------------------------------------------------- checkpoint folder

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


_last_progress: dict[str, float] = {}


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


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------- parameters

def freeze_lower_layers(model: torch.nn.Module, trainable_layers: int, extra: tuple[torch.nn.Module, ...] = ()) -> dict:
    """Train only the top ``trainable_layers`` blocks (plus the final norm and ``extra`` modules, e.g. a reward head);
    0 trains everything. Embeddings (and a tied LM head) stay frozen when only some blocks train."""
    layers = decoder_layers(model)
    if trainable_layers < 0 or trainable_layers > len(layers):
        raise EvalkitError(f"trainable_layers {trainable_layers}: expected 0 (all) to {len(layers)} (the model's blocks)")
    if trainable_layers:
        model.requires_grad_(False)
        for module in [*layers[len(layers) - trainable_layers:], final_norm(model), *extra]:
            if module is not None:
                module.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_layers": trainable_layers or len(layers), "n_layers": len(layers), "n_params_trainable": n_train}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices only, never on norms, biases or
    embeddings."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in emb else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def join_query_response(queries: list[list[int]], responses: list[list[int]], pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Left-padded queries followed by right-padded responses: (ids, attention mask, query width, response mask).

    An empty response keeps one masked pad so the tensor has a response column."""
    q_ids, q_mask = pad_batch(queries, pad_id, side="left")
    r_ids, r_mask = pad_batch([r if r else [pad_id] for r in responses], pad_id, side="right")
    r_mask = r_mask * torch.tensor([[1] if r else [0] for r in responses])
    return torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), q_ids.shape[1], r_mask.float()


def response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, q_len: int, temperature: float,
                      trunk: "SharedTrunk | None" = None, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens (positions ``q_len`` on) and the per-token entropy (no gradient).

    Only the positions that predict response tokens go through the LM head (``logits_to_keep``): for a 512-token
    query and a 48-token summary that skips >90% of the vocabulary projection, the largest cost of a small model.
    Logits are divided by the sampling temperature, as where the tokens were sampled. With a shared trunk and its
    output ``hidden``, only the model's top blocks run.
    """

    n_resp = ids.shape[1] - q_len
    kw = dict(attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=n_resp + 1, use_cache=False)
    if hidden is not None:
        inner = getattr(model, "module", model)
        with top_blocks(inner, trunk.k):
            logits = model(inputs_embeds=hidden, **kw).logits
    else:
        logits = model(input_ids=ids, **kw).logits
    logits = logits[:, :-1].float() / max(temperature, 1e-6)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, q_len:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------------------------------- shared frozen trunk

def trunk_digest(model: torch.nn.Module, k: int) -> str:
    """A digest of everything below the top ``k`` blocks: the embeddings and the lower blocks."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, layers_attr(base))
    h = hashlib.sha256()
    for module in [base.get_input_embeddings(), *list(layers)[: len(layers) - k]]:
        for p in module.parameters():
            h.update(raw_bytes(p))
    return h.hexdigest()


class SharedTrunk:
    """The frozen lower blocks that every model of one lineage shares when only the top ``k`` blocks train.

    PPO runs four models (policy, SFT reference, value model, reward model) over the same sequences, and the
    policy and value model again in every epoch. When their embeddings and lower blocks are bit-identical (checked
    once, by digest), the lower blocks run once per batch and each model runs only its own top ``k`` blocks on that
    output: the same numbers (up to float reassociation) for a fraction of the cost. Models with learned absolute
    position embeddings (GPT-2's ``wpe``) add them to ``inputs_embeds`` and are not shared.
    """

    def __init__(self, model: torch.nn.Module, k: int):
        self.model, self.k = model, k

    @classmethod
    def build(cls, models: list[torch.nn.Module], k: int) -> "SharedTrunk | None":
        if k <= 0:
            return None
        bases = [getattr(m, "base_model", m) for m in models]
        if any(hasattr(b, "wpe") for b in bases) or k >= len(getattr(bases[0], layers_attr(bases[0]))):
            return None
        digests = {trunk_digest(m, k) for m in models}
        if len(digests) != 1:
            log.warning("the models' lower blocks differ; every model runs whole")
            return None
        return cls(models[0], k)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:

        base = getattr(self.model, "base_model", self.model)
        name = layers_attr(base)
        layers = getattr(base, name)
        swaps = {name: torch.nn.ModuleList(list(layers)[: len(layers) - self.k])}
        norm = final_norm_attr(base)
        if norm:
            swaps[norm] = torch.nn.Identity()
        with swapped(base, **swaps):
            return base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state
