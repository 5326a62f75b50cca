"""Reward-model accuracy vs model size, and preference vs KL from SFT (over-optimisation, Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from evalkit.analysis.preference import wilson
from evalkit.checkpoints import read_metadata
from evalkit.errors import EvalkitError


def rm_accuracy_by_size(folders: list[str | Path]) -> tuple[pd.DataFrame, dict]:
    """Held-out accuracy of reward-model checkpoints with Wilson intervals, and the accuracy gained per doubling of
    size (least squares on log2 n_params; the paper: ≈1.8 points per doubling)."""
    rows = []
    for folder in folders:
        meta = read_metadata(folder)
        if meta.get("held_out_accuracy") is None:
            raise EvalkitError(f"{folder}: no held-out accuracy in evalkit.json; is it a reward model trained by evalkit?")
        n = int(meta["n_held_out"])
        wins = round(meta["held_out_accuracy"] * n)
        lo, hi = wilson(np.array([wins]), np.array([n]))
        rows.append({"reward_model": str(folder), "base": meta.get("base") or "", "n_params": int(meta["n_params"]),
                     "accuracy": meta["held_out_accuracy"], "n_held_out": n, "ci_low": float(lo[0]), "ci_high": float(hi[0])})
    df = pd.DataFrame(rows).sort_values("n_params").reset_index(drop=True)
    slope, why = None, "one size"
    if df["base"].nunique() > 1:
        why = "reward models of different model families: a slope across them is not a size effect"
    elif df["n_params"].nunique() >= 2:
        slope, why = float(np.polyfit(np.log2(df["n_params"]), df["accuracy"], 1)[0]), ""
    return df, {"accuracy_per_doubling": slope, "n_models": len(df), "why_not": why}


def kl_vs_preference(comparisons: pd.DataFrame, kl_by_policy: dict[str, float]) -> pd.DataFrame:
    """Fraction preferred to the baseline against each policy's KL from SFT (PPO: measured; best-of-N: log N − (N−1)/N)."""
    rows = []
    for policy, kl in kl_by_policy.items():
        g = comparisons[comparisons["policy_id"] == policy]
        if g.empty:
            continue
        wins, n = int(g["outcome"].sum()), len(g)
        lo, hi = wilson(np.array([wins]), np.array([n]))
        rows.append({"policy_id": policy, "kl_from_sft": kl, "rate": wins / n, "n": n, "ci_low": float(lo[0]), "ci_high": float(hi[0])})
    if not rows:
        raise EvalkitError("none of the given policies has comparisons with the baseline")
    return pd.DataFrame(rows).sort_values("kl_from_sft").reset_index(drop=True)
