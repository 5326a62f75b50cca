"""What every trainer shares: the leak-checked training corpus, distributed set-up, deterministic batch order,
checkpoint folders (HF weights + tokenizer + trainer_config.json + metrics.jsonl + manifest.json) and resume state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from evalkit import artifacts
from evalkit.errors import EvalkitError
from evalkit.seeds import derive_seed

log = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("valid1", "valid2")
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "trainer_config.json"


# ---------------------------------------------------------------------------------------------------------- data

def assert_no_held_out(items: pd.DataFrame, what: str) -> None:
    """Refuse any valid1/valid2 item in a training corpus (by split and by id against every known held-out item)."""
    from evalkit.data import load_items

    bad = items[items["split"].isin(HELD_OUT_SPLITS)]
    if len(bad):
        raise EvalkitError(f"{what}: item {bad['item_id'].iloc[0]} is in split {bad['split'].iloc[0]}; held-out text may not be trained on")
    held_out = set()
    for dataset in items["dataset"].unique():
        for split in HELD_OUT_SPLITS:
            held_out |= set(load_items(dataset, split)["item_id"])
    leaked = sorted(set(items["item_id"]) & held_out)
    if leaked:
        raise EvalkitError(f"{what}: item {leaked[0]} is held out (valid1/valid2) in the bundled data; it may not be trained on")


def pretraining_texts(max_items: int | None = None) -> list[str]:
    """Documents for pretraining: TL;DR ``train`` posts (title and post) and the CNN/DM ``train`` articles."""
    from evalkit.data import load_items

    tldr = load_items("tldr", "train")
    cnndm = load_items("cnndm", "train")
    assert_no_held_out(pd.concat([tldr, cnndm]), "pretraining corpus")
    texts = [f"{t}\n\n{b}" for t, b in zip(tldr["title"], tldr["body"])] + list(cnndm["body"])
    order = np.random.default_rng(derive_seed("pretraining-corpus")).permutation(len(texts))
    texts = [texts[i] for i in order]
    return texts[:max_items] if max_items else texts


# ------------------------------------------------------------------------------------------------ distributed

@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(threads: int = 0) -> Dist:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU); a single process otherwise."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return Dist(rank, world, device)
    return Dist(0, 1, torch.device("cuda") if use_cuda else torch.device("cpu"))


def shutdown_distributed(d: Dist) -> None:
    """Wait for every rank, then leave the process group (a rank exiting while gloo threads run aborts)."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item() / d.world)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
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
            return torch.load(state_path, map_location="cpu", weights_only=False)
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
    with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=float) + "\n")
        fh.flush()


def read_metrics(folder: str | Path) -> list[dict]:
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metric rows logged after the saved step (they are logged again on resume)."""
    rows = [r for r in read_metrics(out_dir) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    tmp = out_dir / (METRICS_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_dir / METRICS_FILE)


def save_state(out_dir: Path, cfg: Any, state: dict) -> None:
    """Resume state (step, optimizer, RNG) and the config; the weights are saved beside it by the caller."""
    tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / STATE_FILE)
    artifacts.write_json(out_dir / CONFIG_FILE, config_dict(cfg))


def finish_checkpoint(out_dir: Path, cfg: Any, stage: str, inputs: list[Path], extra: dict) -> None:
    """Mark a checkpoint complete: metadata, trainer_config.json and manifest.json; the resume state is removed."""
    from evalkit.models import write_metadata

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


def iterate(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i: i + size]


# ------------------------------------------------------------------------------------------------ tokenization

def encode_query(tok, item: dict, max_query_tokens: int) -> list[int]:
    """The item's query (REFERENCE.md format, truncated to fit) as token ids."""
    from evalkit.data.query import format_query

    return list(tok.encode(format_query(item, tok, max_tokens=max_query_tokens), add_special_tokens=False))


def encode_summary(tok, text: str, max_summary_tokens: int, add_eos: bool = True) -> list[int]:
    """' ' + summary, at most ``max_summary_tokens`` tokens, then EOS."""
    from evalkit.data.query import format_summary

    ids = list(tok.encode(format_summary(text), add_special_tokens=False))[:max_summary_tokens]
    return ids + [tok.eos_token_id] if add_eos else ids


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a rectangle; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base_lr``."""
    import math

    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------------ sampling

@torch.no_grad()
def sample_responses(model, tok, queries: list[list[int]], temperature: float, max_new_tokens: int, seed: int,
                     device=torch.device("cpu")) -> tuple[list[list[int]], list[bool]]:
    """Sample one response per query (left-padded batch, KV cache); each is cut after its first EOS.

    Returns the response token lists (EOS included where it was produced) and whether EOS was produced.
    """
    ids, mask = pad_batch(queries, tok.pad_token_id, side="left")
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    responses, hit = [], []
    for row in out[:, ids.shape[1]:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
            hit.append(True)
        else:
            hit.append(False)
        responses.append(row)
    return responses, hit
