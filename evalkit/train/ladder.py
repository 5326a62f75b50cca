"""The whole method at every size of a ladder: tokenizer → pretrain → SFT → reward model → PPO (+ best-of-N record).

One dial: the ``depths`` list. Each stage is skipped when its checkpoint folder is already complete (it has a
``manifest.json``), so an interrupted ladder is resumed by running the same command again. Stage timings go to
``ladder.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from evalkit import artifacts
from evalkit.models import DEFAULT_LADDER
from evalkit.train.best_of_n import write_best_of_n
from evalkit.train.pretrain import PretrainConfig, pretrain
from evalkit.train.ppo import PPOConfig, ppo
from evalkit.train.reward import RewardConfig, train_reward_model
from evalkit.train.sft import SFTConfig, sft
from evalkit.train.tokenizer import TokenizerConfig, train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LadderConfig:
    depths: tuple[int, ...] = DEFAULT_LADDER
    comparisons: tuple[str, ...] = ("batch18", "batch13")  # the RM's training labels (real human judgments)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain_steps: int = 300
    pretrain_seq_len: int = 256
    sft_steps: int = 200
    rm_epochs: int = 1
    ppo_iterations: int = 20
    ppo_rollouts: int = 16
    max_query_tokens: int = 512
    best_of_n: int = 16
    seed: int = 0


PRESETS = {
    "default": LadderConfig(),
    # minutes on a 2-core CPU, for smoke runs
    "tiny": LadderConfig(depths=(1, 2, 4), tokenizer=TokenizerConfig(vocab_size=4096, max_documents=800), pretrain_steps=60,
                         pretrain_seq_len=128, sft_steps=40, ppo_iterations=6, ppo_rollouts=8, max_query_tokens=256),
}


def _done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def run_ladder(cfg: LadderConfig, out_dir: str | Path) -> dict:
    from evalkit.pipeline import import_openai

    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    path = out_dir / "ladder.json"
    if path.is_file():
        timings = json.loads(path.read_text()).get("timings_s", {})

    def stage(name: str, folder: Path, fn) -> Path:
        if _done(folder):
            log.info("%s: complete, skipping", folder)
            return folder
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        artifacts.write_json(path, {"config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__)), "timings_s": timings})
        log.info("%s took %.1fs", name, timings[name])
        return folder

    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        t0 = time.perf_counter()
        train_tokenizer(tok_dir, cfg.tokenizer)
        timings["tokenizer"] = round(time.perf_counter() - t0, 1)
    comparisons = import_openai(cfg.comparisons, out_dir / "comparisons").out_dir
    for depth in cfg.depths:
        d = out_dir / f"d{depth}"
        pre = stage(f"d{depth}/pretrain", d / "pretrained", lambda: pretrain(PretrainConfig(
            tokenizer=str(tok_dir), depth=depth, steps=cfg.pretrain_steps, seq_len=cfg.pretrain_seq_len, seed=cfg.seed), d / "pretrained"))
        sup = stage(f"d{depth}/sft", d / "sft", lambda: sft(SFTConfig(
            init=str(pre), steps=cfg.sft_steps, max_query_tokens=cfg.max_query_tokens, seed=cfg.seed), d / "sft"))
        rm = stage(f"d{depth}/rm", d / "rm", lambda: train_reward_model(RewardConfig(
            init=str(sup), comparisons=str(comparisons), epochs=cfg.rm_epochs, max_query_tokens=cfg.max_query_tokens, seed=cfg.seed), d / "rm"))
        stage(f"d{depth}/ppo", d / "ppo", lambda: ppo(PPOConfig(
            policy=str(sup), reward_model=str(rm), iterations=cfg.ppo_iterations, rollouts=cfg.ppo_rollouts,
            max_query_tokens=cfg.max_query_tokens, seed=cfg.seed), d / "ppo"))
        write_best_of_n(d / "best_of_n", sup, rm, cfg.best_of_n)
    summary = {"config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__)), "timings_s": timings}
    artifacts.write_json(path, summary)
    return summary


def ladder_config(preset: str, depths: tuple[int, ...] | None = None) -> LadderConfig:
    from evalkit.errors import EvalkitError

    if preset not in PRESETS:
        raise EvalkitError(f"unknown ladder preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    return replace(cfg, depths=depths) if depths else cfg
