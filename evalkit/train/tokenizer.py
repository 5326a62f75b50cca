"""Train a byte-level BPE (the ``tokenizers`` package) on the bundled training text, saved in HF format.

EOS (``<|endoftext|>``) and pad (``<|pad|>``) are distinct tokens, so a reward read "at the last real token" can never
land on padding. Only ``train``-split text is used (checked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from evalkit import artifacts
from evalkit.data.corpus import pretraining_texts
from evalkit.data.query import TLDR_FORMAT

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    max_documents: int = 0  # 0 = every training document


def train_tokenizer(out_dir: str | Path, cfg: TokenizerConfig = TokenizerConfig(), texts: list[str] | None = None):
    """Train the BPE and save it (``tokenizer.json`` + configs) into ``out_dir``; returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    # the folder appears whole or not at all (its files are many); a folder of other files is refused, before training
    with artifacts.built_whole(out_dir, lambda f: any((f / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")),
                               "a tokenizer") as staging:
        texts = texts if texts is not None else pretraining_texts(cfg.max_documents or None)
        # the query scaffolding must tokenize compactly
        texts = texts + [TLDR_FORMAT] * 50
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None)
        tok.model_max_length = 1 << 20
        tok.save_pretrained(staging)
    log.info("tokenizer with %d tokens saved to %s", len(tok), out_dir)
    return tok
