"""Supervised fine-tuning: query → " " + reference + EOS, the loss on summary tokens only (REFERENCE.md).

Reads top to bottom: 1. examples, 2. model, 3. loop (batch, masked loss, step, log, save), 4. held-out loss and
quality. The query and summary limits come from the init checkpoint's contract (``evalkit.contract``), never from
this config; ``trainable_layers`` trains only the top blocks (a real 135M model on a CPU).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from evalkit import decoding, distributed, precision as prec
from evalkit.checkpoints import read_metadata
from evalkit.contract import read_contract
from evalkit.data import load_items
from evalkit.data.corpus import assert_no_held_out
from evalkit.models import count_params, load_causal_lm, load_tokenizer
from evalkit.train import checkpointing, optim
from evalkit.train.quality import measure

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
    trainable_layers: int = 0  # 0 = every block; k = only the top k blocks (and the final norm)
    eval_posts: int = 200  # held-out valid1 posts decoded at the end (quality); 0 = none
    max_items: int = 0  # 0 = every TL;DR train post
    save_every: int = 100
    seed: int = 0
    threads: int = 0
    precision: str = "auto"  # auto: bfloat16 autocast where the device has bf16 matrix units (evalkit.precision)


def sft_example(tok, item: dict, max_query_tokens: int, max_summary_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels = IGNORE on the query so only summary tokens carry loss."""
    query = decoding.encode_query(tok, item, max_query_tokens)
    summary = decoding.encode_summary(tok, item["reference"], max_summary_tokens)
    return query + summary, [IGNORE] * len(query) + summary


def sft_examples(tok, items: pd.DataFrame, max_query_tokens: int, max_summary_tokens: int) -> list[tuple[list[int], list[int]]]:
    return [sft_example(tok, item, max_query_tokens, max_summary_tokens) for item in items.to_dict("records")]


class SummaryLoss(torch.nn.Module):
    """Next-token loss on summary tokens only, with only those positions projected through the LM head (the query
    positions, most of each sequence, never pay for the vocabulary). Wrapped whole by DDP so gradients sync."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[keep]).float()
        return torch.nn.functional.cross_entropy(logits, target[keep])


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = decoding.pad_batch([e[0] for e in examples], pad_id)
    labels, _ = decoding.pad_batch([e[1] for e in examples], IGNORE)
    return ids, mask, labels


@torch.no_grad()
def summary_loss(model, examples, pad_id: int, device, batch_size: int = 16, precision: str = "float32") -> float:
    """Mean next-token loss over the summary tokens of ``examples`` (only those positions reach the LM head)."""
    loss_fn, total, count = SummaryLoss(model), 0.0, 0
    for chunk in decoding.iterate(examples, batch_size):
        ids, mask, labels = (t.to(device) for t in collate(chunk, pad_id))
        n = int((labels[:, 1:] != IGNORE).sum())
        with prec.autocast(precision, device):
            loss = loss_fn(ids, mask, labels)
        total += loss.item() * n
        count += n
    return total / max(1, count)


def train_items(max_items: int = 0) -> pd.DataFrame:
    items = load_items("tldr", "train")
    items = items[items["reference"].notna()].reset_index(drop=True)
    assert_no_held_out(items, "SFT data")
    return items.head(max_items) if max_items else items


def sft(cfg: SFTConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.init)
    contract = read_contract(cfg.init)
    d, state = checkpointing.start_run(out_dir, cfg, resume)
    precision = prec.resolve(cfg.precision, d.device)

    # 1. examples: TL;DR train posts with their references (each encoded when a batch first reaches it); a held-out
    #    slice of valid1 for the loss
    records = train_items(cfg.max_items).to_dict("records")
    example = functools.cache(lambda i: sft_example(tok, records[i], contract.max_query_tokens, contract.max_summary_tokens))
    held_out = sft_examples(tok, load_items("tldr", "valid1").head(32), contract.max_query_tokens, contract.max_summary_tokens)

    # 2. model: the pretrained checkpoint (with the saved weights when resuming); the top blocks train
    model = load_causal_lm(cfg.init)
    checkpointing.load_weights(state, {"model": model})
    model = model.to(d.device).train()
    frozen = optim.freeze_lower_layers(model, cfg.trainable_layers)
    loss_fn = SummaryLoss(model)
    ddp = distributed.replicate(loss_fn, d)
    opt = torch.optim.AdamW(optim.param_groups(model, cfg.weight_decay), lr=cfg.lr)
    step = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        checkpointing.truncate_metrics(out_dir, step)

    # 3. loop
    per_epoch = max(1, len(records) // (cfg.batch_size * d.world))
    t0 = time.perf_counter()
    while step < cfg.steps:
        epoch, index = divmod(step, per_epoch)
        batch = [example(i) for i in optim.batch_order(len(records), cfg.batch_size, cfg.seed, epoch, d)[index]]
        ids, mask, labels = (t.to(d.device) for t in collate(batch, tok.pad_token_id))
        lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        with prec.autocast(precision, d.device):
            loss = ddp(ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optim.trainable(model), 1.0)
        opt.step()
        step += 1
        loss_value = distributed.all_reduce_mean(loss.item(), d)
        if d.main:
            checkpointing.append_metrics(out_dir, {"step": step, "loss": loss_value, "lr": lr, "epoch": epoch,
                                            "elapsed_s": time.perf_counter() - t0})
            if step % cfg.save_every == 0 and step < cfg.steps:
                checkpointing.save_state(out_dir, cfg, {"step": step, "optimizer": opt.state_dict()}, {"model": model})

    # 4. held-out summary loss, held-out quality (greedy summaries of valid1 posts) and the finished checkpoint
    del ddp  # no DDP wrapper may outlive the process group (distributed.shutdown_distributed)
    model.eval()
    digests = checkpointing.check_replicas_in_sync(model, d)
    if d.main:
        val_loss = summary_loss(model, held_out, tok.pad_token_id, d.device, precision=precision)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        checkpointing.append_metrics(out_dir, {"step": step, "val_loss": val_loss})
        quality = measure(model, tok, contract, out_dir, cfg.eval_posts, device=d.device, precision=precision)
        parent = read_metadata(cfg.init)
        checkpointing.finish_checkpoint(out_dir, cfg, "sft", checkpointing.input_files(cfg.init), {
            "policy_kind": "sft", "depth": parent.get("depth"), "base": parent.get("base"), **count_params(model),
            **frozen, "val_loss": val_loss, "steps": step, "init": str(cfg.init), "world_size": d.world,
            "replica_digests": digests, "contract": contract.to_dict(), "quality": quality, "precision": precision,
        })
    distributed.shutdown_distributed(d)
    return out_dir
