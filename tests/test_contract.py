"""One contract across stages, reward-model data that never touches evaluation posts, trainers that freeze what they
say they freeze, PPO like the other trainers (torchrun, dropout off, decay groups, episode order)."""


import numpy as np
import pytest
import torch
from conftest import Q, run_torchrun

from evalkit import decoding
from evalkit.checkpoints import read_metadata
from evalkit.contract import Contract, read_contract
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, decoder_layers, load_causal_lm, load_tokenizer
from evalkit.train import checkpointing, logprobs, optim

# ------------------------------------------------------------------------------------------------------ contract

def test_every_stage_records_the_contract_born_at_pretraining(pretrained, sft_dir, rm_dir, ppo_dir):
    born = read_metadata(pretrained)["contract"]
    assert born["max_query_tokens"] == Q and born["context"] >= Q + born["max_summary_tokens"] + 1
    assert read_metadata(sft_dir)["contract"] == born
    # the reward model sets the no-EOS score on its own scale; PPO carries it; nothing else changes
    rm_meta = read_metadata(rm_dir)
    assert rm_meta["contract"]["no_eos_score"] == pytest.approx(-4 * rm_meta["reference_score_std"], abs=1e-3)
    assert rm_meta["contract"]["no_eos_score"] < 0
    for folder in (rm_dir, ppo_dir):
        assert {**read_metadata(folder)["contract"], "no_eos_score": born["no_eos_score"]} == born, folder


def test_a_context_too_short_for_query_and_summary_is_refused(tokenizer_dir, tmp_path):
    from evalkit.train.pretrain import PretrainConfig, pretrain

    with pytest.raises(EvalkitError, match="need 241 positions"):
        pretrain(PretrainConfig(tokenizer=str(tokenizer_dir), seq_len=128, max_query_tokens=Q, steps=1), tmp_path / "short")


def test_a_query_longer_than_the_checkpoint_was_trained_on_is_an_error(sft_dir, tmp_path):
    from evalkit.data import load_items
    from evalkit.generate import Decoding, Policy, generate

    items = load_items("tldr", "valid2").head(2)
    with pytest.raises(EvalkitError, match=f"longer than the {Q} this checkpoint was trained on"):
        generate(items, [Policy("sft", str(sft_dir))], tmp_path / "g", Decoding(max_query_tokens=Q + 1), progress=False)
    with pytest.raises(EvalkitError, match="summaries of 49 tokens"):
        generate(items, [Policy("sft", str(sft_dir))], tmp_path / "g2", Decoding(max_new_tokens=49), progress=False)
    table = generate(items, [Policy("sft", str(sft_dir))], tmp_path / "g3", Decoding(), progress=False)  # the contract's own
    assert len(table) == 2


def test_outside_checkpoint_without_a_contract_gets_the_papers_limits_within_its_context(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "outside"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=300)).save_pretrained(folder)
    c = read_contract(folder)
    assert (c.max_query_tokens, c.max_summary_tokens, c.context) == (300 - 49, 48, 300)
    with pytest.raises(EvalkitError, match="unknown contract field"):
        Contract.from_dict({"max_query_tokens": 10, "bogus": 1}, "x")


