"""The ladder's one skip rule: a stage is kept while its settings and inputs are unchanged, and made again (with
everything built on it) when they change."""

import json

from evalkit.train.ladder import run_ladder
from evalkit.train.presets import ladder_config, lineage_digest

SMALL = ["pretrain_steps=4", "sft_steps=2", "rm_max_pairs=8", "rm_held_out_posts=2", "ppo_iterations=1", "ppo_rollouts=4",
         "ppo_minibatch=4", "best_of_n=2", "eval_posts=2", "bon_eval_posts=2"]


def test_a_changed_setting_remakes_its_stage_and_what_depends_on_it(tmp_path):
    cfg = ladder_config("tiny", depths=(1,), overrides=SMALL)
    first = run_ladder(cfg, tmp_path)
    assert first["ran"] == ["d1/pretrain", "d1/sft", "d1/rm", "d1/ppo", "d1/best_of_n"]
    assert run_ladder(cfg, tmp_path)["ran"] == []

    sft_manifest = (tmp_path / "d1/sft/manifest.json").read_bytes()
    ppo_lr = ladder_config("tiny", depths=(1,), overrides=[*SMALL, "ppo_lr=1e-4"])
    assert run_ladder(ppo_lr, tmp_path)["ran"] == ["d1/ppo"]  # PPO's own setting: PPO alone
    assert (tmp_path / "d1/sft/manifest.json").read_bytes() == sft_manifest

    sft_steps = ladder_config("tiny", depths=(1,), overrides=[*SMALL, "ppo_lr=1e-4", "sft_steps=3"])
    assert run_ladder(sft_steps, tmp_path)["ran"] == ["d1/sft", "d1/rm", "d1/ppo", "d1/best_of_n"]  # not pretraining
    recorded = json.loads((tmp_path / "ladder.json").read_text())
    assert set(recorded["stage_keys"]) == {"d1/pretrain", "d1/sft", "d1/rm", "d1/ppo", "d1/best_of_n"}
    # the study names the ladder's folder by its lineage, which neither change touched
    assert lineage_digest(cfg) == lineage_digest(ppo_lr) == lineage_digest(sft_steps)
    assert lineage_digest(ladder_config("tiny", depths=(2,), overrides=SMALL)) != lineage_digest(cfg)
