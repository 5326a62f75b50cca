"""Best-of-N: sample N summaries from the SFT policy, keep the one the reward model scores highest.

No training; its KL from SFT is known analytically: ``log N − (N − 1)/N`` nats (REFERENCE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evalkit import decoding, precision as prec
from evalkit.artifacts import write_json
from evalkit.checkpoints import read_metadata
from evalkit.contract import read_contract, same_lineage
from evalkit.data.io import read_json_object
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, load_causal_lm, load_tokenizer
from evalkit.seeds import derive_seed
from evalkit.vocab import SAMPLING_TEMPERATURE


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
    temperature: float = SAMPLING_TEMPERATURE
    seed: int = 0
    precision: str = "auto"  # the weights' dtype while sampling and scoring (evalkit.precision)


def best_of_n(cfg: BestOfNConfig, items: pd.DataFrame) -> pd.DataFrame:
    """For each item: the N samples' texts and RM scores, and which one is kept (``is_best``).

    Samples come from the one batched decoder (``decoding.sample``) under the SFT checkpoint's contract; each is scored
    in the canonical form the RM was trained on; an unfinished sample gets the contract's no-EOS score."""
    best_of_n_kl(cfg.n)
    tok = load_tokenizer(cfg.policy)
    contract = read_contract(cfg.reward_model)  # the lineage's limits, and the no-EOS score on the RM's scale
    same_lineage(read_contract(cfg.policy), contract, f"policy {cfg.policy}", f"reward model {cfg.reward_model}")
    policy = load_causal_lm(cfg.policy).eval()
    rm = RewardModel.load(cfg.reward_model).eval()
    records = items.to_dict("records")
    queries = [decoding.encode_query(tok, it, contract.max_query_tokens) for it in records]
    seeds = [derive_seed("best-of-n", cfg.policy, it["item_id"], cfg.seed, k) for it in records for k in range(cfg.n)]
    with prec.weights_as(prec.resolve(cfg.precision, "cpu"), policy, rm):
        samples, raw, best = decoding.best_of_n_candidates(policy, tok, rm, queries, seeds, cfg.n, cfg.temperature, contract)
    rows = []
    for i, item in enumerate(records):
        for k in range(cfg.n):
            ids, fin = samples[i * cfg.n + k]
            score = float(raw[i * cfg.n + k]) if fin else contract.no_eos_score
            rows.append({"item_id": item["item_id"], "sample_idx": k, "text": decoding.response_text(tok, ids), "score": score,
                         "finished": fin, "n_tokens": len(ids), "is_best": k == best[i]})
    return pd.DataFrame(rows)


def best_of_n_metadata(cfg: BestOfNConfig) -> dict:
    """What a best-of-N policy records: its parts, N and its analytic KL from SFT."""
    parent = read_metadata(cfg.policy)
    return {"policy_kind": "best_of_n", "n": cfg.n, "kl_from_sft": best_of_n_kl(cfg.n), "policy": str(Path(cfg.policy)),
            "reward_model": str(Path(cfg.reward_model)), "n_params": parent.get("n_params"), "depth": parent.get("depth")}


SPEC_FILE = "best_of_n.json"


def write_best_of_n(folder: str | Path, policy: str | Path, reward_model: str | Path, n: int, temperature: float = SAMPLING_TEMPERATURE) -> Path:
    """A best-of-N policy folder: ``best_of_n.json`` naming the SFT policy, the RM, N, the sampling temperature and
    the analytic KL. ``evalkit generate --policy FOLDER`` samples from it."""
    folder = Path(folder)
    meta = read_metadata(policy)
    contract = read_contract(reward_model)
    same_lineage(read_contract(policy), contract, f"policy {policy}", f"reward model {reward_model}")
    write_json(folder / SPEC_FILE, {"policy_kind": "best_of_n", "policy": str(Path(policy).resolve()), "contract": contract.to_dict(),
                                    "reward_model": str(Path(reward_model).resolve()), "n": n, "temperature": temperature,
                                    "kl_from_sft": best_of_n_kl(n), "n_params": meta.get("n_params"), "depth": meta.get("depth")})
    return folder


def read_best_of_n(folder: str | Path) -> dict | None:
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None

    spec = read_json_object(path)
    for key in ("policy", "reward_model", "n"):
        if key not in spec:
            raise EvalkitError(f"{path}: missing field '{key}'")
    best_of_n_kl(int(spec["n"]))
    return spec
