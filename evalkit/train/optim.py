"""How the trainers optimise: a deterministic batch order per epoch (split across ranks), the learning-rate schedule,
which parameters train (the top blocks only, for real weights on a CPU) and AdamW's parameter groups."""

from __future__ import annotations

import math

import numpy as np
import torch

from evalkit.distributed import Dist
from evalkit.errors import EvalkitError
from evalkit.models import decoder_layers, final_norm
from evalkit.seeds import derive_seed


def batch_order(n: int, batch_size: int, seed: int, epoch: int, d: Dist) -> list[np.ndarray]:
    """This rank's batches for one epoch: a permutation seeded by (seed, epoch), global batches split across ranks."""
    perm = np.random.default_rng(derive_seed("batch-order", seed, epoch)).permutation(n)
    global_bs = batch_size * d.world
    out = []
    for start in range(0, n - global_bs + 1, global_bs):
        out.append(perm[start: start + global_bs][d.rank:: d.world])
    return out


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
