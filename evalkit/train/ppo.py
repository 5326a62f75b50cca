"""PPO from human feedback (REFERENCE.md; the "N+ implementation details" replication).

Policy from SFT; a frozen copy of SFT as the KL reference; a separate value model initialised from the reward model;
the frozen reward model. Per episode ``R = r_RM(x, y) − β · Σ_t log(π(y_t)/π_SFT(y_t))``, the KL applied per token and
the RM score added at the last real token (never a pad). A completion without EOS gets ``eos_penalty`` as its score.
GAE with γ = 1, λ = 0.95, whitened advantages, clipped policy and value losses, 4 epochs per batch; logits are
divided by the sampling temperature wherever log-probabilities are taken.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from evalkit.data.query import MAX_QUERY_TOKENS, MAX_SUMMARY_TOKENS
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, count_params, load_causal_lm, load_tokenizer, position_ids, read_metadata
from evalkit.seeds import derive_seed
from evalkit.train import common

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig:
    policy: str  # the SFT checkpoint
    reward_model: str
    iterations: int = 20
    rollouts: int = 16  # episodes per iteration
    minibatch_size: int = 8
    ppo_epochs: int = 4
    lr: float = 3e-5
    value_lr: float = 1e-4
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    temperature: float = 0.7
    eos_penalty: float = -1.0
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_summary_tokens: int = MAX_SUMMARY_TOKENS
    max_items: int = 0
    save_every: int = 0
    seed: int = 0
    threads: int = 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def response_logprobs(model, ids, mask, q_len: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens (positions ``q_len`` on) and the per-token entropy (no gradient).

    Only the positions that predict response tokens go through the LM head (``logits_to_keep``): for a 512-token
    query and a 48-token summary that skips >90% of the vocabulary projection, the largest cost of a small model.
    """
    n_resp = ids.shape[1] - q_len
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=n_resp + 1).logits
    logits = logits[:, :-1] / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, q_len:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over response tokens (masked positions contribute nothing)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv


