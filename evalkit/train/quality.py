"""Held-out quality, measured by the trainers themselves: what a checkpoint does on posts it never trained on.

A clean loss curve says nothing about whether a summarizer summarizes. After each stage the trainer decodes the first
``n_posts`` TL;DR ``valid1`` posts (by item id; never trained on by any stage) greedily, in the lineage's contract, and
records in ``evalkit.json`` (key ``quality``) and per post in ``quality.parquet``:

- ``distinct_fraction``: distinct summaries / posts (a policy that says the same thing to every post scores ~0);
- ``mean_tokens`` and ``finished_fraction`` (stopped by EOS or newline rather than running out);
- ``rouge_l``: ROUGE-L F1 against the human reference (``rouge-score``, Porter stemming);
- ``rm_score``: the lineage's reward model on the canonical form, once a reward model exists;
- ``kl_to_sft``: for PPO, ``E_{y~π}[log π(y|x) − log π_SFT(y|x)]`` over one sample per post at the training temperature.

Paired comparisons between stages (SFT vs zero-shot ROUGE-L, PPO vs SFT RM score) use the same posts, so their
differences get a bootstrap CI over posts (``paired_difference``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rouge_score import rouge_scorer

from evalkit import artifacts, decoding, precision as prec
from evalkit.data import load_items
from evalkit.seeds import derive_seed
from evalkit.train import logprobs
from evalkit.vocab import SAMPLING_TEMPERATURE

log = logging.getLogger(__name__)

QUALITY_FILE = "quality.parquet"
EVAL_SPLIT = "valid1"


def eval_items(n_posts: int) -> pd.DataFrame:
    """The held-out posts quality is measured on: TL;DR valid1 posts with a reference, the first ``n_posts`` by id."""
    items = load_items("tldr", EVAL_SPLIT)
    items = items[items["reference"].notna()].sort_values("item_id")
    return items.head(n_posts).reset_index(drop=True)


@functools.lru_cache(maxsize=1)
def _scorer():
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(texts: list[str], references: list[str]) -> np.ndarray:
    """ROUGE-L F1 of each text against its reference (0 for an empty text)."""
    scorer = _scorer()
    return np.array([scorer.score(ref, text)["rougeL"].fmeasure if text.strip() else 0.0 for text, ref in zip(texts, references)])


def bootstrap_ci(values: np.ndarray, clusters: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of a mean, resampling whole clusters (e.g. posts) when given."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(derive_seed("bootstrap-ci", seed))
    if clusters is None:
        clusters = np.arange(len(values))
    codes, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(codes))
    counts = np.bincount(inverse, minlength=len(codes)).astype(float)
    picks = rng.integers(0, len(codes), size=(n_boot, len(codes)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def paired_difference(a: np.ndarray, b: np.ndarray, clusters: np.ndarray | None = None, seed: int = 0) -> dict:
    """Mean of ``a − b`` over paired observations with its 95% bootstrap CI (clusters resampled whole)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_ci(diff, clusters, seed=seed)
    return {"mean": float(diff.mean()) if len(diff) else float("nan"), "ci_low": lo, "ci_high": hi, "n": int(len(diff))}


@torch.no_grad()
def sequence_kl(policy, reference, queries: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float,
                device, batch_size: int = 16, trainable_layers: int = 0) -> np.ndarray:
    """Per sequence: Σ_t log π(y_t) − log π_ref(y_t) over the response tokens (logits divided by ``temperature``);
    when only the top blocks were trained, the shared lower blocks run once for both models."""
    out = np.zeros(len(queries))
    trunk = logprobs.SharedTrunk.build([policy, reference], trainable_layers) if trainable_layers else None
    for chunk in decoding.by_length([len(q) for q in queries], batch_size):
        q, r = [queries[i] for i in chunk], [responses[i] for i in chunk]
        ids, mask, q_len, resp_mask = logprobs.join_query_response(q, r, pad_id)
        ids, mask, resp_mask = ids.to(device), mask.to(device), resp_mask.to(device)
        hidden = trunk(ids, mask) if trunk else None
        lp, _ = logprobs.response_logprobs(policy, ids, mask, q_len, temperature, trunk, hidden)
        lr, _ = logprobs.response_logprobs(reference, ids, mask, q_len, temperature, trunk, hidden)
        out[chunk] = ((lp - lr) * resp_mask).sum(1).cpu().numpy()
    return out


