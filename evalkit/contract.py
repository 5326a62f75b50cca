"""The decoding contract: what every stage of one model lineage assumes, recorded once in each checkpoint.

A contract is born where a lineage starts (pretraining, or importing real weights) and travels unchanged through SFT,
the reward model, PPO, best-of-N and ``evalkit generate``; each stage reads it from the checkpoint it starts from and
writes it into the one it makes (``evalkit.json``, key ``contract``). No stage restates these numbers in its own config.

- ``max_query_tokens``: the query (REFERENCE.md format) is truncated to fit this many tokens;
- ``max_summary_tokens``: at most this many summary tokens (48 in the paper), EOS not counted;
- ``context``: the positions the model was trained on; ``max_query_tokens + max_summary_tokens + 1 <= context``;
- ``stop``: a summary ends at EOS or at the first token whose text contains a newline; its text is cut at the first
  newline and stripped. Scoring (RM training, RM scores in PPO, best-of-N, evaluation) always sees the same canonical
  form: query + " " + text + EOS;
- ``no_eos_score``: a completion that reached ``max_summary_tokens`` without stopping is not a summary: PPO and
  best-of-N give it this score instead of the reward model's. It must sit below the RM's range, or a policy learns
  to run on past the cap (a fixed −1 sat inside a reward model's range, and most PPO rollouts learned to run out of
  tokens). So the reward model, the first stage with a score scale, sets it
  (``no_eos_rule``): 4 standard deviations below the mean reference score (0 after the bias shift); PPO and best-of-N
  read it from the reward model's contract.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from evalkit.checkpoints import config_context, model_context, read_metadata
from evalkit.errors import EvalkitError
from evalkit.vocab import CONTEXT, MAX_QUERY_TOKENS, MAX_SUMMARY_TOKENS, check_precision

STOP_RULE = "EOS or a token containing a newline; text cut at the first newline and stripped"
NO_EOS_SDS = 4.0


def no_eos_score_for(reference_score_std: float | None, fallback: float = -1.0) -> float:
    """The reward model's no-EOS score: ``NO_EOS_SDS`` standard deviations of its reference scores below their mean
    (which the bias shift puts at 0); ``fallback`` when it scored fewer than two references."""
    if reference_score_std is None or not reference_score_std > 0:
        return fallback
    return round(-NO_EOS_SDS * float(reference_score_std), 4)


@dataclass(frozen=True)
class Contract:
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_summary_tokens: int = MAX_SUMMARY_TOKENS
    context: int = CONTEXT
    stop: str = STOP_RULE
    no_eos_score: float = -1.0

    def check(self, where: str = "contract") -> "Contract":
        if self.max_query_tokens < 16 or self.max_summary_tokens < 1:
            raise EvalkitError(f"{where}: max_query_tokens {self.max_query_tokens} / max_summary_tokens "
                               f"{self.max_summary_tokens}; expected at least 16 / 1")
        if self.max_query_tokens + self.max_summary_tokens + 1 > self.context:
            raise EvalkitError(f"{where}: a {self.max_query_tokens}-token query plus a {self.max_summary_tokens}-token summary "
                               f"and EOS need {self.max_query_tokens + self.max_summary_tokens + 1} positions, but the model "
                               f"is trained on a context of {self.context}; lower max_query_tokens or train a longer context")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Contract":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EvalkitError(f"{where}: unknown contract field {unknown[0]!r}; known: {', '.join(sorted(names))}")
        try:
            return cls(**{k: type(getattr(cls, k))(v) for k, v in data.items()}).check(where)
        except (TypeError, ValueError):
            raise EvalkitError(f"{where}: contract {data!r} has a value of the wrong type") from None

    def require_query(self, max_query_tokens: int | None, max_new_tokens: int | None, where: str) -> tuple[int, int]:
        """The query and summary limits a caller may use with this checkpoint: its own when unset, never more."""
        q = self.max_query_tokens if max_query_tokens in (None, 0) else int(max_query_tokens)
        s = self.max_summary_tokens if max_new_tokens in (None, 0) else int(max_new_tokens)
        if q > self.max_query_tokens:
            raise EvalkitError(f"{where}: queries of {q} tokens are longer than the {self.max_query_tokens} this checkpoint "
                               f"was trained on (trained context {self.context}); use at most {self.max_query_tokens}")
        if s > self.max_summary_tokens:
            raise EvalkitError(f"{where}: summaries of {s} tokens are longer than the {self.max_summary_tokens} this "
                               f"checkpoint was trained on; use at most {self.max_summary_tokens}")
        return q, s


def read_contract(folder: str | Path, model=None) -> Contract:
    """The checkpoint's recorded contract; for an outside HF checkpoint without one, the paper's limits within its
    context (the model's own positions: ``model``'s config when given, else the folder's ``config.json``)."""
    meta = read_metadata(folder)
    if "contract" in meta:
        return Contract.from_dict(meta["contract"], f"{folder}/evalkit.json")
    context = model_context(model.config) if model is not None else config_context(folder)
    base = Contract()
    q = min(base.max_query_tokens, context - base.max_summary_tokens - 1)
    return Contract(max_query_tokens=q, context=context).check(str(folder))


def same_lineage(a: Contract, b: Contract, what_a: str, what_b: str) -> None:
    """Two checkpoints used together (policy and reward model) must agree on query, summary and stop rule."""
    for name in ("max_query_tokens", "max_summary_tokens", "stop"):
        if getattr(a, name) != getattr(b, name):
            raise EvalkitError(f"{what_a} and {what_b} disagree on {name} ({getattr(a, name)!r} vs {getattr(b, name)!r}); "
                               "train them from one lineage")


@dataclass(frozen=True)
class Decoding:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the checkpoint contract's max_summary_tokens
    n_samples: int = 1
    seed: int = 0
    max_query_tokens: int | None = None  # None: the checkpoint contract's max_query_tokens (a longer one is an error)
    # the weights' dtype while decoding (evalkit.precision): auto = bfloat16 where the device has bf16 matrix units;
    # greedy text may differ slightly from float32's. Generations record the resolved one.
    dtype: str = "auto"

    def check(self) -> "Decoding":
        check_precision(self.dtype, "dtype")
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise EvalkitError(f"temperature {self.temperature} / top_p {self.top_p}: expected finite numbers")
        if self.temperature < 0:
            raise EvalkitError(f"temperature {self.temperature} is negative; expected 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise EvalkitError(f"top_p {self.top_p} is outside (0, 1]")
        if self.n_samples < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise EvalkitError(f"n_samples {self.n_samples} / max_new_tokens {self.max_new_tokens}: expected at least 1")
        if self.max_query_tokens is not None and self.max_query_tokens < 16:
            raise EvalkitError(f"max_query_tokens {self.max_query_tokens}: expected at least 16")
        if self.temperature == 0 and self.n_samples > 1:
            raise EvalkitError(f"{self.n_samples} samples at temperature 0 would all be identical; set a temperature")
        return self
