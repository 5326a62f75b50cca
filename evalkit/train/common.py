"""What every trainer shares: the leak-checked training corpus, distributed set-up, deterministic batch order,
checkpoint folders (HF weights + tokenizer + trainer_config.json + metrics.jsonl + manifest.json) and resume state.
"""

from __future__ import annotations

import contextlib
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


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in any dtype (numpy has no bfloat16: weights cast for a bf16 pass are digested too)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


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
    import time

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


def by_length(lengths: list[int], size: int) -> Iterator[list[int]]:
    """Index batches in order of length, so that each padded batch wastes little compute on padding."""
    yield from iterate(sorted(range(len(lengths)), key=lambda i: lengths[i]), size)


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


# ------------------------------------------------------------------------------------------------- parameters

LAYER_ATTRS = ("layers", "h", "blocks")  # the block stack: Llama/Gemma, GPT-2, others
NORM_ATTRS = ("norm", "ln_f", "final_layernorm")  # the final norm after it


def _attr(base: torch.nn.Module, names: tuple[str, ...], kind: type) -> str | None:
    return next((n for n in names if isinstance(getattr(base, n, None), kind)), None)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a causal LM or backbone (GPT-2 ``h``, Llama/Gemma ``layers``)."""
    base = getattr(model, "base_model", model)
    name = _attr(base, LAYER_ATTRS, torch.nn.ModuleList)
    if name:
        return getattr(base, name)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise EvalkitError(f"{type(model).__name__}: no stack of transformer blocks found")
    return max(lists, key=len)


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "base_model", model)
    name = _attr(base, NORM_ATTRS, torch.nn.Module)
    return getattr(base, name) if name else None


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


# ------------------------------------------------------------------------------------------- sampling and scoring

def finished(ids: list[int], hit_eos: bool, stop_ids: set[int]) -> bool:
    """Whether a completion stopped by the contract's rule (EOS or a newline token) rather than running out."""
    return hit_eos or bool(ids and ids[-1] in stop_ids)


def response_text(tok, ids: list[int]) -> str:
    """A completion's summary text: special tokens dropped, cut at the first newline, stripped (the contract's rule)."""
    from evalkit.generate import postprocess

    return postprocess(tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True))


@torch.no_grad()
def score_summaries(reward_model, tok, queries: list[list[int]], texts: list[str], contract, device=torch.device("cpu"),
                    batch_size: int = 16) -> torch.Tensor:
    """Reward-model scores of summaries in the contract's canonical form: query + " " + text + EOS.

    Every scorer (RM training and evaluation, PPO, best-of-N, held-out quality) goes through this form, so the RM
    never sees a newline token or a multi-line completion it was not trained on."""
    seqs = [q + encode_summary(tok, t, contract.max_summary_tokens) for q, t in zip(queries, texts)]
    out = torch.zeros(len(seqs))
    for chunk in by_length([len(s) for s in seqs], batch_size):
        ids, mask = pad_batch([seqs[i] for i in chunk], tok.pad_token_id)
        out[chunk] = reward_model(ids.to(device), mask.to(device)).float().cpu()
    return out


@torch.no_grad()
def score_candidates(reward_model, tok, queries: list[list[int]], texts: list[str], n: int, contract,
                     device=torch.device("cpu"), batch_size: int = 8) -> torch.Tensor:
    """The same scores as :func:`score_summaries` for ``n`` candidate summaries per query (``texts`` query-major),
    with each query run through the reward model once (:func:`prefix_scores`). For best-of-N the query is ~90% of
    every scored sequence."""
    summaries = [encode_summary(tok, t, contract.max_summary_tokens) for t in texts]
    return prefix_scores(reward_model, queries, summaries, n, tok.pad_token_id, device, batch_size)


@torch.no_grad()
def prefix_scores(reward_model, prefixes: list[list[int]], suffixes: list[list[int]], n: int, pad_id: int,
                  device=torch.device("cpu"), batch_size: int = 8) -> torch.Tensor:
    """Reward-model scores of ``prefix + suffix`` for ``n`` non-empty suffixes per prefix (query-major): each prefix
    runs once, its KV cache is copied to its ``n`` rows, which then run only their suffix tokens. The score is read
    at each suffix's last token, as the reward model reads a whole sequence's."""
    from evalkit.models import position_ids

    out = torch.zeros(len(suffixes))
    for chunk in by_length([len(q) for q in prefixes], batch_size):
        q_ids, q_mask = (t.to(device) for t in pad_batch([prefixes[i] for i in chunk], pad_id, side="left"))
        cache = reward_model.backbone(input_ids=q_ids, attention_mask=q_mask, position_ids=position_ids(q_mask), use_cache=True).cache
        cache.batch_repeat_interleave(n)
        rows = [i * n + k for i in chunk for k in range(n)]
        s_ids, s_mask = (t.to(device) for t in pad_batch([suffixes[r] for r in rows], pad_id))
        mask = torch.cat([q_mask.repeat_interleave(n, 0), s_mask], 1)
        start = q_mask.sum(1).repeat_interleave(n)[:, None]
        hidden = reward_model.backbone(input_ids=s_ids, attention_mask=mask, position_ids=start + torch.arange(s_ids.shape[1], device=device),
                                       cache=cache, use_cache=True).last_hidden_state
        out[rows] = reward_model.head_scores(hidden[torch.arange(len(rows), device=device), s_mask.sum(1) - 1]).cpu()
    return out


