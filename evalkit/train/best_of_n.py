"""Best-of-N: sample N summaries from the SFT policy, keep the one the reward model scores highest.

No training; its KL from SFT is known analytically: ``log N − (N − 1)/N`` nats (REFERENCE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from evalkit.data.query import MAX_QUERY_TOKENS, MAX_SUMMARY_TOKENS
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, load_causal_lm, load_tokenizer, read_metadata
from evalkit.seeds import derive_seed
from evalkit.train import common


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N ‖ SFT) in nats."""
    if n < 1:
        raise EvalkitError(f"best-of-N needs N >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass(frozen=True)
class BestOfNConfig:
    policy: str  # the SFT checkpoint
    reward_model: str
    n: int = 4
    temperature: float = 0.7
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_summary_tokens: int = MAX_SUMMARY_TOKENS
    seed: int = 0


def best_of_n(cfg: BestOfNConfig, items: pd.DataFrame) -> pd.DataFrame:
    """For each item: the N samples' texts and RM scores, and which one is kept (``is_best``)."""
    best_of_n_kl(cfg.n)
    tok = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy).eval()
    rm = RewardModel.load(cfg.reward_model).eval()
    rows = []
    for item in items.to_dict("records"):
        query = common.encode_query(tok, item, cfg.max_query_tokens)
        responses, hit = common.sample_responses(policy, tok, [query] * cfg.n, cfg.temperature, cfg.max_summary_tokens,
                                                 derive_seed("best-of-n", cfg.policy, item["item_id"], cfg.seed))
        ids, mask = common.pad_batch([query + (r or [tok.pad_token_id]) for r in responses], tok.pad_token_id)
        with torch.no_grad():
            scores = rm(ids, mask).tolist()
        best = max(range(cfg.n), key=lambda k: scores[k])
        for k, (resp, h, s) in enumerate(zip(responses, hit, scores)):
            text = tok.decode([t for t in resp if t != tok.eos_token_id], skip_special_tokens=True).split("\n")[0].strip()
            rows.append({"item_id": item["item_id"], "sample_idx": k, "text": text, "score": s, "hit_eos": h,
                         "n_tokens": len(resp), "is_best": k == best})
    return pd.DataFrame(rows)


def best_of_n_metadata(cfg: BestOfNConfig) -> dict:
    """What a best-of-N policy records: its parts, N and its analytic KL from SFT."""
    parent = read_metadata(cfg.policy)
    return {"policy_kind": "best_of_n", "n": cfg.n, "kl_from_sft": best_of_n_kl(cfg.n), "policy": str(Path(cfg.policy)),
            "reward_model": str(Path(cfg.reward_model)), "n_params": parent.get("n_params"), "depth": parent.get("depth")}


SPEC_FILE = "best_of_n.json"


def write_best_of_n(folder: str | Path, policy: str | Path, reward_model: str | Path, n: int, temperature: float = 0.7) -> Path:
    """A best-of-N policy folder: ``best_of_n.json`` naming the SFT policy, the RM, N, the sampling temperature and
    the analytic KL. ``evalkit generate --policy FOLDER`` samples from it."""
    from evalkit.artifacts import write_json

    folder = Path(folder)
    meta = read_metadata(policy)
    write_json(folder / SPEC_FILE, {"policy_kind": "best_of_n", "policy": str(Path(policy).resolve()),
                                    "reward_model": str(Path(reward_model).resolve()), "n": n, "temperature": temperature,
                                    "kl_from_sft": best_of_n_kl(n), "n_params": meta.get("n_params"), "depth": meta.get("depth")})
    return folder


def read_best_of_n(folder: str | Path) -> dict | None:
    import json

    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    for key in ("policy", "reward_model", "n"):
        if key not in spec:
            raise EvalkitError(f"{path}: missing field '{key}'")
    best_of_n_kl(int(spec["n"]))
    return spec
