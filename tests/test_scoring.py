"""Best-of-N scores each query once (its KV cache copied to the N candidates): the same scores as scoring every
candidate's whole sequence, for each architecture the ladder uses (GPT-2, Llama/SmolLM2, Gemma 3 with sliding
attention layers)."""

import pytest
import torch

from evalkit import decoding
from evalkit.contract import Contract
from evalkit.models import RewardModel, decoder_layers, final_norm
from evalkit.train import logprobs


class ByteTok:
    """A tokenizer stand-in: one id per character (pad 0, EOS 1)."""

    pad_token_id, eos_token_id = 0, 1

    def encode(self, text, add_special_tokens=False):
        return [2 + ord(c) % 90 for c in text]


def _lm(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=256))
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                              max_position_embeddings=256, layer_types=["sliding_attention", "sliding_attention",
                                                                                        "full_attention"]))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_candidates_share_their_query_pass_and_score_the_same(arch, monkeypatch):
    monkeypatch.setattr(decoding, "encode_summary", lambda tok, t, m, add_eos=True: tok.encode(" " + t)[:m] + [tok.eos_token_id])
    rm = RewardModel.from_causal_lm(_lm(arch)).eval()
    queries = [list(range(5, 17)), [11, 12, 13], list(range(20, 40))]  # longer than the sliding window, and shorter
    texts = ["ab", "cde fgh", "x", "", "hello there, a longer one", "q", "zz top", "a b c", "mm"]
    contract = Contract(max_query_tokens=100, context=256)
    shared = decoding.score_candidates(rm, ByteTok(), queries, texts, 3, contract)
    whole = decoding.score_summaries(rm, ByteTok(), [q for q in queries for _ in range(3)], texts, contract)
    assert torch.allclose(shared, whole, atol=1e-5), (shared, whole)


def _tuned_copy(lm, seed=1):
    """The model with its top block and final norm changed: what SFT or PPO of the top block leaves."""
    import copy

    tuned = copy.deepcopy(lm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder_layers(tuned)[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        final_norm(tuned).weight.add_(0.1)
    return tuned.eval()


def _deep(arch):
    lm = _lm(arch)
    if arch == "gemma3":  # four blocks, the top one full attention, the ones below sliding (window 8 < the queries)
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        lm = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                                max_position_embeddings=256, layer_types=["sliding_attention"] * 3 + ["full_attention"]))
    return lm.eval()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_lineage_shares_its_lower_blocks_in_generation_and_decodes_the_same(arch, tmp_path):
    from evalkit.decoding import Decoding, SharedPrefix, decode_batch, layer_digests

    base = _deep(arch)
    tuned = _tuned_copy(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    plan = SharedPrefix.plan([str(tmp_path / "base"), str(tmp_path / "tuned")])
    shared = plan[str(tmp_path / "base")]
    n_blocks = len(layer_digests(tmp_path / "base")) - 1
    assert plan[str(tmp_path / "tuned")] is shared and shared.depth == n_blocks - 1  # all but the changed top block
    queries = [list(range(5, 25)), [7, 8, 9], list(range(30, 44))]
    dec = Decoding(temperature=0.0, max_new_tokens=6)
    for model in (base, tuned):  # the first stores its lower blocks' prefill, the second only runs its top block
        assert decode_batch(model, ByteTok(), queries, dec, [0, 0, 0], shared=shared) == decode_batch(model, ByteTok(), queries, dec, [0, 0, 0])
    assert len(shared.store) == 1


def test_unrelated_models_and_absolute_positions_share_nothing(tmp_path):
    from evalkit.generate import SharedPrefix

    _lm("llama").save_pretrained(tmp_path / "a")
    torch.manual_seed(5)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(tmp_path / "b")
    _lm("gpt2").save_pretrained(tmp_path / "g1")
    _lm("gpt2").save_pretrained(tmp_path / "g2")
    assert SharedPrefix.plan([str(tmp_path / n) for n in ("a", "b", "g1", "g2")]) == {}


def test_top_blocks_run_with_their_own_attention_kind():
    """Gemma 3 picks sliding or full attention by a block's index: the shared trunk's top-block pass must keep it."""
    model = _deep("gemma3")
    ids, mask, q_len, _ = logprobs.join_query_response([list(range(5, 25)), [9, 10]], [[11, 12, 13], [14]], 0)
    trunk = logprobs.SharedTrunk.build([model, _tuned_copy(model)], 1)
    assert trunk is not None
    with torch.no_grad():
        whole, _ = logprobs.response_logprobs(model, ids, mask, q_len, 0.7)
        shared, _ = logprobs.response_logprobs(model, ids, mask, q_len, 0.7, trunk, trunk(ids, mask))
    assert torch.allclose(whole, shared, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_reward_pairs_share_their_query_and_rank_the_same(arch):
    from evalkit.train.reward import pair_correct, pair_rewards

    rm = RewardModel.from_causal_lm(_lm(arch)).eval()
    q = list(range(5, 30))
    pairs = [(q + [40, 41, 1], q + [42, 1]), ([7, 8, 9, 50, 1], [7, 8, 9, 50, 51, 52, 1]), ([3, 4, 1], [3, 4, 1])]
    with torch.no_grad():
        rc, rr = pair_rewards(rm, pairs, 0, torch.device("cpu"))
    expected = ((rc > rr).float() + 0.5 * (rc == rr).float()).numpy()
    assert (pair_correct(rm, pairs, 0, torch.device("cpu")) == expected).all() and expected[2] == 0.5
    scores = decoding.prefix_scores(rm, [p[0][: decoding.shared_prefix(*p)] for p in pairs],
                                  [s[decoding.shared_prefix(*p):] for p in pairs for s in p], 2, 0)
    assert torch.allclose(scores[0::2], rc, atol=1e-5) and torch.allclose(scores[1::2], rr, atol=1e-5)
