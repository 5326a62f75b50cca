"""Pretraining: a causal LM of one ladder size on the bundled training text only (no valid1/valid2 text; checked).

Reads top to bottom: 1. corpus → token stream, 2. model, 3. loop (batch, loss, step, log, save), 4. held-out loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evalkit import distributed, precision as prec
from evalkit.contract import Contract
from evalkit.data import load_items
from evalkit.data.corpus import pretraining_texts
from evalkit.models import build_model, count_params, load_tokenizer
from evalkit.seeds import derive_seed
from evalkit.train import checkpointing, optim
from evalkit.train.quality import measure
from evalkit.vocab import CONTEXT, MAX_QUERY_TOKENS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    tokenizer: str
    depth: int = 2
    seq_len: int = CONTEXT  # the trained context: it must hold a query, a summary and EOS (the contract)
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_summary_tokens: int = 48
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    max_documents: int = 0  # 0 = the whole training corpus
    eval_posts: int = 200  # held-out valid1 posts summarised zero-shot at the end (quality); 0 = none
    save_every: int = 100
    seed: int = 0
    threads: int = 0
    precision: str = "auto"  # auto: bfloat16 autocast where the device has bf16 matrix units (evalkit.precision)


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text, add_special_tokens=False))
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def held_out_texts(n: int = 64) -> list[str]:
    items = load_items("tldr", "valid1").head(n)
    return [f"{t}\n\n{b}" for t, b in zip(items["title"], items["body"])]


@torch.no_grad()
def stream_loss(model, stream: torch.Tensor, seq_len: int, device, precision: str = "float32") -> float:
    n = (len(stream) - 1) // seq_len
    blocks = stream[: n * seq_len].view(n, seq_len).to(device)
    with prec.autocast(precision, device):  # the loss itself is float32 (HF upcasts the logits)
        losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(16)]
    return float(np.mean(losses))


def pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    # the lineage's contract is born here; every later stage reads it from the checkpoint
    contract = Contract(max_query_tokens=cfg.max_query_tokens, max_summary_tokens=cfg.max_summary_tokens,
                        context=cfg.seq_len).check("pretrain config")
    tok = load_tokenizer(cfg.tokenizer)
    d, state = checkpointing.start_run(out_dir, cfg, resume)
    precision = prec.resolve(cfg.precision, d.device)

    # 1. corpus → one token stream, cut into blocks of seq_len + 1 (inputs and shifted labels)
    stream = token_stream(tok, pretraining_texts(cfg.max_documents or None))
    n_blocks = (len(stream) - 1) // cfg.seq_len
    blocks = stream[: n_blocks * cfg.seq_len].view(n_blocks, cfg.seq_len)

    # 2. model (resumed from the folder when a run was interrupted)
    model = build_model(cfg.depth, tok, seed=derive_seed("init", cfg.seed, cfg.depth), n_positions=cfg.seq_len)
    checkpointing.load_weights(state, {"model": model})
    model.to(d.device).train()
    ddp = distributed.replicate(model, d)
    opt = torch.optim.AdamW(optim.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    step = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        checkpointing.truncate_metrics(out_dir, step)
    sizes = count_params(model)
    log.info("pretraining depth %d (%d params) on %d blocks of %d tokens", cfg.depth, sizes["n_params"], n_blocks, cfg.seq_len)

    # 3. loop
    per_epoch = max(1, n_blocks // (cfg.batch_size * d.world))
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        epoch, index = divmod(step, per_epoch)
        batch_idx = optim.batch_order(n_blocks, cfg.batch_size, cfg.seed, epoch, d)[index]
        x = blocks[torch.as_tensor(batch_idx)].to(d.device)
        lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        with prec.autocast(precision, d.device):
            loss = ddp(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel() * d.world
        loss_value = distributed.all_reduce_mean(loss.item(), d)
        if d.main:
            checkpointing.append_metrics(out_dir, {"step": step, "loss": loss_value, "lr": lr, "epoch": epoch,
                                            "tokens_per_s": tokens / (time.perf_counter() - t0)})
            if step % cfg.save_every == 0 and step < cfg.steps:
                checkpointing.save_state(out_dir, cfg, {"step": step, "optimizer": opt.state_dict()}, {"model": model})

    # 4. held-out loss and the finished checkpoint
    del ddp  # no DDP wrapper may outlive the process group (distributed.shutdown_distributed)
    model.eval()
    digests = checkpointing.check_replicas_in_sync(model, d)
    if d.main:
        val_loss = stream_loss(model, token_stream(tok, held_out_texts()), cfg.seq_len, d.device, precision)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        checkpointing.append_metrics(out_dir, {"step": step, "val_loss": val_loss})
        quality = measure(model, tok, contract, out_dir, cfg.eval_posts, device=d.device, precision=precision)
        checkpointing.finish_checkpoint(out_dir, cfg, "pretrain", checkpointing.input_files(cfg.tokenizer), {
            "quality": quality,
            "policy_kind": "pretrained", "depth": cfg.depth, **sizes, "val_loss": val_loss, "steps": step,
            "contract": contract.to_dict(), "base": "scratch",
            "world_size": d.world, "replica_digests": digests, "precision": precision,
        })
    distributed.shutdown_distributed(d)
    return out_dir
