"""PPO from human feedback (REFERENCE.md; the "N+ implementation details" replication).

Policy from SFT; a frozen copy of SFT as the KL reference; a separate value model initialised from the reward model;
the frozen reward model. Per episode ``R = r_RM(x, y) − β · Σ_t log(π(y_t)/π_SFT(y_t))``, the KL applied per token and
the RM score added at the last real token (never a pad). GAE with γ = 1, λ = 0.95, whitened advantages, clipped
policy and value losses, 4 epochs per batch; logits are divided by the sampling temperature wherever
log-probabilities are taken.

The lineage's contract (``evalkit.contract``, read from the SFT checkpoint and checked against the RM's) decides the
query length, the summary length and the stop rule: rollouts come from the same batched decoder as ``evalkit
generate`` and stop at EOS or a newline; the RM scores the canonical form (query + " " + text + EOS) exactly as it was
trained; a completion that ran out of tokens gets the contract's ``no_eos_score``.

Under ``torchrun`` each rank samples its own share of the episodes (episode seeds come from the global episode
index), advantages are whitened with global statistics, and DDP all-reduces the policy's and the value model's
gradients, so every rank ends with the same weights. Every model stays in eval mode: dropout never changes an RL
forward pass (the ratio at the first epoch is exactly 1).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evalkit import decoding, distributed, precision as prec
from evalkit.checkpoints import read_metadata
from evalkit.contract import read_contract, same_lineage
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, count_params, load_causal_lm, load_tokenizer, top_blocks
from evalkit.seeds import derive_seed
from evalkit.train import checkpointing, logprobs, optim
from evalkit.train.quality import measure, paired_difference, read_quality, rescore
from evalkit.train.sft import train_items
from evalkit.vocab import SAMPLING_TEMPERATURE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig:
    policy: str  # the SFT checkpoint
    reward_model: str
    iterations: int = 20
    rollouts: int = 16  # episodes per iteration on each rank
    minibatch_size: int = 8
    ppo_epochs: int = 4
    lr: float = 3e-5
    value_lr: float = 1e-4
    weight_decay: float = 0.0
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    temperature: float = SAMPLING_TEMPERATURE
    trainable_layers: int = 0  # 0 = every block; k = only the top k blocks of the policy and of the value model
    eval_posts: int = 200  # held-out valid1 posts measured at the end (quality, RM score, KL to SFT); 0 = none
    max_items: int = 0
    save_every: int = 0
    seed: int = 0
    threads: int = 0
    precision: str = "auto"  # auto: bfloat16 autocast where the device has bf16 matrix units (evalkit.precision)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, d: distributed.Dist | None = None) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (of every rank's batch under torchrun)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if d is not None and d.enabled:
        torch.distributed.all_reduce(stats)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0)
    return ((x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over response tokens (masked positions contribute nothing)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv


def token_values(model, ids, mask, trunk=None, hidden=None) -> torch.Tensor:
    """The value model's value at every position (through DDP's forward when wrapped); from the shared trunk's
    output when given, running only the top blocks."""
    if hidden is None:
        return model(ids, mask, per_token=True)
    inner = getattr(model, "module", model)
    with top_blocks(inner.backbone, trunk.k):
        return model(None, mask, per_token=True, inputs_embeds=hidden)


class EpisodeOrder:
    """Which training post each global episode uses: epoch ``e // n`` is a fresh seeded permutation, so the order
    never wraps inside an epoch and posts never repeat before every post has been used."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, episode: int) -> int:
        epoch, pos = divmod(episode, self.n)
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng(derive_seed("ppo-episodes", self.seed, epoch)).permutation(self.n)
        return int(self._perms[epoch][pos])


@dataclass
class _Models:
    """PPO's four models: the policy and the value model train (``pol``/``val``: their DDP wrappers under torchrun),
    the SFT reference and the reward model are frozen; ``trunk``: their shared frozen lower blocks, if any."""

    policy: torch.nn.Module
    reference: torch.nn.Module
    reward_model: RewardModel
    value_model: RewardModel
    pol: torch.nn.Module
    val: torch.nn.Module
    trunk: logprobs.SharedTrunk | None