def test_rollout_text_is_the_evaluation_text_and_the_rm_sees_the_canonical_form(sft_dir, rm_dir, tmp_path):
    """PPO rollouts (decoding.sample) and evalkit generate decode the same sample to the same text, and the RM scores
    that text as query + " " + text + EOS: no newline token, whatever the completion stopped on."""
    from evalkit.data import format_query, load_items
    from evalkit.generate import Decoding, Policy, generate
    from evalkit.seeds import derive_seed

    items = load_items("tldr", "valid2").sort_values("item_id").head(6).reset_index(drop=True)
    tok, contract, model = load_tokenizer(sft_dir), read_contract(sft_dir), load_causal_lm(sft_dir).eval()
    table = generate(items, [Policy("p", str(sft_dir))], tmp_path / "gen", Decoding(temperature=0.9), progress=False)
    queries = [tok.encode(format_query(it, tok, contract.max_query_tokens), add_special_tokens=False) for it in items.to_dict("records")]
    seeds = [derive_seed("generate", "p", i, 0, 0) for i in items["item_id"]]
    from evalkit import precision

    with precision.weights_as(precision.resolve("auto"), model):  # as PPO rollouts sample: generate's default precision
        samples = decoding.sample(model, tok, queries, contract, 0.9, seeds)
    rollout_texts = [decoding.response_text(tok, ids) for ids, _ in samples]
    assert rollout_texts == list(table.set_index("item_id").loc[items["item_id"], "text"])
    newline = set(__import__("evalkit.generate", fromlist=["x"]).newline_token_ids(tok).tolist())
    for _q, text in zip(queries, rollout_texts):
        summary = decoding.encode_summary(tok, text, contract.max_summary_tokens)
        assert summary[-1] == tok.eos_token_id and not set(summary) & newline
    rm = RewardModel.load(rm_dir).eval()
    a = decoding.score_summaries(rm, tok, queries, rollout_texts, contract)
    b = decoding.score_summaries(rm, tok, queries, list(table.set_index("item_id").loc[items["item_id"], "text"]), contract)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- reward-model data

def test_reward_model_data_never_holds_an_evaluation_post_and_held_out_is_post_disjoint():
    from evalkit.data import load_items
    from evalkit.train.reward import comparison_sources, evaluation_posts, split_pairs

    pairs, _ = comparison_sources(("batch13", "batch18"))
    assert len(pairs) == 1771 and set(pairs["labeler_kind"]) == {"imported"}
    train, held, dropped = split_pairs(pairs, "valid2", 0.15)
    eval_ids = evaluation_posts("valid2")
    # every comparison the release places in valid2 (832 + 554) is dropped, the bundled valid2 posts among them
    assert dropped == 1386 and len(train) + len(held) == 1771 - 1386
    assert not (set(train["item_id"]) | set(held["item_id"])) & set(pairs.loc[pairs["split"] == "valid2", "item_id"])
    assert not set(train["item_id"]) & eval_ids and not set(held["item_id"]) & eval_ids
    assert not set(train["item_id"]) & set(held["item_id"])
    # every post the trainers measure quality on is held out, so RM scores there are out of sample
    valid1 = set(load_items("tldr", "valid1")["item_id"])
    assert not set(train["item_id"]) & valid1 and set(pairs["item_id"]) & valid1 <= set(held["item_id"])


def test_llm_judged_pairs_are_marked_and_never_held_out():
    from evalkit.train.reward import LLM_JUDGED, comparison_sources, split_pairs

    pairs, _ = comparison_sources(("batch18", LLM_JUDGED))
    llm = pairs[pairs["source"] == LLM_JUDGED]
    assert len(llm) == 1000 and set(llm["labeler_kind"]) == {"llm"}
    _, held, _ = split_pairs(pairs, "valid2", 0.15)
    assert "llm" not in set(held["labeler_kind"])
    with pytest.raises(EvalkitError, match="not a folder, a released batch"):
        comparison_sources(("batch99",))


def test_rm_records_its_training_labels_and_accuracy_next_to_length(rm_dir):
    meta = read_metadata(rm_dir)
    assert meta["training_labels"] and all("(simulated)" in k for k in meta["training_labels"])
    assert meta["eval_split_excluded"] == "valid2" and meta["n_held_out_posts"] > 0


# ------------------------------------------------------------------------------------------- frozen lower blocks

