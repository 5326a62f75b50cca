"""Supervised fine-tuning: query → " " + reference + EOS, the loss on summary tokens only (REFERENCE.md).

Reads top to bottom: 1. examples, 2. model, 3. loop (batch, masked loss, step, log, save), 4. held-out loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from evalkit.data.query import MAX_QUERY_TOKENS, MAX_SUMMARY_TOKENS
from evalkit.models import count_params, load_causal_lm, load_tokenizer, read_metadata
from evalkit.train import common

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    init: str  # a pretrained checkpoint folder (ours or any HF causal LM)
    batch_size: int = 8
    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_summary_tokens: int = MAX_SUMMARY_TOKENS
    max_items: int = 0  # 0 = every TL;DR train post
    save_every: int = 100
    seed: int = 0
    threads: int = 0


def sft_examples(tok, items: pd.DataFrame, max_query_tokens: int, max_summary_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) with labels = IGNORE on the query so only summary tokens carry loss."""
    out = []
    for item in items.to_dict("records"):
        query = common.encode_query(tok, item, max_query_tokens)
        summary = common.encode_summary(tok, item["reference"], max_summary_tokens)
        out.append((query + summary, [IGNORE] * len(query) + summary))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = common.pad_batch([e[0] for e in examples], pad_id)
    labels, _ = common.pad_batch([e[1] for e in examples], IGNORE)
    return ids, mask, labels


@torch.no_grad()
def summary_loss(model, examples, pad_id: int, device, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    for chunk in common.iterate(examples, batch_size):
        ids, mask, labels = (t.to(device) for t in collate(chunk, pad_id))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += int((target != IGNORE).sum())
    return total / max(1, count)


def train_items(max_items: int = 0) -> pd.DataFrame:
    from evalkit.data import load_items

    items = load_items("tldr", "train")
    items = items[items["reference"].notna()].reset_index(drop=True)
    common.assert_no_held_out(items, "SFT data")
    return items.head(max_items) if max_items else items


def sft(cfg: SFTConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.init)
    d, state = common.start_run(out_dir, cfg, resume)

    # 1. examples: TL;DR train posts with their references; a held-out slice of valid1 for the loss
    examples = sft_examples(tok, train_items(cfg.max_items), cfg.max_query_tokens, cfg.max_summary_tokens)
    from evalkit.data import load_items

    held_out = sft_examples(tok, load_items("tldr", "valid1").head(64), cfg.max_query_tokens, cfg.max_summary_tokens)

    # 2. model: the pretrained checkpoint, or this folder's weights when resuming
    model = load_causal_lm(out_dir if state else cfg.init).to(d.device).train()
    ddp = DDP(model) if d.enabled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        common.truncate_metrics(out_dir, step)

    # 3. loop
    per_epoch = max(1, len(examples) // (cfg.batch_size * d.world))
    t0 = time.perf_counter()
    while step < cfg.steps:
        epoch, index = divmod(step, per_epoch)
        batch = [examples[i] for i in common.batch_order(len(examples), cfg.batch_size, cfg.seed, epoch, d)[index]]
        ids, mask, labels = (t.to(d.device) for t in collate(batch, tok.pad_token_id))
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = ddp(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_value = common.all_reduce_mean(loss.item(), d)
        if d.main:
            common.append_metrics(out_dir, {"step": step, "loss": loss_value, "lr": lr, "epoch": epoch,
                                            "elapsed_s": time.perf_counter() - t0})
            if step % cfg.save_every == 0 and step < cfg.steps:
                model.save_pretrained(out_dir)
                common.save_state(out_dir, cfg, {"step": step, "optimizer": opt.state_dict()})

    # 4. held-out summary loss and the finished checkpoint
    model.eval()
    digests = common.check_replicas_in_sync(model, d)
    if d.main:
        val_loss = summary_loss(model, held_out, tok.pad_token_id, d.device)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        common.append_metrics(out_dir, {"step": step, "val_loss": val_loss})
        parent = read_metadata(cfg.init)
        common.finish_checkpoint(out_dir, cfg, "sft", common.input_files(cfg.init), {
            "policy_kind": "sft", "depth": parent.get("depth"), **count_params(model), "val_loss": val_loss,
            "steps": step, "init": str(cfg.init), "world_size": d.world, "replica_digests": digests,
        })
    common.shutdown_distributed(d)
    return out_dir