def shared_prefix(a: list[int], b: list[int]) -> int:
    """The length of the common start of two token sequences, leaving each at least its last token."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(a) - 1, len(b) - 1)


def best_index(scores: torch.Tensor, is_finished: list[bool], no_eos_score: float) -> int:
    """Best-of-N's pick: the highest score under the contract (an unfinished candidate scores ``no_eos_score``), ties
    (e.g. every candidate unfinished) broken by the reward model's own score."""
    keys = [(float(s) if fin else no_eos_score, float(s)) for s, fin in zip(scores, is_finished)]
    return max(range(len(keys)), key=lambda i: keys[i])


def best_of_n_candidates(model, tok, reward_model, queries: list[list[int]], seeds: list[int], n: int, temperature: float,
                         contract, prefill_chunk: int = 16, shared=None) -> tuple[list[tuple[list[int], bool]], torch.Tensor, list[int]]:
    """N samples per query (``seeds``: one per candidate, query-major), their RM scores in the canonical form and the
    index of each query's kept candidate (``best_index``). Returns (candidates as (ids, finished), raw scores, best)."""
    cands = sample(model, tok, queries, contract, temperature, seeds, batch_size=len(queries), prefill_chunk=prefill_chunk, repeats=n,
                   shared=shared)
    device = next(reward_model.parameters()).device
    raw = score_candidates(reward_model, tok, queries, [response_text(tok, ids) for ids, _ in cands], n, contract, device)
    best = [best_index(raw[q * n: (q + 1) * n], [fin for _, fin in cands[q * n: (q + 1) * n]], contract.no_eos_score)
            for q in range(len(queries))]
    return cands, raw, best


def sample(model, tok, queries: list[list[int]], contract, temperature: float, seeds: list[int], batch_size: int = 32,
           prefill_chunk: int = 16, repeats: int = 1, shared=None) -> list[tuple[list[int], bool]]:
    """Completions from ``evalkit.generate.decode_batch`` (the one sampling loop), with the contract's stop rule;
    queries are decoded in length-sorted batches and returned in their original order as (ids, finished). With
    ``repeats`` = N each query is prefilled once and sampled N times (``seeds`` and the result: N per query,
    query-major). ``shared``: a lineage's shared lower blocks (``evalkit.generate.SharedPrefix``)."""
    from evalkit.generate import Decoding, decode_batch, newline_token_ids

    stop = newline_token_ids(tok)
    stop_set = set(stop.tolist())
    dec = Decoding(temperature=temperature, max_new_tokens=contract.max_summary_tokens, max_query_tokens=contract.max_query_tokens)
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    out: list[tuple[list[int], bool]] = [([], False)] * (len(queries) * repeats)
    for chunk in iterate(order, batch_size):
        rows = [i * repeats + k for i in chunk for k in range(repeats)]
        results = decode_batch(model, tok, [queries[i] for i in chunk], dec, [seeds[r] for r in rows], stop, prefill_chunk, repeats, shared)
        for r, (ids, hit) in zip(rows, results):
            out[r] = (ids, finished(ids, hit, stop_set))
    return out


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
    from evalkit.models import position_ids

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

def _layers_attr(base: torch.nn.Module) -> str:
    name = _attr(base, LAYER_ATTRS, torch.nn.ModuleList)
    if name is None:
        raise EvalkitError(f"{type(base).__name__}: no stack of transformer blocks found")
    return name


class _Swap:
    """Temporarily replace attributes of a module (restored on exit, also on error)."""

    def __init__(self, module: torch.nn.Module, **attrs):
        self.module, self.attrs, self.saved = module, attrs, {}

    def __enter__(self):
        for name, value in self.attrs.items():
            self.saved[name] = getattr(self.module, name)
            setattr(self.module, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)


@contextlib.contextmanager
def top_blocks(model: torch.nn.Module, k: int) -> Iterator[None]:
    """Within the context the model runs only its top ``k`` blocks, on hidden states passed as ``inputs_embeds``.

    Models that pick each block's attention by its position in the stack (Gemma 3 reads ``config.layer_types[i]``:
    sliding-window or full attention) see the top ``k`` entries of that list too, or the top blocks would run with
    the bottom blocks' masks."""
    base = getattr(model, "base_model", model)
    name = _layers_attr(base)
    layers = getattr(base, name)
    types = getattr(base.config, "layer_types", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_Swap(base, **{name: torch.nn.ModuleList(list(layers)[len(layers) - k:])}))
        if types:
            stack.enter_context(_Swap(base.config, layer_types=list(types)[len(types) - k:]))
        yield


def trunk_digest(model: torch.nn.Module, k: int) -> str:
    """A digest of everything below the top ``k`` blocks: the embeddings and the lower blocks."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, _layers_attr(base))
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
        if any(hasattr(b, "wpe") for b in bases) or k >= len(getattr(bases[0], _layers_attr(bases[0]))):
            return None
        digests = {trunk_digest(m, k) for m in models}
        if len(digests) != 1:
            log.warning("the models' lower blocks differ; every model runs whole")
            return None
        return cls(models[0], k)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from evalkit.models import position_ids

        base = getattr(self.model, "base_model", self.model)
        name = _layers_attr(base)
        layers = getattr(base, name)
        swaps = {name: torch.nn.ModuleList(list(layers)[: len(layers) - self.k])}
        norm = _attr(base, NORM_ATTRS, torch.nn.Module)
        if norm:
            swaps[norm] = torch.nn.Identity()
        with _Swap(base, **swaps):
            return base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state
