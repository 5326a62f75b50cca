"""Reward model: the SFT checkpoint with a scalar head, trained on pairwise judgments with the Bradley–Terry loss
``-log σ(r(x, y_preferred) − r(x, y_other))`` for one epoch (REFERENCE.md).

The judgments come from every listed source: OpenAI's released human batches, the bundled LLM-judged pairs (only when
listed; marked ``llm`` in the checkpoint's ``training_labels``), or any folder of items/generations/tasks/judgments
tables. Posts of the studies' evaluation split are never trained on, and accuracy is measured on held-out posts next
to the "longer summary wins" heuristic. The reward is read at the last real token (the EOS; padding is a distinct token and never
read). After training the head's bias is shifted so that human references score 0 on average.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from evalkit import artifacts, decoding, distributed, precision as prec
from evalkit.checkpoints import read_metadata
from evalkit.contract import NO_EOS_SDS, no_eos_score_for, read_contract
from evalkit.data import COMPARISON_BATCHES, bundled_path, comparison_batch, load_items, parse_tldr_query, read_openai_comparisons, tldr_item_id
from evalkit.data.bundled import DEFAULT_COMPARISONS
from evalkit.data.io import read_csv_columns
from evalkit.data.splits import unit_interval
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, count_params, load_causal_lm, load_tokenizer
from evalkit.seeds import derive_seed
from evalkit.train import checkpointing, optim
from evalkit.train.quality import EVAL_SPLIT, bootstrap_ci, paired_difference

log = logging.getLogger(__name__)


LLM_JUDGED = "oai1b-gpt4-judged"  # the bundled GPT-4 verdicts on OpenAI's 1.3B PPO summary vs the reference


@dataclass(frozen=True)
class RewardConfig:
    init: str  # the SFT checkpoint
    # sources of pairwise judgments: released batch names (human), "oai1b-gpt4-judged" (an LLM judge; only when
    # listed), or folders with items/generations/tasks/judgments tables
    comparisons: tuple[str, ...] = DEFAULT_COMPARISONS
    eval_split: str = "valid2"  # the studies' evaluation split: its TL;DR posts are never trained on
    held_out_fraction: float = 0.15  # of the other posts, chosen by post id, for held-out accuracy (post-disjoint)
    batch_size: int = 8
    epochs: int = 1
    lr: float = 3e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    trainable_layers: int = 0  # 0 = every block; k = only the top k blocks (+ final norm and the head)
    max_pairs: int = 0  # 0 = every training pair; otherwise the first N in the seeded order (for short CPU runs)
    max_held_out_posts: int = 0  # 0 = every held-out post; otherwise N whole posts in a seeded order (accuracy's CI
    # resamples posts, so it stays honest about the smaller sample)
    save_every: int = 100
    seed: int = 0
    threads: int = 0
    precision: str = "auto"  # auto: bfloat16 autocast where the device has bf16 matrix units (evalkit.precision)


def load_comparison_tables(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalkitError(f"no comparisons folder at {folder}; expected items/generations/tasks/judgments parquet tables")
    return {name: artifacts.read_table(folder / f"{name}.parquet", name) for name in ("items", "generations", "tasks", "judgments")}


def preference_pairs(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per pairwise judgment: the item, the preferred and the other summary's text, and the split."""
    tasks = tables["tasks"][tables["tasks"]["kind"] == "pairwise"]
    j = tables["judgments"].dropna(subset=["preferred_gen_id"]).merge(tasks[["task_id", "item_id", "gen_id_left", "gen_id_right"]], on="task_id")
    j["other_gen_id"] = j["gen_id_right"].where(j["preferred_gen_id"] == j["gen_id_left"], j["gen_id_left"])
    text = tables["generations"].set_index("gen_id")["text"]
    items = tables["items"].set_index("item_id")
    out = pd.DataFrame({
        "item_id": j["item_id"], "chosen": j["preferred_gen_id"].map(text), "rejected": j["other_gen_id"].map(text),
        "split": j["item_id"].map(items["split"]), "labeler_kind": j["labeler_kind"],
    })
    out = out[out["item_id"].map(items["dataset"]) == "tldr"]
    return out.dropna(subset=["chosen", "rejected"]).reset_index(drop=True)


