"""evalkit generate: deterministic greedy decoding whatever the batch, per-item sampling seeds, resume after a
kill -9, baselines as rows, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import ROOT, run_cli, run_torchrun

from evalkit import artifacts
from evalkit.data import load_items
from evalkit.generate import PARTS_DIR, Decoding, Policy, generate, lead3, postprocess

Q = 192  # query tokens for the tiny models


@pytest.fixture(scope="module")
def items():
    return load_items("tldr", "valid2").sort_values("item_id").head(10).reset_index(drop=True)


def texts(table):
    return table.set_index("gen_id")["text"].sort_index()


def test_greedy_is_deterministic_and_batch_independent(tmp_path, items, sft_dir):
    policy = [Policy("sft", str(sft_dir))]
    runs = [generate(items, policy, tmp_path / f"b{bs}-{pc}", Decoding(max_query_tokens=Q), batch_size=bs, prefill_chunk=pc, progress=False)
            for bs, pc in ((1, 16), (3, 16), (10, 16), (10, 3))]  # the last merges the caches of 4 prefill chunks
    for run in runs[1:]:
        assert texts(runs[0]).equals(texts(run))
    again = generate(items, policy, tmp_path / "again", Decoding(max_query_tokens=Q), batch_size=4, progress=False)
    pd.testing.assert_frame_equal(runs[1], again)


def test_sampling_is_reproducible_per_item_seed(tmp_path, items, sft_dir):
    policy = [Policy("sft", str(sft_dir))]
    dec = Decoding(temperature=1.0, n_samples=2, max_query_tokens=Q)
    a = generate(items, policy, tmp_path / "a", dec, batch_size=1, progress=False)
    b = generate(items, policy, tmp_path / "b", dec, batch_size=7, prefill_chunk=3, progress=False)
    assert texts(a).equals(texts(b))  # a sample does not depend on its batch-mates
    assert len(a) == 20 and set(a["sample_idx"]) == {0, 1} and a["seed"].notna().all()
    c = generate(items, policy, tmp_path / "c", Decoding(temperature=1.0, n_samples=2, seed=1, max_query_tokens=Q), progress=False)
    assert (texts(a).values != texts(c).values).any()


def test_rows_validate_with_every_policy_kind(tmp_path, items, pretrained, sft_dir, ppo_dir):
    table = generate(items, [Policy("pre", str(pretrained)), Policy("sft", str(sft_dir)), Policy("ppo", str(ppo_dir))],
                     tmp_path / "all", Decoding(max_query_tokens=Q), baselines=("ref", "openai-ppo-1.3b"), progress=False)
    artifacts.validate(table, "generations")
    kinds = table.groupby("policy_id")["policy_kind"].first().to_dict()
    assert kinds == {"pre": "pretrained", "sft": "sft", "ppo": "ppo", "ref": "ref", "openai-ppo-1.3b": "external"}
    model_rows = table[table["checkpoint"].notna()]
    assert (model_rows["n_tokens"] <= 48).all() and (model_rows["n_params"] > 0).all()
    assert not model_rows["text"].str.contains("\n").any()
    ref = table[table["policy_id"] == "ref"].set_index("item_id")["text"]
    assert ref.to_dict() == items.set_index("item_id")["reference"].to_dict()
    ext = table[table["policy_id"] == "openai-ppo-1.3b"]
    assert set(ext["n_params"]) == {1_300_000_000} and len(ext) == len(items)
    manifest = artifacts.read_manifest(tmp_path / "all")
    assert manifest["config"]["query_formats"] == {"tldr": "tldr"} and "newline" in manifest["config"]["postprocess"]


def test_cnndm_transfer_and_lead3(tmp_path, sft_dir):
    news = load_items("cnndm", "valid2").sort_values("item_id").head(3)
    table = generate(news, [Policy("sft", str(sft_dir))], tmp_path / "news", Decoding(max_query_tokens=Q), baselines=("ref", "lead3"), progress=False)
    assert set(table["dataset"]) == {"cnndm"} and len(table) == 9
    assert artifacts.read_manifest(tmp_path / "news")["config"]["query_formats"] == {"cnndm": "cnndm_transfer"}
    article = "(CNN)First one here. Second: it is Mr. Smith? Third sentence! Fourth one. Fifth."
    assert lead3(article) == "First one here. Second: it is Mr. Smith? Third sentence!"
    assert postprocess("  a summary\nmore text") == "a summary"


def test_resume_after_kill_9_gives_the_same_table(tmp_path, items, sft_dir):
    args = ["generate", "--policy", f"sft={sft_dir}", "--baseline", "ref", "--n-items", "10", "--batch-size", "2",
            "--max-query-tokens", str(Q), "--temperature", "0.8", "--samples", "2", "--out"]
    full = run_cli(*args, tmp_path / "full", check=True)
    assert "generations.parquet" in full.stdout
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "evalkit", *map(str, args), str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / PARTS_DIR).glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parts = list((out / PARTS_DIR).glob("part-*.parquet"))
    assert 2 <= len(parts) < 10, "the run should have been killed midway"
    for p in parts:  # every part on disk is whole
        artifacts.read_table(p, "generations")
    run_cli(*args, out, check=True)
    a = pd.read_parquet(tmp_path / "full" / "generations.parquet")
    b = pd.read_parquet(out / "generations.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_bad_input_is_one_line_exit_2(tmp_path, sft_dir):
    cases = [
        (["generate", "--policy", tmp_path / "missing", "--out", tmp_path / "o"], "no checkpoint folder"),
        (["generate", "--dataset", "tldx", "--baseline", "ref", "--out", tmp_path / "o"], "unknown dataset 'tldx'"),
        (["generate", "--split", "valid9", "--baseline", "ref", "--out", tmp_path / "o"], "unknown split 'valid9'"),
        (["generate", "--baseline", "lead4", "--out", tmp_path / "o"], "unknown baseline 'lead4'"),
        (["generate", "--out", tmp_path / "o"], "nothing to generate"),
        (["generate", "--policy", sft_dir, "--samples", "3", "--out", tmp_path / "o"], "would all be identical"),
    ]
    empty = tmp_path / "train.jsonl"
    empty.write_text('{"id": "a", "subreddit": "s", "title": "t", "post": "p", "summary": "x"}\n')
    cases.append((["generate", "--path", empty, "--split", "valid2", "--baseline", "ref", "--out", tmp_path / "o"], "no items in split 'valid2'"))
    for args, message in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_best_of_n_policy_keeps_the_reward_models_favourite(tmp_path, items, sft_dir, rm_dir):
    import torch

    from evalkit.contract import read_contract
    from evalkit.decoding import encode_query, score_summaries
    from evalkit.models import RewardModel, load_tokenizer
    from evalkit.train.best_of_n import best_of_n_kl, write_best_of_n

    folder = write_best_of_n(tmp_path / "bon", sft_dir, rm_dir, n=4)
    few = items.head(4)
    dec = Decoding(max_query_tokens=Q)
    table = generate(few, [Policy("bon4", str(folder))], tmp_path / "out", dec, progress=False)
    assert set(table["policy_kind"]) == {"best_of_n"} and len(table) == 4 and set(table["temperature"]) == {0.7}
    assert artifacts.read_manifest(tmp_path / "out")["config"]["policies"][0]["checkpoint"] == str(folder)
    # the kept summary scores at least as well as a plain sample at the same temperature
    plain = generate(few, [Policy("sample", str(sft_dir))], tmp_path / "plain", Decoding(temperature=0.7, max_query_tokens=Q), progress=False)
    tok, rm = load_tokenizer(rm_dir), RewardModel.load(rm_dir).eval()
    contract = read_contract(rm_dir)
    queries = [encode_query(tok, r, Q) for r in few.sort_values("item_id").to_dict("records")]

    def contract_scores(t):  # what best-of-N maximises: the RM score, the no-EOS score for an unfinished summary
        t = t.sort_values("item_id")
        raw = score_summaries(rm, tok, queries, list(t["text"]), contract)
        done = torch.tensor((t["hit_eos"] | (t["n_tokens"] < contract.max_summary_tokens)).tolist())
        return torch.where(done, raw, torch.full_like(raw, contract.no_eos_score))

    assert float(contract_scores(table).mean()) >= float(contract_scores(plain).mean()) - 1e-6
    assert best_of_n_kl(4) == pytest.approx(1.3863 - 0.75, abs=1e-4)


def test_generate_under_torchrun_equals_single_process(tmp_path, sft_dir):
    """Two gloo ranks each decode half of the length-sorted items (sampled, so seeds matter) and rank 0 merges one
    table, equal to a single-process run's."""
    args = ["generate", "--policy", f"sft={sft_dir}", "--n-items", "10", "--temperature", "0.7", "--samples", "2",
            "--batch-size", "3", "--baseline", "ref"]
    proc = run_torchrun(*args, "--out", tmp_path / "ddp", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_cli(*args, "--out", tmp_path / "one", check=True)
    ddp, one = (pd.read_parquet(tmp_path / d / "generations.parquet") for d in ("ddp", "one"))
    assert len(one) == 10 * 2 + 10
    pd.testing.assert_frame_equal(ddp, one)
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["world_size"] == 2


def test_sampling_draws_from_the_softmax_per_row_whatever_its_batch_mates():
    from evalkit.decoding import Decoding, _pick

    p = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = torch.log(p.clamp(min=1e-30)) * 0.7  # softmax(logits / 0.7) == p
    dec = Decoding(temperature=0.7)
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.cat([_pick(logits[None], dec, [gen]) for _ in range(5000)]), minlength=4).float()
    assert counts[1] == 0 and torch.allclose(counts / counts.sum(), p, atol=0.02)
    # a row's draw depends on its own generator only, not on which rows share its batch
    alone = _pick(logits[None], dec, [torch.Generator().manual_seed(7)])
    batch = _pick(torch.stack([torch.randn(4), logits, torch.randn(4)]), dec, [torch.Generator().manual_seed(s) for s in (3, 7, 9)])
    assert batch[1] == alone[0]