@dataclass
class _Batch:
    """One iteration's episodes, scored, with what the update needs (steps 1-5)."""

    ids: torch.Tensor
    mask: torch.Tensor
    q_len: int
    resp_mask: torch.Tensor
    is_finished: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor | None
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def _rollout(cfg: PPOConfig, m: _Models, tok, contract, queries: list[list[int]], episodes: range, beta: float,
             precision: str, d) -> _Batch:
    # 1. rollout: this rank's episodes of the iteration, one summary each at the training temperature
    with prec.weights_as(precision, m.policy):
        samples = decoding.sample(m.policy, tok, queries, contract, cfg.temperature,
                                  [derive_seed("ppo-rollout", cfg.seed, e) for e in episodes], batch_size=cfg.rollouts)
    responses = [ids for ids, _ in samples]
    is_finished = torch.tensor([fin for _, fin in samples], device=d.device)
    ids, mask, q_len, resp_mask = logprobs.join_query_response(queries, responses, tok.pad_token_id)
    ids, mask, resp_mask = ids.to(d.device), mask.to(d.device), resp_mask.to(d.device)

    with torch.no_grad(), prec.autocast(precision, d.device):
        # 2. score: the RM on the canonical form of each summary; an unfinished one gets the no-EOS score
        texts = [decoding.response_text(tok, r) for r in responses]
        scores = decoding.score_summaries(m.reward_model, tok, queries, texts, contract, d.device).to(d.device)
        scores = torch.where(is_finished, scores, torch.full_like(scores, contract.no_eos_score))

        # 3. log-probabilities under the policy and the SFT reference; values per response token
        hidden = m.trunk(ids, mask) if m.trunk else None
        old_logp, _ = logprobs.response_logprobs(m.policy, ids, mask, q_len, cfg.temperature, m.trunk, hidden)
        ref_logp, _ = logprobs.response_logprobs(m.reference, ids, mask, q_len, cfg.temperature, m.trunk, hidden)
        old_values = token_values(m.value_model, ids, mask, m.trunk, hidden)[:, q_len - 1: -1]

        # 4. KL penalty per token, the score on the last real token
        kl = (old_logp - ref_logp) * resp_mask
        rewards = -beta * kl
        last = (resp_mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last), device=d.device), last] += scores * (resp_mask.sum(1) > 0)

        # 5. advantages (GAE, γ = 1, λ = 0.95), returns, whitening (global statistics under torchrun)
        advantages = gae(rewards, old_values * resp_mask, resp_mask, cfg.gamma, cfg.lam)
        returns = advantages + old_values
        advantages = masked_whiten(advantages, resp_mask, d)
    return _Batch(ids, mask, q_len, resp_mask, is_finished, scores, kl, hidden, old_logp, old_values, advantages, returns)


def _update(cfg: PPOConfig, m: _Models, b: _Batch, pol_opt, val_opt, it: int, precision: str, d) -> dict[str, list[float]]:
    """6. update: ``ppo_epochs`` epochs of clipped policy and value losses over minibatches; per-minibatch statistics."""
    stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "vf_clipfrac": [], "approx_kl": [], "entropy": [], "ratio": []}
    gen = torch.Generator().manual_seed(derive_seed("ppo-minibatch", cfg.seed, it, d.rank))
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(cfg.rollouts, generator=gen).split(cfg.minibatch_size):
            mb = mb.to(d.device)
            mask = b.resp_mask[mb]
            h = b.hidden[mb] if b.hidden is not None else None
            with prec.autocast(precision, d.device):
                logp, entropy = logprobs.response_logprobs(m.pol, b.ids[mb], b.mask[mb], b.q_len, cfg.temperature, m.trunk, h)
            ratio = torch.exp(logp - b.old_logp[mb])
            pg1 = -b.advantages[mb] * ratio
            pg2 = -b.advantages[mb] * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
            pg_loss = masked_mean(torch.max(pg1, pg2), mask)
            pol_opt.zero_grad(set_to_none=True)
            pg_loss.backward()
            torch.nn.utils.clip_grad_norm_(optim.trainable(m.policy), 1.0)
            pol_opt.step()

            with prec.autocast(precision, d.device):
                values = token_values(m.val, b.ids[mb], b.mask[mb], m.trunk, h)[:, b.q_len - 1: -1]
            clipped = b.old_values[mb] + (values - b.old_values[mb]).clamp(-cfg.cliprange_value, cfg.cliprange_value)
            vf1, vf2 = (values - b.returns[mb]) ** 2, (clipped - b.returns[mb]) ** 2
            vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
            val_opt.zero_grad(set_to_none=True)
            vf_loss.backward()
            torch.nn.utils.clip_grad_norm_(optim.trainable(m.value_model), 1.0)
            val_opt.step()

            with torch.no_grad():
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > cfg.cliprange).float(), mask).item())
                stats["vf_clipfrac"].append(masked_mean((vf2 > vf1).float(), mask).item())
                stats["approx_kl"].append(0.5 * masked_mean((logp - b.old_logp[mb]) ** 2, mask).item())
                stats["entropy"].append(masked_mean(entropy, mask).item())
                stats["ratio"].append(masked_mean(ratio, mask).item())
    return stats


