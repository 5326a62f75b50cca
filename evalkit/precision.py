"""Numeric precision for training and decoding: ``auto`` | ``float32`` | ``bfloat16``.

``auto`` means bfloat16 where the device multiplies bf16 matrices natively — a CPU with Intel AMX (``amx_bf16``) or
AVX512-BF16 (``avx512_bf16``), or a CUDA GPU that supports bf16 — and float32 elsewhere: a CPU without those units
emulates bf16 and runs it far slower than float32, so the choice is detected, never assumed.

Two ways bf16 enters, each where it is right:
- training (``autocast``): master weights and optimizer state stay float32, matrix products run in bf16 under
  ``torch.autocast``; every caller casts logits to float32 before log-softmax, log-probs, KL, entropy, losses and value
  targets (autocast on CPU leaves ``log_softmax``/``softmax`` in the input's dtype);
- decoding (``weights_as``): the weights themselves are cast for the duration of a no-grad pass (sampling,
  scoring), which skips autocast's per-op weight casts; the float32 tensors are put back afterwards, bit-identical.

The resolved precision (never ``auto``) is what a checkpoint, a manifest and the ladder table record.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import torch

from evalkit.vocab import check_precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (``/proc/cpuinfo``); empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` has bf16 matrix units (so bf16 is faster there, not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve(precision: str, device: torch.device | str = "cpu", where: str = "precision") -> str:
    """``float32`` or ``bfloat16``: ``auto`` decided by the device's matrix units, an explicit choice kept."""
    check_precision(precision, where)
    if precision == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return precision


def autocast(resolved: str, device: torch.device | str = "cpu"):
    """Mixed precision for a training forward pass: bf16 matrix products over float32 master weights."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bfloat16")


def cast_weights(resolved: str, *models: torch.nn.Module | None) -> None:
    """Hold the models' floating-point parameters in ``resolved``'s dtype for good — models that only decode — as
    :func:`weights_as` does for a block: buffers (rotary frequencies) stay float32, so decoding here and sampling in
    training compute the same numbers. Not for a model under DDP (assigning ``.data`` drops gradient hooks)."""
    dtype = DTYPES[resolved]
    for model in models:
        for p in model.parameters() if model is not None else ():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


@contextlib.contextmanager
def weights_as(resolved: str, *models: torch.nn.Module | None) -> Iterator[None]:
    """Within the block the models' floating-point parameters are held in ``resolved``'s dtype (a no-grad pass:
    sampling, scoring); on exit the original tensors are put back (not re-cast: no precision is lost). Buffers (rotary
    frequencies) stay float32: models cast what they compute from them to the activations' dtype."""
    dtype = DTYPES[resolved]
    # each module's parameter slot holds a cast copy for the block; the Parameter objects themselves are never
    # changed (assigning .data of another dtype would drop their gradient accumulators, and with them DDP's hooks)
    saved: list[tuple[dict, str, torch.nn.Parameter]] = []
    casts: dict[int, torch.nn.Parameter] = {}  # tied weights stay tied
    if dtype != torch.float32:
        for model in models:
            for module in model.modules() if model is not None else ():
                for name, p in list(module._parameters.items()):
                    if p is None or not p.is_floating_point() or p.dtype == dtype:
                        continue
                    if id(p) not in casts:
                        casts[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    saved.append((module._parameters, name, p))
                    module._parameters[name] = casts[id(p)]
    try:
        yield
    finally:
        for slots, name, p in reversed(saved):
            slots[name] = p
