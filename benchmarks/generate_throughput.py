"""evalkit's batched generator vs Hugging Face ``model.generate``, side by side in one run: HF batched (left padding,
the same length-sorted batches: the fair baseline) and HF one item at a time.

Same model (the tiny ladder's largest size unless --checkpoint is given), 64 mixed-length TL;DR valid2 queries,
greedy decoding, at most 48 new tokens, stop at EOS. Prints generated tokens/s of both and the ratio; also checks that
both produced the same tokens (greedy decoding must not depend on batching).

    .venv/bin/python benchmarks/generate_throughput.py [--checkpoint DIR] [--batch-size 64] [--depth 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(root: Path, depth: int) -> Path:
    from evalkit.models import build_model
    from evalkit.train.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(root / "ckpt", TokenizerConfig(vocab_size=8192, max_documents=400))
    build_model(depth, tok, seed=0).save_pretrained(root / "ckpt")
    return root / "ckpt"


def main() -> None:
    from transformers.utils import logging as hf_logging

    from evalkit.data import format_query, load_items
    from evalkit.generate import Decoding, decode_batch
    from evalkit.models import load_causal_lm, load_tokenizer
    from evalkit.vocab import DEFAULT_LADDER

    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--depth", type=int, default=DEFAULT_LADDER[-1])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.depth)
        tok, model = load_tokenizer(ckpt), load_causal_lm(ckpt).eval()
        items = load_items("tldr", "valid2").sort_values("item_id").head(args.n)
        queries = [tok.encode(format_query(r, tok), add_special_tokens=False) for r in items.to_dict("records")]
        print(f"{ckpt.name}: {sum(p.numel() for p in model.parameters())} params; {len(queries)} queries of "
              f"{min(map(len, queries))}-{max(map(len, queries))} tokens")
        dec = Decoding(max_new_tokens=48, max_query_tokens=512)  # the contract of a ladder checkpoint

        # baseline: HF generate, one item at a time
        t0 = time.perf_counter()
        base = []
        with torch.no_grad():
            for q in queries:
                out = model.generate(input_ids=torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long),
                                     max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                base.append(out[0, len(q):].tolist())
        t_base = time.perf_counter() - t0

        # baseline 2: HF generate batched, left-padded, the same length-sorted batches as ours
        t0 = time.perf_counter()
        batched: list[list[int]] = [[] for _ in queries]
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
        with torch.no_grad():
            for start in range(0, len(order), args.batch_size):
                chunk = order[start: start + args.batch_size]
                width = max(len(queries[i]) for i in chunk)
                ids = torch.tensor([[tok.pad_token_id] * (width - len(queries[i])) + queries[i] for i in chunk])
                mask = torch.tensor([[0] * (width - len(queries[i])) + [1] * len(queries[i]) for i in chunk])
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                for row, i in enumerate(chunk):
                    batched[i] = [t for t in out[row, width:].tolist()]
        t_batched = time.perf_counter() - t0

        # ours: sorted by length, batched, KV cache
        t0 = time.perf_counter()
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
        ours: list[list[int]] = [[] for _ in queries]
        for start in range(0, len(order), args.batch_size):
            chunk = order[start: start + args.batch_size]
            for i, (ids, _) in zip(chunk, decode_batch(model, tok, [queries[i] for i in chunk], dec)):
                ours[i] = ids
        t_ours = time.perf_counter() - t0

    def cut(ids):
        return ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids

    n_base, n_ours = sum(len(cut(b)) for b in base), sum(len(o) for o in ours)
    n_batched = sum(len(cut(b)) for b in batched)
    same = sum(cut(b) == o for b, o in zip(base, ours))
    same_batched = sum(cut(b) == o for b, o in zip(batched, ours))
    print(f"  HF generate, one at a time:  {n_base} tokens in {t_base:.2f}s → {n_base / t_base:.0f} tokens/s")
    print(f"  HF generate, batch {args.batch_size} (left-padded): {n_batched} tokens in {t_batched:.2f}s → {n_batched / t_batched:.0f} tokens/s")
    print(f"  evalkit, batch {args.batch_size}:           {n_ours} tokens in {t_ours:.2f}s → {n_ours / t_ours:.0f} tokens/s")
    print(f"  identical outputs: {same}/{len(queries)} vs one-at-a-time, {same_batched}/{len(queries)} vs batched")
    print(f"  ratio evalkit / HF one at a time: {(n_ours / t_ours) / (n_base / t_base):.2f}x (target ≥ 6x)")
    print(f"  ratio evalkit / HF batched:       {(n_ours / t_ours) / (n_batched / t_batched):.2f}x (target ≥ 1.5x)")


if __name__ == "__main__":
    main()