def test_trainable_layers_leave_the_lower_blocks_bit_identical(pretrained, tmp_path):
    from evalkit.train.sft import SFTConfig, sft

    out = sft(SFTConfig(init=str(pretrained), steps=3, batch_size=4, max_items=32, trainable_layers=1, eval_posts=0), tmp_path / "top1")
    before, after = load_causal_lm(pretrained), load_causal_lm(out)
    lower = decoder_layers(before)[0].state_dict()
    for name, value in decoder_layers(after)[0].state_dict().items():
        assert torch.equal(value, lower[name]), name
    assert torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)
    top_before, top_after = decoder_layers(before)[1].state_dict(), decoder_layers(after)[1].state_dict()
    assert any(not torch.equal(top_after[k], top_before[k]) for k in top_before)
    meta = read_metadata(out)
    assert meta["trainable_layers"] == 1 and meta["n_layers"] == 2
    with pytest.raises(EvalkitError, match="trainable_layers 5"):
        optim.freeze_lower_layers(before, 5)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def test_shared_trunk_gives_the_same_logprobs_and_values_as_whole_models():
    policy = _tiny_llama().eval()
    value = RewardModel.from_causal_lm(_tiny_llama(), seed=1).eval()
    with torch.no_grad():
        for p in decoder_layers(value.backbone)[3].parameters():  # a different top block: still one trunk
            p.add_(0.1)
    trunk = logprobs.SharedTrunk.build([policy, value.backbone], 1)
    assert trunk is not None
    ids, mask, q_len, _ = logprobs.join_query_response([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]], 0)
    from evalkit.train.ppo import token_values

    with torch.no_grad():
        hidden = trunk(ids, mask)
        full, _ = logprobs.response_logprobs(policy, ids, mask, q_len, 0.7)
        shared, _ = logprobs.response_logprobs(policy, ids, mask, q_len, 0.7, trunk, hidden)
        assert torch.allclose(full, shared, atol=1e-6)
        assert torch.allclose(token_values(value, ids, mask), token_values(value, ids, mask, trunk, hidden), atol=1e-6)
    with torch.no_grad():
        decoder_layers(value.backbone)[0].mlp.up_proj.weight.add_(0.1)  # lower blocks differ: no sharing
    assert logprobs.SharedTrunk.build([policy, value.backbone], 1) is None


# --------------------------------------------------------------------------------------------------------- PPO

def test_ppo_first_ratio_is_one_and_quality_is_measured(ppo_dir):
    rows = checkpointing.read_metrics(ppo_dir)
    assert all(r["first_ratio"] == pytest.approx(1.0, abs=1e-5) for r in rows)  # no dropout in any RL forward pass
    q = read_metadata(ppo_dir)["quality"]
    for key in ("distinct_fraction", "mean_tokens", "rouge_l", "rm_score", "kl_to_sft", "rm_gain_over_sft", "length_ratio_to_sft"):
        assert key in q, key
    assert q["n_posts"] == 24 and np.isfinite(q["kl_to_sft"])


def test_episode_order_uses_every_post_once_per_epoch():
    from evalkit.train.ppo import EpisodeOrder

    order = EpisodeOrder(7, seed=3)
    first, second = [order[e] for e in range(7)], [order[e] for e in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = _tiny_llama()
    optim.freeze_lower_layers(model, 2)
    decay, no_decay = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert all("norm" in names[id(p)] or p.ndim < 2 for p in no_decay["params"])
    trainable = {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert trainable and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm")) for n in trainable)


def test_ppo_under_torchrun_keeps_replicas_identical(tmp_path, sft_dir, concise_rm_dir):
    out = tmp_path / "ppo-ddp"
    proc = run_torchrun("train", "ppo", "--policy", sft_dir, "--reward-model", concise_rm_dir, "--out", out,
                        "--set", "iterations=2", "--set", "rollouts=4", "--set", "minibatch_size=2", "--set", "max_items=64",
                        "--set", "threads=1", "--set", "eval_posts=0", "--set", "lr=1e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_metadata(out)
    assert meta["world_size"] == 2 and meta["episodes"] == 16
    assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1
    assert meta["replica_digests"][0] == checkpointing.weights_digest(load_causal_lm(out))
    assert meta["replica_digests"][0] != checkpointing.weights_digest(load_causal_lm(sft_dir))  # it learned something


def test_ladder_bad_inputs_are_one_line_errors(tmp_path):
    from conftest import run_cli

    for args, message in ((["--base", "nope"], "unknown ladder base 'nope'"), (["--preset", "huge"], "unknown ladder preset 'huge'"),
                          (["--depths", "2,x"], "expected comma-separated integers")):
        proc = run_cli("train", "ladder", "--out", tmp_path / "l", *args)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "l").exists()
