import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gpt2():
    from evalkit.data import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


@pytest.fixture(scope="session")
def batch_tables():
    from evalkit.data import comparison_batch, read_openai_comparisons

    return {name: read_openai_comparisons(comparison_batch(name)) for name in ("batch18", "batch13", "batch0_cnndm")}


def run_cli(*args, cwd=None, check=False):
    """Run the installed CLI in a subprocess; returns CompletedProcess with text output."""
    proc = subprocess.run([sys.executable, "-m", "evalkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"evalkit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True, scope="session")
def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
