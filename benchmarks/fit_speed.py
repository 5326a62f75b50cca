"""The size GLM with item-clustered standard errors plus a 1,000-replicate item-clustered bootstrap on 100k judgments:
evalkit's vectorised bootstrap vs refitting statsmodels in a loop, side by side in one run.

The loop is timed on --loop-replicates replicates and its per-replicate time scaled to 1,000 (running all 1,000
would take minutes); the ratio is per replicate.

    .venv/bin/python benchmarks/fit_speed.py [--judgments 100000] [--loop-replicates 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd


def synthetic(n_judgments: int, rng: np.random.Generator) -> pd.DataFrame:
    sizes = [1e8, 3e8, 1e9, 3e9, 1e10]
    kinds = {"sft": -0.4, "ppo": 0.3}
    policies = [(k, s) for k in kinds for s in sizes]
    n_items = n_judgments // len(policies)
    item_effect = rng.normal(0, 0.3, n_items)
    frames = []
    for kind, size in policies:
        z = kinds[kind] + 0.4 * (np.log(size) - np.log(1e9)) + item_effect
        frames.append(pd.DataFrame({"item_id": np.arange(n_items).astype(str), "labeler_id": "x", "policy_id": f"{kind}-{size:.0e}",
                                    "policy_kind": kind, "n_params": int(size),
                                    "outcome": (rng.random(n_items) < 1 / (1 + np.exp(-z))).astype(int),
                                    "len_policy": 100.0, "len_baseline": 100.0}))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    from evalkit.analysis.preference import bootstrap_size_fit, size_fit

    ap = argparse.ArgumentParser()
    ap.add_argument("--judgments", type=int, default=100_000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--loop-replicates", type=int, default=30)
    args = ap.parse_args()
    df = synthetic(args.judgments, np.random.default_rng(0))

    t0 = time.perf_counter()
    fit = size_fit(df)
    boot = bootstrap_size_fit(df, n_boot=args.replicates, rng=np.random.default_rng(1))
    ours_total = time.perf_counter() - t0
    t1 = time.perf_counter()
    bootstrap_size_fit(df, n_boot=args.replicates, rng=np.random.default_rng(1))
    ours_boot = time.perf_counter() - t1

    d = df.assign(log_n_params=np.log(df["n_params"].astype(float)))
    by_item = {i: g for i, g in d.groupby("item_id")}
    items = np.array(list(by_item))
    rng = np.random.default_rng(2)
    t2 = time.perf_counter()
    for _ in range(args.loop_replicates):
        sample = rng.choice(items, size=len(items), replace=True)
        resampled = pd.concat([by_item[i] for i in sample], ignore_index=True)
        smf.glm("outcome ~ C(policy_kind) * log_n_params", resampled, family=sm.families.Binomial()).fit()
    loop_per = (time.perf_counter() - t2) / args.loop_replicates

    ours_per = ours_boot / args.replicates
    print(f"{len(df)} judgments, {df['item_id'].nunique()} items, {df['policy_id'].nunique()} policies")
    print(f"  evalkit: GLM with clustered SEs + {args.replicates}-replicate vectorised bootstrap in {ours_total:.2f}s "
          f"(bootstrap alone {ours_boot:.2f}s, {1000 * ours_per:.2f} ms/replicate)")
    print(f"  statsmodels refit loop: {1000 * loop_per:.1f} ms/replicate ({args.loop_replicates} timed) → "
          f"{loop_per * args.replicates:.0f}s for {args.replicates}")
    print(f"  ratio loop / evalkit per replicate: {loop_per / ours_per:.0f}x")
    print(f"  slope log_n_params: {fit.params['log_n_params']:.3f} (clustered SE {fit.bse['log_n_params']:.3f}, "
          f"bootstrap SE {boot.set_index('term').loc['log_n_params', 'boot_se']:.3f}; truth 0.400)")


if __name__ == "__main__":
    main()
