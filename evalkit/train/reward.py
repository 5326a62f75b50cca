"""Reward model: the SFT checkpoint with a scalar head, trained on pairwise judgments with the Bradley–Terry loss
``-log σ(r(x, y_preferred) − r(x, y_other))`` for one epoch (REFERENCE.md).

The judgments may be imported human labels, simulated ones or both: any folder holding the items, generations, tasks
and judgments tables. The reward is read at the last real token (the EOS; padding is a distinct token and never
read). After training the head's bias is shifted so that human references score 0 on average.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from evalkit import artifacts
from evalkit.data.query import MAX_QUERY_TOKENS, MAX_SUMMARY_TOKENS
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, count_params, load_causal_lm, load_tokenizer, read_metadata
from evalkit.train import common

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardConfig:
    init: str  # the SFT checkpoint
    comparisons: str  # a folder with items/generations/tasks/judgments parquet tables
    train_splits: tuple[str, ...] = ("train", "valid1")
    eval_split: str = "valid2"
    batch_size: int = 8
    epochs: int = 1
    lr: float = 3e-4
    warmup_steps: int = 5
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_summary_tokens: int = MAX_SUMMARY_TOKENS
    save_every: int = 100
    seed: int = 0
    threads: int = 0


def load_comparison_tables(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalkitError(f"no comparisons folder at {folder}; expected items/generations/tasks/judgments parquet tables")
    return {name: artifacts.read_table(folder / f"{name}.parquet", name) for name in ("items", "generations", "tasks", "judgments")}


def preference_pairs(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per pairwise judgment: the item, the preferred and the other summary's text, and the split."""
    tasks = tables["tasks"][tables["tasks"]["kind"] == "pairwise"]
    j = tables["judgments"].dropna(subset=["preferred_gen_id"]).merge(tasks[["task_id", "item_id", "gen_id_left", "gen_id_right"]], on="task_id")
    j["other_gen_id"] = j["gen_id_right"].where(j["preferred_gen_id"] == j["gen_id_left"], j["gen_id_left"])
    text = tables["generations"].set_index("gen_id")["text"]
    items = tables["items"].set_index("item_id")
    out = pd.DataFrame({
        "item_id": j["item_id"], "chosen": j["preferred_gen_id"].map(text), "rejected": j["other_gen_id"].map(text),
        "split": j["item_id"].map(items["split"]), "labeler_kind": j["labeler_kind"],
    })
    return out.dropna(subset=["chosen", "rejected"]).reset_index(drop=True)


def encode_pairs(tok, pairs: pd.DataFrame, items: pd.DataFrame, cfg: RewardConfig) -> list[tuple[list[int], list[int]]]:
    by_id = items.set_index("item_id")
    out = []
    for item_id, chosen, rejected in zip(pairs["item_id"], pairs["chosen"], pairs["rejected"]):
        item = {"item_id": item_id, **by_id.loc[item_id].to_dict()}
        query = common.encode_query(tok, item, cfg.max_query_tokens)
        out.append((query + common.encode_summary(tok, chosen, cfg.max_summary_tokens),
                    query + common.encode_summary(tok, rejected, cfg.max_summary_tokens)))
    return out


