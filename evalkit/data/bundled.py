"""Paths of the real data files shipped inside the package (see ``evalkit/data/ATTRIBUTION.md``)."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from evalkit.errors import EvalkitError

TLDR_CSV = "tldr/oai1b_ppo1.3b_vs_ref.csv"
TLDR_JUDGED_CSV = "tldr/oai1b_gpt4_judged.csv"
CNNDM_CSV = "cnndm/validation_first1000.csv"
GPT2_TOKENIZER_DIR = "gpt2_tokenizer"
GPT2_VOCAB_SIZE = 50257
# the released human comparison batches, by short name
COMPARISON_BATCHES = {
    "batch18": "openai_sff/batch18.json",
    "batch13": "openai_sff/batch13.json",
    "batch0_cnndm": "openai_sff/batch0_cnndm.json",
    "edit_b2_eval_test": "openai_sff/edit_b2_eval_test.json",
}
# the reward model's default labels: every released TL;DR batch of real human judgments
DEFAULT_COMPARISONS = ("batch13", "batch18")


def bundled_path(relative: str) -> Path:
    """Absolute path of a bundled data file."""
    path = Path(str(resources.files("evalkit.data").joinpath("bundled", relative)))
    if not path.exists():
        raise EvalkitError(f"bundled data file missing: {path}; reinstall evalkit")
    return path


def comparison_batch(name: str) -> Path:
    """Path of a released comparison batch by short name (``batch18``) or of a file path given as is."""
    if name in COMPARISON_BATCHES:
        return bundled_path(COMPARISON_BATCHES[name])
    path = Path(name)
    if path.is_file():
        return path
    raise EvalkitError(f"unknown comparison batch {name!r}: not a file; bundled: {', '.join(COMPARISON_BATCHES)}")


@functools.lru_cache(maxsize=1)
def gpt2_bpe():
    """The same GPT-2 byte-level BPE as a ``tokenizers.Tokenizer`` (no transformers, no torch): for counting and
    truncating queries where no model is loaded (``evalkit data show``)."""
    folder = bundled_path(GPT2_TOKENIZER_DIR)
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_gpt2_tokenizer():
    """OpenAI's GPT-2 byte-level BPE from the bundled ``vocab.json`` and ``merges.txt`` (50,257 tokens)."""
    from transformers import GPT2Tokenizer

    folder = bundled_path(GPT2_TOKENIZER_DIR)
    tok = GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    if len(tok) != GPT2_VOCAB_SIZE:
        raise RuntimeError(f"GPT-2 tokenizer loaded with {len(tok)} tokens, expected {GPT2_VOCAB_SIZE}")
    return tok
