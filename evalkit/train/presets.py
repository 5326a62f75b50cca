"""The ladder's settings: ``LadderConfig`` and its named presets, the ladder's sizes and how they are named, and the
digest that keys a ladder's folder. Torch-free, so a study spec is checked without loading a model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from evalkit.data.bundled import DEFAULT_COMPARISONS
from evalkit.errors import EvalkitError
from evalkit.seeds import stable_hash
from evalkit.spec import apply_overrides, check_values, from_mapping
from evalkit.train.tokenizer import TokenizerConfig
from evalkit.vocab import BASE_FAMILIES, CONTEXT, DEFAULT_LADDER, LADDER_STAGES, MAX_QUERY_TOKENS, REAL_BASES, SCRATCH_FAMILY, scratch_size


@dataclass(frozen=True)
class LadderConfig:
    bases: tuple[str, ...] = ("scratch",)  # "scratch" (one size per depth) and/or real bases: smollm2, gemma3-270m
    depths: tuple[int, ...] = DEFAULT_LADDER
    comparisons: tuple[str, ...] = DEFAULT_COMPARISONS  # the RM's labels (real human judgments)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    max_query_tokens: int = MAX_QUERY_TOKENS  # the contract of from-scratch lineages (real bases: 512 within their context)
    pretrain_steps: int = 300
    pretrain_seq_len: int = CONTEXT  # ≥ query + summary + EOS
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    sft_steps: int = 200
    sft_batch: int = 8
    sft_lr: float = 1e-3
    rm_epochs: int = 1
    rm_lr: float = 3e-4
    rm_max_pairs: int = 0
    rm_held_out_posts: int = 0  # 0 = accuracy on every held-out post
    ppo_iterations: int = 20
    ppo_rollouts: int = 16
    ppo_minibatch: int = 8
    ppo_lr: float = 3e-5
    trainable_layers: int = 0  # real bases: train only the top k blocks (0 = all)
    best_of_n: int = 16
    eval_posts: int = 200
    bon_eval_posts: int = 200
    stages: tuple[str, ...] = LADDER_STAGES  # which stages to train (SFT, RM follow when a later stage needs them)
    precision: str = "auto"  # every stage's: bfloat16 where the device has bf16 matrix units, else float32
    seed: int = 0


PRESETS = {
    "default": LadderConfig(),
    # minutes on a 2-core CPU
    "tiny": LadderConfig(depths=(1, 2, 4), tokenizer=TokenizerConfig(vocab_size=4096, max_documents=800), max_query_tokens=192,
                         pretrain_steps=60, pretrain_seq_len=256, sft_steps=40, ppo_iterations=6, ppo_rollouts=8, best_of_n=4),
    # the real-weights ladder sized for a 2-core CPU in float32 (about an hour): the top 4 of SmolLM2's 30 blocks train
    "smollm2-cpu": LadderConfig(bases=("smollm2",), trainable_layers=4, sft_steps=60, sft_lr=2e-4, rm_lr=1e-4, rm_max_pairs=400,
                                ppo_iterations=12, ppo_rollouts=16, ppo_lr=2e-5, best_of_n=4, eval_posts=200, bon_eval_posts=50),
    # both real bases, every kind, sized for the default study on a 2-core CPU in bfloat16 from the step times
    # benchmarks/train_throughput.py prints: the top 2 blocks train; held-out quality on 24 posts (12 for best-of-N),
    # RM accuracy on 40 held-out posts
    "real-cpu": LadderConfig(bases=("smollm2", "gemma3-270m"), trainable_layers=2, sft_steps=24, sft_lr=3e-4, rm_lr=1e-4,
                             rm_max_pairs=96, rm_held_out_posts=40, ppo_iterations=4, ppo_rollouts=16, ppo_lr=5e-5,
                             best_of_n=4, eval_posts=24, bon_eval_posts=12),
    # full settings for a GPU: both real bases, every block trains
    "smollm2": LadderConfig(bases=("smollm2", "gemma3-270m"), trainable_layers=0, sft_steps=2000, sft_lr=5e-5, sft_batch=16,
                            rm_lr=2e-5, ppo_iterations=200, ppo_rollouts=64, ppo_minibatch=16, ppo_lr=5e-6, best_of_n=16),
}


def size_names(cfg: LadderConfig) -> list[str]:
    names = []
    for base in cfg.bases:
        if base == "scratch":
            names += [scratch_size(depth) for depth in cfg.depths]
        elif base in REAL_BASES:
            names.append(base)
        else:
            raise EvalkitError(f"unknown ladder base {base!r}; known: scratch, {', '.join(REAL_BASES)}")
    return names


def size_family(name: str) -> str:
    """The model family of a ladder size: ``d<depth>`` sizes are one from-scratch family, a real base is its own."""
    return SCRATCH_FAMILY if name not in BASE_FAMILIES else BASE_FAMILIES[name]


def ladder_config(preset: str, depths: tuple[int, ...] | None = None, bases: tuple[str, ...] | None = None,
                  overrides: tuple[str, ...] | list[str] = ()) -> LadderConfig:
    """A preset with its sizes and ``key=value`` field overrides (type-checked) applied."""
    if preset not in PRESETS:
        raise EvalkitError(f"unknown ladder preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if depths:
        cfg = replace(cfg, depths=tuple(depths))
    if bases:
        cfg = replace(cfg, bases=tuple(bases))
    if overrides:
        raw = {k: v for k, v in asdict(cfg).items() if k != "tokenizer"}
        cfg = replace(from_mapping(LadderConfig, apply_overrides(raw, list(overrides), LadderConfig), "ladder"), tokenizer=cfg.tokenizer)
    check_values(cfg, "ladder")
    bad = [s for s in cfg.stages if s not in LADDER_STAGES]
    if bad:
        raise EvalkitError(f"ladder stages has {bad[0]!r}; expected some of {', '.join(LADDER_STAGES)}")
    if any(d < 1 for d in cfg.depths):
        raise EvalkitError(f"ladder depths {list(cfg.depths)}: expected positive integers")
    size_names(cfg)
    return cfg


def ladder_dict(cfg: LadderConfig) -> dict:
    """The config as plain JSON data (nested tokenizer config included): what ladder.json records and the hash keys."""
    return json.loads(json.dumps(cfg, default=lambda o: o.__dict__))


def lineage_digest(cfg: LadderConfig) -> str:
    """A short hash of what makes a ladder's lineages (its folder name in a study): its bases and depths, and for
    from-scratch sizes the tokenizer and the query length they are pretrained for. Every other setting is a stage's,
    and is part of that stage's key (``evalkit.train.ladder.stage_key``), so changing it re-makes that stage alone."""
    lineage = {"bases": list(cfg.bases), "depths": list(cfg.depths)}
    if "scratch" in cfg.bases:
        lineage |= {"tokenizer": ladder_dict(cfg)["tokenizer"], "max_query_tokens": cfg.max_query_tokens}
    return stable_hash(json.dumps(lineage, sort_keys=True))[:10]
