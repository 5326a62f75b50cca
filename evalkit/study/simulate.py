"""A simulated labeler panel for dry runs and power analysis; every judgment it makes is ``labeler_kind="simulated"``.

The model (Bradley–Terry on observable features):
  quality(s) = w · f(s), with features of a summary s of post x
    - ``support``: the fraction of s's content words that occur in x (faithfulness; invented content lowers it)
    - ``coverage``: the fraction of x's ten most frequent content words that s mentions
    - ``repetition``: 1 − distinct/total words of s
    - ``log_words``: log(1 + number of words) (length)
  P(labeler prefers the left summary) = σ(b_position + (quality(left) − quality(right)) · scale_labeler)
  with ``scale_labeler`` drawn once per simulated labeler from a log-normal (noisier and sharper labelers) and
  b_position the measured position bias. The weights and b_position are fitted by logistic regression on the real
  human comparisons bundled with evalkit (batch13, batch18, batch0_cnndm) and reported with the held-out agreement
  between the simulated labeler and the real labelers, next to the real labelers' agreement with each other.
The reported confidence on the 9-point scale follows |P − ½|: 1/9 when P is extreme, 4/6 when it is near ½.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from evalkit import artifacts
from evalkit.analysis.agreement import labeler_agreement
from evalkit.data import comparison_batch, load_openai_comparisons
from evalkit.errors import EvalkitError
from evalkit.seeds import rng_for, stable_hash

FEATURES = ("support", "coverage", "repetition", "log_words")
_WORD = re.compile(r"[a-z0-9']+")
STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being it its
this that these those i me my we our you your he him his she her they them their what which who whom whose when where why
how all any both each few more most other some such no nor not only own same so than too very can will just don should now
do does did have has had am im ive id dont didnt cant wont s t about into over after before up down out off again then
there here would could also get got""".split())


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def features(summary: str, post: str) -> dict[str, float]:
    words = _WORD.findall(summary.lower())
    content = content_words(summary)
    post_words = content_words(post)
    post_set = set(post_words)
    top = [w for w, _ in Counter(post_words).most_common(10)]
    return {
        "support": sum(w in post_set for w in content) / len(content) if content else 0.0,
        "coverage": sum(w in set(content) for w in top) / len(top) if top else 0.0,
        "repetition": 1 - len(set(words)) / len(words) if words else 0.0,
        "log_words": math.log1p(len(words)),
    }


@dataclass
class PanelModel:
    weights: dict[str, float]
    position_bias: float  # log-odds of choosing the left summary, all else equal
    labeler_scale_sd: float = 0.3  # sd of log(scale) across simulated labelers
    calibration: dict = field(default_factory=dict)

    def quality(self, feats: pd.DataFrame) -> np.ndarray:
        return sum(self.weights[f] * feats[f].to_numpy() for f in FEATURES)

    def save(self, path: str | Path) -> Path:
        return artifacts.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "PanelModel":
        return cls(**json.loads(Path(path).read_text()))


