"""Training tokens/s of each ladder size, and its fraction of this machine's fp32 matmul peak measured in the same run.

Baseline: a large fp32 matmul (the most the machine can do). Our number: a full training step (forward, backward,
AdamW) of the GPT-2 ladder at context 512 with an 8k vocabulary. FLOPs per token = 6 × (non-embedding parameters +
the LM head) + 12 × layers × d_model × context (attention). Also compares 1 vs 2 intra-op threads per size.

    .venv/bin/python benchmarks/train_throughput.py [--depths 2,4,6] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from evalkit.models import DEFAULT_LADDER, count_params, gpt2_config


def matmul_peak_gflops(n: int = 2048, reps: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def train_tokens_per_s(depth: int, vocab: int, ctx: int, batch: int, steps: int) -> tuple[float, dict, float]:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(depth, vocab, eos_id=0, pad_id=1, n_positions=ctx))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch, ctx))

    def step():
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    tps = batch * ctx * steps / (time.perf_counter() - t0)
    sizes = count_params(model)
    d = model.config.n_embd
    flops_per_token = 6 * (sizes["n_params_nonembedding"] + vocab * d) + 12 * depth * d * ctx
    return tps, sizes, flops_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default=",".join(map(str, DEFAULT_LADDER)))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    vocab, ctx = 8192, 512
    torch.set_num_threads(2)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2 threads): {peak:.1f} GFLOP/s")
    print(f"{'depth':>5} {'d_model':>7} {'params':>9} {'non-emb':>9} {'tok/s 2thr':>10} {'tok/s 1thr':>10} {'2/1 ratio':>9} {'GFLOP/s':>8} {'of peak':>8}")
    for depth in (int(x) for x in args.depths.split(",")):
        torch.set_num_threads(1)
        tps1, _, _ = train_tokens_per_s(depth, vocab, ctx, args.batch, args.steps)
        torch.set_num_threads(2)
        tps2, sizes, fpt = train_tokens_per_s(depth, vocab, ctx, args.batch, args.steps)
        gflops = tps2 * fpt / 1e9
        print(f"{depth:>5} {32 * depth:>7} {sizes['n_params']:>9} {sizes['n_params_nonembedding']:>9} {tps2:>10.0f} {tps1:>10.0f} "
              f"{tps2 / tps1:>9.2f} {gflops:>8.1f} {gflops / peak:>8.1%}")


if __name__ == "__main__":
    main()