def _metrics_row(cfg: PPOConfig, b: _Batch, stats: dict[str, list[float]], it: int, beta: float, elapsed: float,
                 shared_trunk: bool, d) -> dict:
    """7. the iteration's metrics (means over ranks)."""
    mean_kl = distributed.all_reduce_mean(float(b.kl.sum(1).mean()), d)
    score = distributed.all_reduce_mean(float(b.scores.mean()), d)
    return {
        "step": it + 1, "score": score, "kl": mean_kl, "beta": beta, "reward": score - beta * mean_kl,
        "mean_length": distributed.all_reduce_mean(float(b.resp_mask.sum(1).mean()), d),
        "no_eos_fraction": distributed.all_reduce_mean(float((~b.is_finished).float().mean()), d),
        "first_ratio": stats["ratio"][0], "elapsed_s": elapsed,
        "episodes": (it + 1) * cfg.rollouts * d.world, "shared_trunk": shared_trunk,
        **{k: distributed.all_reduce_mean(sum(v) / len(v), d) for k, v in stats.items() if k != "ratio"},
    }


def ppo(cfg: PPOConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.policy)
    rm_contract = read_contract(cfg.reward_model)
    same_lineage(read_contract(cfg.policy), rm_contract, f"policy {cfg.policy}", f"reward model {cfg.reward_model}")
    contract = rm_contract  # the policy's limits and stop rule, and the no-EOS score set on the RM's scale
    if cfg.rollouts % cfg.minibatch_size:
        raise EvalkitError(f"rollouts {cfg.rollouts} is not a multiple of minibatch_size {cfg.minibatch_size}")
    d, state = checkpointing.start_run(out_dir, cfg, resume)
    precision = prec.resolve(cfg.precision, d.device)
    items = train_items(cfg.max_items).to_dict("records")
    if not items:
        raise EvalkitError("no TL;DR train posts to run PPO on")
    order = EpisodeOrder(len(items), cfg.seed)
    query = functools.cache(lambda i: decoding.encode_query(tok, items[i], contract.max_query_tokens))  # the posts its episodes reach

    # models: all in eval mode (no dropout in any RL forward pass); only the policy and the value model train
    policy = load_causal_lm(cfg.policy)
    reference = load_causal_lm(cfg.policy).to(d.device).eval().requires_grad_(False)
    reward_model = RewardModel.load(cfg.reward_model).to(d.device).eval().requires_grad_(False)
    value_model = RewardModel.load(cfg.reward_model)
    checkpointing.load_weights(state, {"policy": policy, "value": value_model})
    policy, value_model = policy.to(d.device).eval(), value_model.to(d.device).eval()
    frozen = optim.freeze_lower_layers(policy, cfg.trainable_layers)
    optim.freeze_lower_layers(value_model.backbone, cfg.trainable_layers, extra=(value_model.head,))
    # with only the top blocks training, the lower blocks are one frozen trunk shared by all four models: run it once
    trunk = logprobs.SharedTrunk.build([policy, reference, value_model.backbone, reward_model.backbone], cfg.trainable_layers)
    m = _Models(policy, reference, reward_model, value_model, distributed.replicate(policy, d), distributed.replicate(value_model, d), trunk)
    pol_opt = torch.optim.AdamW(optim.param_groups(policy, cfg.weight_decay), lr=cfg.lr, eps=1e-5)
    val_opt = torch.optim.AdamW(optim.param_groups(value_model, cfg.weight_decay), lr=cfg.value_lr, eps=1e-5)
    beta, start = cfg.kl_coef, 0
    if state:
        pol_opt.load_state_dict(state["policy_optimizer"])
        val_opt.load_state_dict(state["value_optimizer"])
        beta, start = state["beta"], state["iteration"]
        checkpointing.truncate_metrics(out_dir, start)
    t0 = time.perf_counter()

    for it in range(start, cfg.iterations):
        first = (it * d.world + d.rank) * cfg.rollouts  # episode seeds come from the global episode index
        episodes = range(first, first + cfg.rollouts)
        batch = _rollout(cfg, m, tok, contract, [query(order[e]) for e in episodes], episodes, beta, precision, d)  # steps 1-5
        stats = _update(cfg, m, batch, pol_opt, val_opt, it, precision, d)  # step 6
        row = _metrics_row(cfg, batch, stats, it, beta, time.perf_counter() - t0, trunk is not None, d)  # step 7
        if cfg.adaptive_kl:
            error = max(-0.2, min(0.2, row["kl"] / cfg.kl_target - 1))
            beta *= 1 + error * cfg.rollouts * d.world / cfg.kl_horizon
        if d.main:
            checkpointing.append_metrics(out_dir, row)
            log.info("ppo %d: score %.3f kl %.3f len %.1f", it + 1, row["score"], row["kl"], row["mean_length"])
            if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
                checkpointing.save_state(out_dir, cfg, {"iteration": it + 1, "beta": beta, "policy_optimizer": pol_opt.state_dict(),
                                                 "value_optimizer": val_opt.state_dict()}, {"policy": policy, "value": value_model})

    # 8. the checkpoint, and what the policy does on held-out posts: RM score gain over SFT at its KL
    del m  # its DDP wrappers may not outlive the process group (distributed.shutdown_distributed)
    digests = checkpointing.check_replicas_in_sync(policy, d)
    if d.main:
        policy.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        value_model.save(out_dir / "value")
        quality = measure(policy, tok, contract, out_dir, cfg.eval_posts, reward_model=reward_model, kl_reference=reference,
                          kl_temperature=cfg.temperature, device=d.device, trainable_layers=cfg.trainable_layers, precision=precision)
        quality.update(gain_over_sft(out_dir, cfg.policy, reward_model, tok, contract, d.device, precision))
        rows = checkpointing.read_metrics(out_dir)
        parent = read_metadata(cfg.policy)
        checkpointing.finish_checkpoint(out_dir, cfg, "ppo", checkpointing.input_files(cfg.policy) + checkpointing.input_files(cfg.reward_model), {
            "policy_kind": "ppo", "depth": parent.get("depth"), "base": parent.get("base"), **count_params(policy), **frozen,
            "iterations": cfg.iterations, "episodes": cfg.iterations * cfg.rollouts * d.world,
            "final_kl": rows[-1]["kl"] if rows else None, "final_score": rows[-1]["score"] if rows else None,
            "init": str(cfg.policy), "reward_model": str(cfg.reward_model), "kl_coef": cfg.kl_coef, "world_size": d.world,
            "replica_digests": digests, "contract": contract.to_dict(), "quality": quality, "precision": precision,
        })
    distributed.shutdown_distributed(d)
    return out_dir


def gain_over_sft(ppo_dir: Path, sft_dir: str | Path, reward_model, tok, contract, device, precision: str = "float32") -> dict:
    """The held-out RM score of PPO's summaries minus SFT's on the same posts (SFT's stored ``quality.parquet``,
    rescored with this RM), with a bootstrap CI over posts, and the length ratio PPO/SFT."""
    ours = read_quality(ppo_dir)
    theirs = rescore(sft_dir, reward_model, tok, contract, device, precision)
    if ours is None or theirs is None or "rm_score" not in ours:
        return {}
    both = ours.merge(theirs, on="item_id", suffixes=("", "_sft"))
    diff = paired_difference(both["rm_score"].to_numpy(), both["rm_score_sft"].to_numpy())
    return {"rm_score_sft": float(both["rm_score_sft"].mean()), "rm_gain_over_sft": diff,
            "length_ratio_to_sft": float(both["n_tokens"].mean() / max(1e-9, both["n_tokens_sft"].mean()))}
