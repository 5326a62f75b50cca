"""evalkit: a harness for training and evaluating summarizers with human feedback (Stiennon et al., 2020).

The public API for notebooks; the CLI is a thin shell over the same functions.
"""

__version__ = "0.1.0"

from evalkit.artifacts import SCHEMAS, build_manifest, read_table, validate, write_manifest, write_table  # noqa: E402
from evalkit.config import StudyConfig, load_study  # noqa: E402
from evalkit.data import (  # noqa: E402
    format_query,
    load_cnndm,
    load_gpt2_tokenizer,
    load_items,
    load_llm_judgments,
    load_openai_comparisons,
    load_openai_ppo_summaries,
    load_tldr,
    parse_tldr_query,
    preferred_to_reference,
)
from evalkit.errors import EvalkitError  # noqa: E402
from evalkit.generate import Decoding, Policy, generate  # noqa: E402
from evalkit.pipeline import import_openai, prepare_study_data  # noqa: E402
from evalkit.seeds import derive_seed  # noqa: E402
from evalkit import analysis  # noqa: E402  (evalkit.analysis.preference_rates, size_fit, position_effect, ...)

__all__ = [
    "Decoding", "EvalkitError", "analysis", "Policy", "SCHEMAS", "generate", "StudyConfig", "build_manifest", "derive_seed", "format_query", "import_openai",
    "load_cnndm", "load_gpt2_tokenizer", "load_items", "load_llm_judgments", "load_openai_comparisons", "load_openai_ppo_summaries",
    "load_study", "load_tldr", "parse_tldr_query", "preferred_to_reference", "prepare_study_data", "read_table",
    "validate", "write_manifest", "write_table",
]