def ppo(cfg: PPOConfig, out_dir: str | Path, resume: bool = True) -> Path:
    out_dir = Path(out_dir)
    tok = load_tokenizer(cfg.policy)
    d = common.init_distributed(cfg.threads)
    if d.enabled:
        raise EvalkitError("PPO runs as one process for now; launch it without torchrun")
    state = common.prepare_out_dir(out_dir, cfg, resume)
    from evalkit.train.sft import train_items

    items = train_items(cfg.max_items).to_dict("records")
    queries = [common.encode_query(tok, it, cfg.max_query_tokens) for it in items]
    if not queries:
        raise EvalkitError("no TL;DR train posts to run PPO on")

    policy = load_causal_lm(out_dir if state else cfg.policy).train()
    reference = load_causal_lm(cfg.policy).eval().requires_grad_(False)
    reward_model = RewardModel.load(cfg.reward_model).eval().requires_grad_(False)
    value_model = RewardModel.load(out_dir / "value" if state else cfg.reward_model).train()
    pol_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, eps=1e-5)
    val_opt = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, eps=1e-5)
    beta, start = cfg.kl_coef, 0
    if state:
        pol_opt.load_state_dict(state["policy_optimizer"])
        val_opt.load_state_dict(state["value_optimizer"])
        beta, start = state["beta"], state["iteration"]
        common.truncate_metrics(out_dir, start)
    pad, t0 = tok.pad_token_id, time.perf_counter()

    for it in range(start, cfg.iterations):
        # 1. rollout: sample one summary per query at the training temperature
        epoch, index = divmod(it * cfg.rollouts, len(queries))
        order = common.batch_order(len(queries), 1, cfg.seed, epoch, d)
        picks = [int(order[(index + k) % len(order)][0]) for k in range(cfg.rollouts)]
        batch_q = [queries[i] for i in picks]
        policy.eval()
        responses, hit_eos = common.sample_responses(policy, tok, batch_q, cfg.temperature, cfg.max_summary_tokens,
                                                     derive_seed("ppo-rollout", cfg.seed, it))
        policy.train()
        q_ids, q_mask = common.pad_batch(batch_q, pad, side="left")
        r_ids, r_mask = common.pad_batch([r if r else [pad] for r in responses], pad, side="right")
        r_mask = r_mask * torch.tensor([[1] if r else [0] for r in responses])
        ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
        q_len = q_ids.shape[1]
        resp_mask = r_mask.float()

        with torch.no_grad():
            # 2. score: the RM at the last real token; no EOS → the fixed penalty score
            scores = reward_model(ids, mask)
            no_eos = ~torch.tensor(hit_eos)
            scores = torch.where(no_eos, torch.full_like(scores, cfg.eos_penalty), scores)

            # 3. log-probabilities under the policy and the SFT reference; values per response token
            old_logp, _ = response_logprobs(policy, ids, mask, q_len, cfg.temperature)
            ref_logp, _ = response_logprobs(reference, ids, mask, q_len, cfg.temperature)
            old_values = value_model.values(ids, mask)[:, q_len - 1: -1]

            # 4. KL penalty per token, the score on the last real token
            kl = (old_logp - ref_logp) * resp_mask
            rewards = -beta * kl
            last = (resp_mask.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(last)), last] += scores * (resp_mask.sum(1) > 0)

            # 5. advantages (GAE, γ = 1, λ = 0.95), returns, whitening
            advantages = gae(rewards, old_values * resp_mask, resp_mask, cfg.gamma, cfg.lam)
            returns = advantages + old_values
            advantages = masked_whiten(advantages, resp_mask)

        # 6. update: 4 epochs of clipped policy and value losses over minibatches
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "vf_clipfrac": [], "approx_kl": [], "entropy": []}
        gen = torch.Generator().manual_seed(derive_seed("ppo-minibatch", cfg.seed, it))
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(cfg.rollouts, generator=gen).split(cfg.minibatch_size):
                m = resp_mask[mb]
                logp, entropy = response_logprobs(policy, ids[mb], mask[mb], q_len, cfg.temperature)
                ratio = torch.exp(logp - old_logp[mb])
                pg1 = -advantages[mb] * ratio
                pg2 = -advantages[mb] * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
                pg_loss = masked_mean(torch.max(pg1, pg2), m)
                pol_opt.zero_grad(set_to_none=True)
                pg_loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                pol_opt.step()

                values = value_model.values(ids[mb], mask[mb])[:, q_len - 1: -1]
                clipped = old_values[mb] + (values - old_values[mb]).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                vf1, vf2 = (values - returns[mb]) ** 2, (clipped - returns[mb]) ** 2
                vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), m)
                val_opt.zero_grad(set_to_none=True)
                vf_loss.backward()
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), 1.0)
                val_opt.step()

                with torch.no_grad():
                    stats["pg_loss"].append(pg_loss.item())
                    stats["vf_loss"].append(vf_loss.item())
                    stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > cfg.cliprange).float(), m).item())
                    stats["vf_clipfrac"].append(masked_mean((vf2 > vf1).float(), m).item())
                    stats["approx_kl"].append(0.5 * masked_mean((logp - old_logp[mb]) ** 2, m).item())
                    stats["entropy"].append(masked_mean(entropy, m).item())

        # 7. log, adapt β, save
        mean_kl = float(kl.sum(1).mean())
        row = {
            "step": it + 1, "score": float(scores.mean()), "kl": mean_kl, "beta": beta,
            "reward": float(scores.mean()) - beta * mean_kl, "mean_length": float(resp_mask.sum(1).mean()),
            "no_eos_fraction": float(no_eos.float().mean()), "elapsed_s": time.perf_counter() - t0,
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        common.append_metrics(out_dir, row)
        log.info("ppo %d: score %.3f kl %.3f len %.1f", it + 1, row["score"], mean_kl, row["mean_length"])
        if cfg.adaptive_kl:
            error = max(-0.2, min(0.2, mean_kl / cfg.kl_target - 1))
            beta *= 1 + error * cfg.rollouts / cfg.kl_horizon
        if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
            policy.save_pretrained(out_dir)
            value_model.save(out_dir / "value")
            common.save_state(out_dir, cfg, {"iteration": it + 1, "beta": beta, "policy_optimizer": pol_opt.state_dict(),
                                             "value_optimizer": val_opt.state_dict()})

    policy.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    value_model.save(out_dir / "value")
    rows = common.read_metrics(out_dir)
    parent = read_metadata(cfg.policy)
    common.finish_checkpoint(out_dir, cfg, "ppo", common.input_files(cfg.policy) + common.input_files(cfg.reward_model), {
        "policy_kind": "ppo", "depth": parent.get("depth"), **count_params(policy), "iterations": cfg.iterations,
        "final_kl": rows[-1]["kl"] if rows else None, "final_score": rows[-1]["score"] if rows else None,
        "init": str(cfg.policy), "reward_model": str(cfg.reward_model), "kl_coef": cfg.kl_coef,
    })
    return out_dir