@torch.no_grad()
def measure(model, tok, contract, out_dir: str | Path, n_posts: int = 200, reward_model=None, kl_reference=None,
            kl_temperature: float = SAMPLING_TEMPERATURE, device=torch.device("cpu"), batch_size: int = 64, trainable_layers: int = 0,
            precision: str = "float32") -> dict:
    """Decode the held-out posts greedily and measure them (see the module docstring); writes ``quality.parquet``
    in ``out_dir`` and returns the summary that goes into ``evalkit.json``. ``precision`` (resolved): the weights'
    dtype while decoding and scoring, as in training (the float32 weights are put back afterwards)."""
    if n_posts <= 0:
        return {}
    was_training = model.training
    model.eval()
    with prec.weights_as(precision, model, reward_model, kl_reference):
        summary = _measure(model, tok, contract, out_dir, n_posts, reward_model, kl_reference, kl_temperature, device,
                           batch_size, trainable_layers)
    model.train(was_training)
    summary["precision"] = precision
    return summary


def _measure(model, tok, contract, out_dir, n_posts, reward_model, kl_reference, kl_temperature, device, batch_size,
             trainable_layers) -> dict:
    items = eval_items(n_posts)
    records = items.to_dict("records")
    queries = [decoding.encode_query(tok, it, contract.max_query_tokens) for it in records]
    greedy = decoding.sample(model, tok, queries, contract, 0.0, [0] * len(queries), batch_size=batch_size)
    texts = [decoding.response_text(tok, ids) for ids, _ in greedy]
    table = pd.DataFrame({
        "item_id": items["item_id"], "text": texts,
        "n_tokens": [len([t for t in ids if t != tok.eos_token_id]) for ids, _ in greedy],
        "finished": [fin for _, fin in greedy],
        "rouge_l": rouge_l(texts, list(items["reference"])),
    })
    summary = {"split": EVAL_SPLIT, "n_posts": len(table), "distinct_fraction": table["text"].nunique() / max(1, len(table)),
               "mean_tokens": float(table["n_tokens"].mean()), "finished_fraction": float(table["finished"].mean()),
               "rouge_l": float(table["rouge_l"].mean()), "rouge_l_ci": bootstrap_ci(table["rouge_l"].to_numpy())}
    if reward_model is not None:
        table["rm_score"] = decoding.score_summaries(reward_model, tok, queries, texts, contract, device).numpy()
        summary["rm_score"] = float(table["rm_score"].mean())
    if kl_reference is not None:
        seeds = [derive_seed("quality-kl", it["item_id"]) for it in records]
        samples = decoding.sample(model, tok, queries, contract, kl_temperature, seeds, batch_size=batch_size)
        kl = sequence_kl(model, kl_reference, queries, [ids for ids, _ in samples], tok.pad_token_id, kl_temperature, device,
                         trainable_layers=trainable_layers)
        table["kl_to_sft"] = kl
        summary.update({"kl_to_sft": float(kl.mean()), "kl_to_sft_ci": bootstrap_ci(kl), "kl_temperature": kl_temperature})
    artifacts.write_table(table, Path(out_dir) / QUALITY_FILE, "quality")
    log.info("quality of %s: distinct %.2f, %.1f tokens, ROUGE-L %.3f", out_dir, summary["distinct_fraction"],
             summary["mean_tokens"], summary["rouge_l"])
    return summary


def read_quality(folder: str | Path) -> pd.DataFrame | None:
    path = Path(folder) / QUALITY_FILE
    return artifacts.read_table(path, "quality") if path.is_file() else None


@torch.no_grad()
def rescore(folder: str | Path, reward_model, tok, contract, device=torch.device("cpu"), precision: str = "float32") -> pd.DataFrame | None:
    """An earlier stage's held-out summaries scored by a reward model trained after it (in memory: the earlier
    checkpoint's files are never changed)."""
    table = read_quality(folder)
    if table is None:
        return None
    items = eval_items(10**9).set_index("item_id").loc[table["item_id"]].reset_index()
    queries = [decoding.encode_query(tok, it, contract.max_query_tokens) for it in items.to_dict("records")]
    with prec.weights_as(precision, reward_model):
        table["rm_score"] = decoding.score_summaries(reward_model, tok, queries, list(table["text"].fillna("")), contract, device).numpy()
    return table