def released_pairs(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Real human comparisons as rows: features of the left and right summaries and the choice."""
    tasks, judg = tables["tasks"], tables["judgments"]
    text = tables["generations"].set_index("gen_id")["text"]
    body = tables["items"].set_index("item_id")["body"]
    df = judg.merge(tasks[["task_id", "item_id", "gen_id_left", "gen_id_right"]], on="task_id")
    rows = []
    for r in df.itertuples():
        post = body[r.item_id]
        fl, fr = features(text[r.gen_id_left], post), features(text[r.gen_id_right], post)
        rows.append({"item_id": r.item_id, "labeler_id": r.labeler_id, "left_won": int(r.preferred == "left"),
                     **{f"d_{f}": fl[f] - fr[f] for f in FEATURES}})
    return pd.DataFrame(rows)


def fit_panel(pairs: pd.DataFrame) -> PanelModel:
    """Logistic regression of 'left won' on feature differences; the intercept is the position bias."""
    import statsmodels.api as sm

    X = sm.add_constant(pairs[[f"d_{f}" for f in FEATURES]].to_numpy(), has_constant="add")
    res = sm.Logit(pairs["left_won"].to_numpy(), X).fit(disp=0)
    return PanelModel(weights={f: float(res.params[i + 1]) for i, f in enumerate(FEATURES)}, position_bias=float(res.params[0]))


def predict_left(model: PanelModel, pairs: pd.DataFrame) -> np.ndarray:
    z = model.position_bias + sum(model.weights[f] * pairs[f"d_{f}"].to_numpy() for f in FEATURES)
    return 1 / (1 + np.exp(-z))


def calibrate(batches: tuple[str, ...] = ("batch13", "batch18", "batch0_cnndm")) -> PanelModel:
    """Fit the panel on the released human labels; held-out agreement measured on items not used for the fit."""
    tables = load_openai_comparisons([comparison_batch(b) for b in batches])
    pairs = released_pairs(tables)
    held = pairs["item_id"].map(lambda i: int(stable_hash("panel-holdout", i), 16) % 5 == 0)
    model = fit_panel(pairs[~held])
    test = pairs[held]
    p = predict_left(model, test)
    sim_agree = float(np.mean((p > 0.5) == (test["left_won"] == 1)))
    sim_expected = float(np.mean(np.where(test["left_won"] == 1, p, 1 - p)))
    human = labeler_agreement(tables)
    model.calibration = {
        "batches": list(batches), "n_fit": int((~held).sum()), "n_held_out": int(held.sum()),
        "held_out_agreement_majority": sim_agree, "held_out_agreement_sampled": sim_expected,
        "human_human_agreement": human["agreement"], "n_human_pairs": human["n_pairs"],
        "left_rate": float(pairs["left_won"].mean()),
    }
    return model


# ---------------------------------------------------------------------------------------------------------- panel

def simulate_judgments(model: PanelModel, tables: dict[str, pd.DataFrame], seed: int = 0) -> pd.DataFrame:
    """Judgments for every pairwise task of a built study, each made by the simulated labeler it is assigned to."""
    tasks = tables["tasks"]
    pair_tasks = tasks[tasks["kind"] == "pairwise"]
    if pair_tasks.empty:
        raise EvalkitError("the simulated panel answers pairwise tasks only; this study has none")
    text = tables["generations"].set_index("gen_id")["text"]
    body = tables["items"].set_index("item_id")["body"]
    rows = []
    for t in pair_tasks.itertuples():
        post = body[t.item_id]
        fl, fr = features(text[t.gen_id_left], post), features(text[t.gen_id_right], post)
        scale = float(np.exp(rng_for("panel-labeler", seed, t.labeler_id).normal(0, model.labeler_scale_sd)))
        z = model.position_bias + scale * sum(model.weights[f] * (fl[f] - fr[f]) for f in FEATURES)
        p_left = 1 / (1 + math.exp(-z))
        rng = rng_for("panel-judgment", seed, t.task_id)
        left = bool(rng.random() < p_left)
        strength = abs(p_left - 0.5) * 2  # 0 … 1
        step = min(3, int(strength * 4))  # 0 … 3 steps away from the middle
        confidence = (4 - step) if left else (6 + step)
        rows.append({"judgment_id": "j-sim-" + stable_hash(t.task_id, seed), "task_id": t.task_id, "labeler_id": t.labeler_id,
                     "labeler_kind": "simulated", "preferred": "left" if left else "right",
                     "preferred_gen_id": t.gen_id_left if left else t.gen_id_right, "confidence": confidence,
                     "overall": None, "accuracy": None, "coverage": None, "coherence": None,
                     "note": f"simulated: P(left)={p_left:.3f}", "submitted_at": None, "duration_s": None,
                     "source": "simulated-panel"})
    return artifacts.conform(pd.DataFrame(rows), "judgments")


def required_judgments(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8, design_effect: float = 1.0) -> int:
    """Judgments per policy to tell preference rates p1 and p2 apart (two-sided two-proportion z-test), inflated by a
    design effect for clustering (1 + (m − 1)·ICC for m judgments per item)."""
    if not (0 < p1 < 1 and 0 < p2 < 1) or p1 == p2:
        raise EvalkitError(f"need two different rates in (0, 1), got {p1} and {p2}")
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    p_bar = (p1 + p2) / 2
    n = (z_a * math.sqrt(2 * p_bar * (1 - p_bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / (p1 - p2) ** 2
    return int(math.ceil(n * design_effect))