def llm_judged_pairs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bundled GPT-4 verdicts (OpenAI 1.3B PPO summary vs human reference) as pairs marked ``labeler_kind=llm``."""
    df = read_csv_columns(bundled_path("tldr/oai1b_gpt4_judged.csv"), ("query", "postprocessed_response", "reference_responses", "preferred"))
    rows = []
    for query, ours, ref, verdict in zip(df["query"], df["postprocessed_response"], df["reference_responses"], df["preferred"]):
        if verdict not in ("ours", "reference"):
            continue
        parts = parse_tldr_query(query)
        chosen, rejected = (ours, ref) if verdict == "ours" else (ref, ours)
        rows.append({"item_id": tldr_item_id(parts["subreddit"], parts["title"], parts["post"]), "chosen": str(chosen).strip(),
                     "rejected": str(rejected).strip(), "labeler_kind": "llm"})
    items = load_items("tldr")
    pairs = pd.DataFrame(rows)
    pairs["split"] = pairs["item_id"].map(items.set_index("item_id")["split"])
    return pairs, items


def comparison_sources(names: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All pairs of the named sources, each row marked with its ``source`` and ``labeler_kind``; and their items."""
    if not names:
        raise EvalkitError("no comparisons to train the reward model on; name released batches (batch13, batch18) or folders")
    frames, items = [], []
    for name in names:
        if name == LLM_JUDGED:
            pairs, its = llm_judged_pairs()
        elif name in COMPARISON_BATCHES:
            tables = read_openai_comparisons(comparison_batch(name))
            pairs, its = preference_pairs(tables), tables["items"]
        elif Path(name).is_dir():
            tables = load_comparison_tables(name)
            pairs, its = preference_pairs(tables), tables["items"]
        else:
            raise EvalkitError(f"comparisons {name!r}: not a folder, a released batch ({', '.join(COMPARISON_BATCHES)}) or {LLM_JUDGED!r}")
        frames.append(pairs.assign(source=name))
        items.append(its)
    pairs = pd.concat(frames, ignore_index=True)
    items = pd.concat(items, ignore_index=True).drop_duplicates("item_id").reset_index(drop=True)
    return pairs, items


def evaluation_posts(eval_split: str) -> set[str]:
    """The TL;DR posts studies evaluate on: every bundled TL;DR item of the evaluation split."""
    return set(load_items("tldr", eval_split)["item_id"])


def assert_no_evaluation_posts(pairs: pd.DataFrame, eval_ids: set[str], what: str) -> None:
    leaked = sorted(set(pairs["item_id"]) & eval_ids)
    if leaked:
        raise EvalkitError(f"{what}: post {leaked[0]} is an evaluation post; reward-model data may not include it")


