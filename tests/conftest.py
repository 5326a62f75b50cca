import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rules import coverage_rule_tables, write_tables  # noqa: E402

from evalkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from evalkit.train.reward import RewardConfig, train_reward_model  # noqa: E402
from evalkit.train.sft import SFTConfig, sft  # noqa: E402
from evalkit.train.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--stress", action="store_true", help="run only the tests marked stress (repeated torchrun runs)")


def pytest_collection_modifyitems(config, items):
    """Stress tests (the torchrun trainers run again and again) are their own run: `pytest --stress`."""
    stress = config.getoption("--stress")
    keep = [it for it in items if (it.get_closest_marker("stress") is not None) == stress]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep


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


TORCHRUN_TIMEOUT = 300  # s; a tiny two-rank run takes 20-60 s here


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), children before grandchildren."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def free_port() -> int:
    """A loopback port no one listens on now (for a server or torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(*args, timeout: float = TORCHRUN_TIMEOUT, module: str | None = "evalkit", env: dict | None = None):
    """``torchrun --nproc_per_node=2 -m <module> ARGS`` (a script as the first of ARGS when ``module`` is None) on a
    free port, in a session of its own, output to files (a pipe would keep ``communicate`` waiting on a hung rank that
    inherited it). Returns the CompletedProcess. If the run has not ended after ``timeout`` seconds, every rank gets
    SIGABRT, so faulthandler prints each thread's Python stack, then torchrun and the ranks get SIGKILL, and the test
    fails with the run's last lines: a hung rank is a failure in bounded time, never a hung suite."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *(["-m", module] if module else []), *map(str, args)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            ranks = _descendants(proc.pid)  # torchrun starts each rank in a session of its own
            for sig, pids, pause in ((signal.SIGABRT, ranks, 3), (signal.SIGKILL, [proc.pid, *ranks], 0)):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                time.sleep(pause)
            proc.wait()
            out.seek(0)
            err.seek(0)
            last_out, last_err = ("\n".join(f.read().splitlines()[-n:]) for f, n in ((out, 30), (err, 120)))
            pytest.fail(f"torchrun {' '.join(map(str, args))} did not end in {timeout:.0f} s (a hung rank); its last lines, "
                        f"with each rank's stacks after SIGABRT:\n--- stdout\n{last_out}\n--- stderr\n{last_err}", pytrace=False)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


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


