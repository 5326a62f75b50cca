import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rules import coverage_rule_tables, write_tables  # noqa: E402

from evalkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from evalkit.train.reward import RewardConfig, train_reward_model  # noqa: E402
from evalkit.train.sft import SFTConfig, sft  # noqa: E402
from evalkit.train.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gpt2():
    from evalkit.data import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


@pytest.fixture(scope="session")
def batch_tables():
    from evalkit.data import comparison_batch, read_openai_comparisons

    return {name: read_openai_comparisons(comparison_batch(name)) for name in ("batch18", "batch13", "batch0_cnndm")}


def baseline_study(out, *settings):
    """The default study under ``out`` with ``settings``, its baseline generations (ref, openai-ppo-1.3b, lead3) and
    its tasks built; returns (config, build result)."""
    from evalkit.config import load_study
    from evalkit.generate import generate
    from evalkit.pipeline import study_items_of
    from evalkit.study.build import build_study

    cfg = load_study(ROOT / "studies/default", [f"study.out_dir={out}", *settings])
    generate(study_items_of(cfg), [], out / "generations", baselines=("ref", "openai-ppo-1.3b", "lead3"), progress=False)
    return cfg, build_study(cfg)


def run_cli(*args, cwd=None, check=False, in_process=True):
    """Run the CLI as `evalkit` does (its ``main``: one-line errors, exit statuses) and return a CompletedProcess
    with its exit status and text output. In this process by default, which skips the 5-9 s of imports a
    subprocess pays; ``in_process=False`` for what must be its own process (a server that could block)."""
    if not in_process:
        proc = subprocess.run([sys.executable, "-m", "evalkit", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd or ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    else:
        import contextlib
        import io
        import warnings

        from evalkit.cli import main

        out, err, code = io.StringIO(), io.StringIO(), 0
        argv, here = sys.argv, os.getcwd()
        try:
            sys.argv = ["evalkit", *map(str, args)]
            os.chdir(cwd or ROOT)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    main()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            sys.argv = argv
            os.chdir(here)
        proc = subprocess.CompletedProcess(["evalkit", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"evalkit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True, scope="session")
def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------------------------
# a tiny trained ladder (tokenizer → pretrain → SFT → RM → PPO), shared by the trainer and generation tests

TINY_SFT = dict(steps=40, batch_size=8, max_items=320, lr=1e-3, eval_posts=24)
Q = 192  # the tiny lineage's query limit: set once, at pretraining (its contract), read by every later stage


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def tokenizer_dir(workdir):
    train_tokenizer(workdir / "tok", TokenizerConfig(vocab_size=2048, max_documents=400))
    return workdir / "tok"


@pytest.fixture(scope="session")
def pretrained(workdir, tokenizer_dir):
    return pretrain(PretrainConfig(tokenizer=str(tokenizer_dir), depth=2, seq_len=Q + 64, max_query_tokens=Q, batch_size=16, steps=60,
                                   max_documents=600, eval_posts=24), workdir / "pt")


@pytest.fixture(scope="session")
def sft_dir(workdir, pretrained):
    return sft(SFTConfig(init=str(pretrained), **TINY_SFT), workdir / "sft")


@pytest.fixture(scope="session")
def rule_comparisons(workdir):
    return write_tables(coverage_rule_tables(), workdir / "rule")


@pytest.fixture(scope="session")
def rm_dir(workdir, sft_dir, rule_comparisons):
    cfg = RewardConfig(init=str(sft_dir), comparisons=(str(rule_comparisons),), epochs=2, lr=1e-3)
    return train_reward_model(cfg, workdir / "rm")


@pytest.fixture(scope="session")
def concise_rm_dir(workdir, sft_dir):
    """An RM for the rule "the shorter summary is preferred": its optimum lies inside the 48-token limit.

    (Under the coverage rule of ``rm_dir`` longer is better, so the optimum sits at the cap where the EOS penalty
    starts; measured: a tiny policy's score then stays flat over 24 iterations while KL grows.)"""
    tables = write_tables(coverage_rule_tables(prefer="cut"), workdir / "rule-concise")
    cfg = RewardConfig(init=str(sft_dir), comparisons=(str(tables),), epochs=2, lr=1e-3)
    return train_reward_model(cfg, workdir / "rm-concise")


@pytest.fixture(scope="session")
def ppo_dir(workdir, sft_dir, concise_rm_dir):
    from evalkit.train.ppo import PPOConfig, ppo

    return ppo(PPOConfig(policy=str(sft_dir), reward_model=str(concise_rm_dir), iterations=24, rollouts=16, minibatch_size=8,
                         lr=1e-4, eval_posts=24), workdir / "ppo")