def pair_rewards(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected sequences, one forward pass over both."""
    ids, mask = common.pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    r = model(ids.to(device), mask.to(device))
    return r[: len(pairs)], r[len(pairs):]


@torch.no_grad()
def accuracy(model, pairs, pad_id: int, device, batch_size: int = 16) -> float:
    correct = 0
    for chunk in common.iterate(pairs, batch_size):
        rc, rr = pair_rewards(model, chunk, pad_id, device)
        correct += int((rc > rr).sum())
    return correct / max(1, len(pairs))


@torch.no_grad()
def score_texts(model, tok, items: list[dict], texts: list[str], max_query_tokens: int, max_summary_tokens: int, device, batch_size: int = 16) -> torch.Tensor:
    seqs = [common.encode_query(tok, it, max_query_tokens) + common.encode_summary(tok, t, max_summary_tokens) for it, t in zip(items, texts)]
    out = []
    for chunk in common.iterate(seqs, batch_size):
        ids, mask = common.pad_batch(chunk, tok.pad_token_id)
        out.append(model(ids.to(device), mask.to(device)))
    return torch.cat(out) if out else torch.zeros(0)


def train_reward_model(cfg: RewardConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.init)
    d, state = common.start_run(out_dir, cfg, resume)

    # 1. pairs: training splits for the loss, the eval split for held-out accuracy
    tables = load_comparison_tables(cfg.comparisons)
    pairs = preference_pairs(tables)
    train = pairs[pairs["split"].isin(cfg.train_splits)]
    held = pairs[pairs["split"] == cfg.eval_split]
    if train.empty:
        raise EvalkitError(f"{cfg.comparisons}: no pairwise judgments in splits {', '.join(cfg.train_splits)} to train on")
    train_pairs = encode_pairs(tok, train, tables["items"], cfg)
    held_pairs = encode_pairs(tok, held, tables["items"], cfg)

    # 2. model: SFT backbone + head initialised N(0, 1/(d+1))
    lm = load_causal_lm(cfg.init)
    model = RewardModel.load(out_dir) if state else RewardModel.from_causal_lm(lm, seed=cfg.seed)
    model.to(d.device).train()
    ddp = DDP(model) if d.enabled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    per_epoch = max(1, len(train_pairs) // (cfg.batch_size * d.world))
    total = per_epoch * cfg.epochs
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        common.truncate_metrics(out_dir, start)

    # 3. loop: Bradley–Terry loss, one epoch by default
    t0 = time.perf_counter()
    for step in range(start, total):
        epoch, index = divmod(step, per_epoch)
        batch = [train_pairs[i] for i in common.batch_order(len(train_pairs), cfg.batch_size, cfg.seed, epoch, d)[index]]
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, total)
        for group in opt.param_groups:
            group["lr"] = lr
        rc, rr = pair_rewards(ddp, batch, tok.pad_token_id, d.device)
        loss = -F.logsigmoid(rc - rr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = common.all_reduce_mean(float((rc > rr).float().mean()), d)
        loss_value = common.all_reduce_mean(loss.item(), d)
        if d.main:
            common.append_metrics(out_dir, {"step": step + 1, "loss": loss_value, "accuracy": acc,
                                            "lr": lr, "elapsed_s": time.perf_counter() - t0})
            if (step + 1) % cfg.save_every == 0 and step + 1 < total:
                model.save(out_dir)
                common.save_state(out_dir, cfg, {"step": step + 1, "optimizer": opt.state_dict()})

    # 4. normalise: references score 0 on average (over the training items that have one)
    model.eval()
    digests = common.check_replicas_in_sync(model, d)
    if not d.main:
        common.shutdown_distributed(d)
        return out_dir
    ref_items = tables["items"][tables["items"]["item_id"].isin(train["item_id"]) & tables["items"]["reference"].notna()]
    records = ref_items.to_dict("records")
    ref_scores = score_texts(model, tok, records, [r["reference"] for r in records], cfg.max_query_tokens, cfg.max_summary_tokens, d.device)
    shift = float(ref_scores.mean()) if len(ref_scores) else 0.0
    with torch.no_grad():
        model.head.bias -= shift

    # 5. held-out accuracy and the checkpoint
    held_acc = accuracy(model, held_pairs, tok.pad_token_id, d.device) if held_pairs else None
    train_acc = accuracy(model, train_pairs[:256], tok.pad_token_id, d.device)
    model.save(out_dir)
    tok.save_pretrained(out_dir)
    summary = {"step": total, "held_out_accuracy": held_acc, "n_held_out": len(held_pairs), "train_accuracy": train_acc,
               "n_train": len(train_pairs), "reference_mean_shift": shift}
    common.append_metrics(out_dir, summary)
    parent = read_metadata(cfg.init)
    common.finish_checkpoint(out_dir, cfg, "reward", common.input_files(cfg.init) + sorted(Path(cfg.comparisons).glob("*.parquet")), {
        "model_kind": "reward", "depth": parent.get("depth"), **count_params(lm), **{k: v for k, v in summary.items() if k != "step"},
        "labeler_kinds": sorted(train["labeler_kind"].unique()), "world_size": d.world, "replica_digests": digests,
    })
    common.shutdown_distributed(d)
    return out_dir