def split_pairs(pairs: pd.DataFrame, eval_split: str, held_out_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(training pairs, held-out pairs, pairs dropped as evaluation posts).

    Evaluation posts are dropped entirely: the bundled TL;DR posts of the studies' ``eval_split`` and every pair a
    source itself places in that split (the released batches' valid2 comparisons, on which judges are validated,
    include posts the bundled TL;DR set does not have). The held-out set is post-disjoint from
    training: every post the trainers measure quality on (TL;DR valid1, so RM scores there are out of sample), plus a
    fraction of the remaining posts chosen by a hash of the post id; only human judgments are held out."""
    if not 0 < held_out_fraction < 1:
        raise EvalkitError(f"held_out_fraction {held_out_fraction}: expected a fraction in (0, 1)")
    eval_ids = evaluation_posts(eval_split)
    keep = ~pairs["item_id"].isin(eval_ids) & (pairs["split"] != eval_split)
    dropped = int((~keep).sum())
    pairs = pairs[keep]
    quality_posts = set(load_items("tldr", EVAL_SPLIT)["item_id"])
    held_post = pairs["item_id"].map(lambda i: i in quality_posts or unit_interval("rm-held-out", i) < held_out_fraction)
    held = pairs[held_post & (pairs["labeler_kind"] != "llm")].reset_index(drop=True)
    train = pairs[~held_post].reset_index(drop=True)
    assert_no_evaluation_posts(train, eval_ids, "reward-model training data")
    if set(train["item_id"]) & set(held["item_id"]):
        raise EvalkitError("reward-model held-out set shares posts with its training data")
    return train, held, dropped


def encode_pairs(tok, pairs: pd.DataFrame, items: pd.DataFrame, contract) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) token sequences in the contract's canonical form: query + " " + summary + EOS."""
    by_id = items.set_index("item_id")
    out = []
    for item_id, chosen, rejected in zip(pairs["item_id"], pairs["chosen"], pairs["rejected"]):
        item = {"item_id": item_id, **by_id.loc[item_id].to_dict()}
        query = decoding.encode_query(tok, item, contract.max_query_tokens)
        out.append((query + decoding.encode_summary(tok, chosen, contract.max_summary_tokens),
                    query + decoding.encode_summary(tok, rejected, contract.max_summary_tokens)))
    return out


def pair_rewards(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, device,
                 precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected sequences, one forward pass over both (the head in float32)."""
    ids, mask = decoding.pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    with prec.autocast(precision, device):
        r = model(ids.to(device), mask.to(device))
    return r[: len(pairs)], r[len(pairs):]


@torch.no_grad()
def pair_correct(model, pairs, pad_id: int, device, batch_size: int = 8, precision: str = "float32") -> np.ndarray:
    """Per pair: 1 when the chosen summary scores higher, 0 when lower, 0.5 on a tie. The two sequences of a pair
    share their query: it runs once (``decoding.prefix_scores``), then each summary."""
    cut = [decoding.shared_prefix(c, r) for c, r in pairs]
    with prec.autocast(precision, device):
        scores = decoding.prefix_scores(model, [c[:k] for (c, _), k in zip(pairs, cut)],
                                      [seq[k:] for (c, r), k in zip(pairs, cut) for seq in (c, r)], 2, pad_id, device, batch_size)
    rc, rr = scores[0::2], scores[1::2]
    return ((rc > rr).float() + 0.5 * (rc == rr).float()).numpy()


def accuracy(model, pairs, pad_id: int, device, batch_size: int = 16, precision: str = "float32") -> float:
    correct = pair_correct(model, pairs, pad_id, device, batch_size, precision)
    return float(correct.mean()) if len(correct) else float("nan")


def length_heuristic(pairs: pd.DataFrame) -> np.ndarray:
    """The trivial baseline on the same pairs: the longer summary (in characters) wins; a tie counts 0.5."""
    lc, lr = pairs["chosen"].str.len().to_numpy(), pairs["rejected"].str.len().to_numpy()
    return np.where(lc > lr, 1.0, np.where(lc < lr, 0.0, 0.5))


def held_out_report(correct: np.ndarray, held: pd.DataFrame, seed: int) -> dict:
    """RM accuracy and the length heuristic on the held-out pairs, each with a post-clustered 95% CI, and their
    paired difference (RM − heuristic) with its CI."""
    posts = held["item_id"].to_numpy()
    heuristic = length_heuristic(held)
    return {
        "held_out_accuracy": float(correct.mean()), "held_out_accuracy_ci": bootstrap_ci(correct, posts, seed=seed),
        "length_heuristic_accuracy": float(heuristic.mean()), "length_heuristic_ci": bootstrap_ci(heuristic, posts, seed=seed),
        "accuracy_minus_length": paired_difference(correct, heuristic, posts, seed=seed),
        "n_held_out": int(len(held)), "n_held_out_posts": int(held["item_id"].nunique()),
    }


def train_reward_model(cfg: RewardConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.init)
    contract = read_contract(cfg.init)
    d, state = checkpointing.start_run(out_dir, cfg, resume)
    precision = prec.resolve(cfg.precision, d.device)

    # 1. pairs: every listed source minus the evaluation posts; a post-disjoint held-out set for accuracy
    pairs, items = comparison_sources(tuple(cfg.comparisons))
    train, held, dropped = split_pairs(pairs, cfg.eval_split, cfg.held_out_fraction)
    if cfg.max_pairs:
        order = np.random.default_rng(derive_seed("rm-pairs", cfg.seed)).permutation(len(train))[: cfg.max_pairs]
        train = train.iloc[np.sort(order)].reset_index(drop=True)
    if cfg.max_held_out_posts:
        posts = held["item_id"].drop_duplicates().to_numpy()
        keep = set(np.random.default_rng(derive_seed("rm-held-out-posts", cfg.seed)).permutation(posts)[: cfg.max_held_out_posts])
        held = held[held["item_id"].isin(keep)].reset_index(drop=True)
    if train.empty:
        raise EvalkitError(f"{', '.join(cfg.comparisons)}: no pairwise judgments left to train on once evaluation posts "
                           f"({cfg.eval_split}) and the held-out posts are set aside")
    train_pairs = encode_pairs(tok, train, items, contract)
    held_pairs = encode_pairs(tok, held, items, contract)

    # 2. model: SFT backbone + head initialised N(0, 1/(d+1)); the top blocks and the head train
    lm = load_causal_lm(cfg.init)
    model = RewardModel.from_causal_lm(lm, seed=cfg.seed)
    checkpointing.load_weights(state, {"model": model})
    model.to(d.device).train()
    frozen = optim.freeze_lower_layers(model.backbone, cfg.trainable_layers, extra=(model.head,))
    ddp = distributed.replicate(model, d)
    opt = torch.optim.AdamW(optim.param_groups(model, cfg.weight_decay), lr=cfg.lr)
    per_epoch = max(1, len(train_pairs) // (cfg.batch_size * d.world))
    total = per_epoch * cfg.epochs
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        checkpointing.truncate_metrics(out_dir, start)

    # 3. loop: Bradley–Terry loss, one epoch by default
    t0 = time.perf_counter()
    for step in range(start, total):
        epoch, index = divmod(step, per_epoch)
        batch = [train_pairs[i] for i in optim.batch_order(len(train_pairs), cfg.batch_size, cfg.seed, epoch, d)[index]]
        lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, total)
        for group in opt.param_groups:
            group["lr"] = lr
        rc, rr = pair_rewards(ddp, batch, tok.pad_token_id, d.device, precision)
        loss = -F.logsigmoid(rc - rr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optim.trainable(model), 1.0)
        opt.step()
        acc = distributed.all_reduce_mean(float((rc > rr).float().mean()), d)
        loss_value = distributed.all_reduce_mean(loss.item(), d)
        if d.main:
            checkpointing.append_metrics(out_dir, {"step": step + 1, "loss": loss_value, "accuracy": acc,
                                            "lr": lr, "elapsed_s": time.perf_counter() - t0})
            if (step + 1) % cfg.save_every == 0 and step + 1 < total:
                checkpointing.save_state(out_dir, cfg, {"step": step + 1, "optimizer": opt.state_dict()}, {"model": model})

    # 4. normalise: references score 0 on average (over the training posts that have one)
    del ddp  # no DDP wrapper may outlive the process group (distributed.shutdown_distributed)
    model.eval()
    digests = checkpointing.check_replicas_in_sync(model, d)
    if not d.main:
        distributed.shutdown_distributed(d)
        return out_dir
    ref_items = items[items["item_id"].isin(train["item_id"]) & items["reference"].notna()]
    records = ref_items.to_dict("records")
    queries = [decoding.encode_query(tok, r, contract.max_query_tokens) for r in records]
    with prec.autocast(precision, d.device):
        ref_scores = decoding.score_summaries(model, tok, queries, [r["reference"] for r in records], contract, d.device)
    shift = float(ref_scores.mean()) if len(ref_scores) else 0.0
    with torch.no_grad():
        model.head.bias -= shift

    # 5. held-out accuracy next to the length heuristic on the same pairs, and the checkpoint
    correct = pair_correct(model, held_pairs, tok.pad_token_id, d.device, precision=precision) if held_pairs else None
    report = held_out_report(correct, held, cfg.seed) if held_pairs else {"n_held_out": 0}
    train_acc = accuracy(model, train_pairs[:64], tok.pad_token_id, d.device, precision=precision)  # a sanity check, not a measurement
    model.save(out_dir)
    tok.save_pretrained(out_dir)
    labels = {f"{src} ({kind})": int(n) for (src, kind), n in train.groupby(["source", "labeler_kind"]).size().items()}
    ref_std = float(ref_scores.std()) if len(ref_scores) > 1 else None
    # the first stage with a score scale sets the lineage's no-EOS score below it (evalkit.contract)
    contract = replace(contract, no_eos_score=no_eos_score_for(ref_std, contract.no_eos_score))
    summary = {"step": total, **report, "train_accuracy": train_acc, "n_train": len(train_pairs), "n_train_posts": int(train["item_id"].nunique()),
               "n_dropped_evaluation_posts": dropped, "reference_mean_shift": shift,
               "reference_score_std": ref_std}
    checkpointing.append_metrics(out_dir, summary)
    parent = read_metadata(cfg.init)
    inputs = checkpointing.input_files(cfg.init) + [p for src in cfg.comparisons if Path(src).is_dir() for p in sorted(Path(src).glob("*.parquet"))]
    checkpointing.finish_checkpoint(out_dir, cfg, "reward", inputs, {
        "model_kind": "reward", "depth": parent.get("depth"), "base": parent.get("base"), **count_params(lm), **frozen,
        **{k: v for k, v in summary.items() if k != "step"}, "training_labels": labels,
        "labeler_kinds": sorted(train["labeler_kind"].unique()), "eval_split_excluded": cfg.eval_split,
        "world_size": d.world, "replica_digests": digests, "contract": contract.to_dict(), "init": str(cfg.init),
        "no_eos_rule": f"{NO_EOS_SDS:g} SD of reference scores below their mean (0)", "precision": precision,
    })
    distributed.shutdown_distributed(d)
    return out_dir
