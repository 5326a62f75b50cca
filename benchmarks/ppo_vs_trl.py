"""One PPO iteration: evalkit's trainer vs TRL's PPOTrainer (trl 1.12, the last release with it), same tiny model,
same queries and settings, side by side in one process. Prints episodes/s of both and the ratio.

Settings shared by both: 16 rollouts per iteration, 2 minibatches of 8, 4 PPO epochs, 48-token responses at T 0.7,
β 0.05, the same GPT-2 policy (depth --depth of the ladder) and a reward/value model of the same size, 256-token
queries (evalkit reads them from the checkpoint's contract). evalkit also stops a response at a newline (its contract),
TRL only at EOS: the mean response length of each side is printed from its own log, so the comparison can be judged.
The first iteration of each is a warm-up; the ratio uses the mean of the following ones. Episode counts are read from
each trainer's own log. Both run at one precision (``--precision``): float32 for both, or bfloat16 for both (evalkit's
autocast, TRL's ``bf16=True``); ``both`` runs the two comparisons one after the other.

    .venv/bin/pip install trl==1.12.0    # benchmark-only dependency (pip install -e '.[bench]')
    .venv/bin/python benchmarks/ppo_vs_trl.py [--depth 4] [--iterations 3] [--precision float32|bfloat16|both]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def build_models(root: Path, depth: int) -> tuple[Path, Path, list[list[int]]]:
    from evalkit import decoding
    from evalkit.checkpoints import write_metadata
    from evalkit.contract import Contract
    from evalkit.models import RewardModel, build_model
    from evalkit.train.sft import train_items
    from evalkit.train.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(root / "tok", TokenizerConfig(vocab_size=8192, max_documents=400))
    policy = build_model(depth, tok, seed=0)
    policy.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    RewardModel.from_causal_lm(policy, seed=1).save(root / "rm")
    tok.save_pretrained(root / "rm")
    for folder in ("sft", "rm"):
        write_metadata(root / folder, contract=Contract(max_query_tokens=256).to_dict())
    queries = [decoding.encode_query(tok, it, 256) for it in train_items(64).to_dict("records")]
    return root / "sft", root / "rm", queries


def ours(sft: Path, rm: Path, out: Path, iterations: int, threads: int, precision: str) -> tuple[list[float], int, float]:
    from evalkit.train.checkpointing import read_metrics
    from evalkit.train.ppo import PPOConfig, ppo

    ppo(PPOConfig(policy=str(sft), reward_model=str(rm), iterations=iterations, rollouts=16, minibatch_size=8, ppo_epochs=4,
                  temperature=0.7, max_items=64, threads=threads, eval_posts=0, precision=precision), out, resume=False)
    rows = read_metrics(out)
    elapsed = [r["elapsed_s"] for r in rows]
    return ([b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)], int(rows[-1]["episodes"]),
            sum(r["mean_length"] for r in rows) / len(rows))


def trl(sft: Path, queries: list[list[int]], out: Path, iterations: int, precision: str) -> tuple[list[float], int, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(str(sft), padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(str(sft))
    ref = AutoModelForCausalLM.from_pretrained(str(sft))
    reward = AutoModelForSequenceClassification.from_pretrained(str(sft), num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(str(sft), num_labels=1)
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = PPOConfig(output_dir=str(out), report_to="none", use_cpu=True, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=4, total_episodes=16 * iterations,
                     response_length=48, temperature=0.7, stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05,
                     local_rollout_forward_batch_size=16, num_sample_generations=0, save_strategy="no", learning_rate=3e-5,
                     logging_steps=1, seed=0, bf16=precision == "bfloat16")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": queries}), value_model=value, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    logs = [row for row in trainer.state.log_history if "episode" in row]
    episodes = int(max(row["episode"] for row in logs)) if logs else -1
    lengths = [row["val/num_eos_tokens"] for row in logs if "val/num_eos_tokens" in row]
    mean_len = 48.0 - (sum(lengths) / len(lengths) if lengths else 0.0)  # TRL pads after EOS: 48 unless it stopped
    return [b - a for a, b in zip([t0] + stamps[:-1], stamps)], episodes, mean_len


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("float32", "bfloat16", "both"), default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sft, rm, queries = build_models(root, args.depth)
        for precision in ("float32", "bfloat16") if args.precision == "both" else (args.precision,):
            t_ours, n_ours, len_ours = ours(sft, rm, root / f"ours-{precision}", args.iterations, args.threads, precision)
            t_trl, n_trl, len_trl = trl(sft, queries, root / f"trl-{precision}", args.iterations, precision)
            report(args, precision, t_ours, n_ours, len_ours, t_trl, n_trl, len_trl)


def report(args, precision, t_ours, n_ours, len_ours, t_trl, n_trl, len_trl) -> None:
    mean = lambda xs: sum(xs[1:]) / max(1, len(xs) - 1)  # noqa: E731
    eps_ours, eps_trl = 16 / mean(t_ours), 16 / mean(t_trl)
    print(f"depth {args.depth}, both in {precision}, 16 episodes/iteration, {args.iterations} iterations (first = warm-up)")
    print(f"  evalkit: {', '.join(f'{t:.2f}s' for t in t_ours)} per iteration → {eps_ours:.2f} episodes/s "
          f"({n_ours} episodes in its metrics.jsonl, mean response {len_ours:.1f} tokens)")
    print(f"  trl    : {', '.join(f'{t:.2f}s' for t in t_trl)} per iteration → {eps_trl:.2f} episodes/s "
          f"({n_trl} episodes in its log history, mean response ≈{len_trl:.1f} tokens)")
    print(f"  ratio evalkit / trl: {eps_ours / eps_trl:.2f}x")


if __name__ == "__main__":
    main()
