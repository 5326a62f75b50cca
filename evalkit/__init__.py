"""evalkit: a harness for training and evaluating summarizers with human feedback (Stiennon et al., 2020).

The public API for notebooks; the CLI is a thin shell over the same functions. Names are loaded when first used
(PEP 562), so ``import evalkit`` — and every CLI command that needs no model — does not load torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "SCHEMAS": "evalkit.artifacts", "build_manifest": "evalkit.artifacts", "read_table": "evalkit.artifacts",
    "validate": "evalkit.artifacts", "write_manifest": "evalkit.artifacts", "write_table": "evalkit.artifacts",
    "StudyConfig": "evalkit.config", "load_study": "evalkit.config",
    "format_query": "evalkit.data", "load_cnndm": "evalkit.data", "load_gpt2_tokenizer": "evalkit.data", "load_items": "evalkit.data",
    "load_llm_judgments": "evalkit.data", "load_openai_comparisons": "evalkit.data", "load_openai_ppo_summaries": "evalkit.data",
    "load_tldr": "evalkit.data", "parse_tldr_query": "evalkit.data", "preferred_to_reference": "evalkit.data",
    "EvalkitError": "evalkit.errors",
    "Decoding": "evalkit.contract", "Policy": "evalkit.generate", "generate": "evalkit.generate",
    "import_openai": "evalkit.pipeline", "prepare_study_data": "evalkit.pipeline", "run": "evalkit.pipeline",
    "derive_seed": "evalkit.seeds",
    "analysis": "evalkit.analysis",  # evalkit.analysis.preference_rates, size_fit, position_effect, ...
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'evalkit' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    value = module if module.__name__ == f"evalkit.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
