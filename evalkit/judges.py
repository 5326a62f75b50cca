"""Automatic judges of pairwise comparisons, and how far each agrees with people.

A judge takes rows of (post, summary A, summary B) and returns P(A is preferred). Built in:
- ``length``: the longer summary wins (ties: 0.5) — the trivial baseline every judge must beat;
- ``features``: a Bradley–Terry model on four bag-of-words features of each summary (below), fitted on the released
  comparisons outside valid2;
- ``encoder``: the same model with one more feature, the post–summary cosine of a sentence encoder's embeddings
  (the packaged all-MiniLM-L6-v2, or ``encoder:<folder>``), fitted on the same rows;
- ``rm:<folder>``: an evalkit reward model, P(A) = σ(r(A) − r(B)) on the canonical form query + " " + text + EOS;
- ``llm:<folder>``: any Hugging Face causal LM asked a fixed, versioned prompt (post, summary A, summary B,
  "Preferred summary:"), read from the next-token probabilities of " A" and " B" (no free text to parse), both orders
  averaged so that the position cannot decide.

``validate`` scores a judge on held-out real human labels — the released batches' valid2 comparisons, which no
judge trains on — in the shape of AlpacaEval's evaluator table: agreement with each human label, per batch and
dataset; leave-one-out human agreement (on comparisons with two or more labels, predict the majority of the other
labels; the same protocol scores the humans themselves); Cohen's kappa against the bundled GPT-4 verdicts on the
pairs they cover; how often it prefers the longer summary (pairs differing by more than 30 characters); its
position bias and the agreement of its two orders; seconds per 1,000 judgments.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from evalkit.analysis.agreement import cohen_kappa
from evalkit.checkpoints import model_context
from evalkit.contract import read_contract
from evalkit.data import comparison_batch, load_llm_judgments, load_openai_comparisons
from evalkit.data.query import DEFAULT_FORMAT, format_query
from evalkit.errors import EvalkitError

VALIDATION_BATCHES = ("batch13", "batch18", "batch0_cnndm")
HELD_OUT_SPLIT = "valid2"
LONGER_BY_CHARS = 30  # a pair counts for prefers-longer when its summaries differ by more than this
PROMPT_VERSION = "tldr-pairwise-v1"
PROMPT = ("Which of the following summaries does a better job of summarizing the most important points in the given "
          "forum post, without including unimportant or irrelevant details? A good summary is both precise and "
          "concise.\n\nPost:\n{post}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\nPreferred summary:")


# ------------------------------------------------------------------------------------------- bag-of-words features

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
    """``support``: the fraction of the summary's content words that occur in the post (invented content lowers it);
    ``coverage``: the fraction of the post's ten most frequent content words it mentions; ``repetition``: 1 −
    distinct/total words; ``log_words``: log(1 + words) (length)."""
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


def fit_feature_weights(diffs: pd.DataFrame, names: tuple[str, ...] = FEATURES) -> tuple[dict[str, float], float]:
    """Logistic regression of ``left_won`` on the feature differences ``d_<feature>``: (weights, intercept), the
    intercept being the position bias in log-odds."""
    import statsmodels.api as sm  # statsmodels (with patsy) is slow to import: only where a fit is made

    X = sm.add_constant(diffs[[f"d_{f}" for f in names]].to_numpy(), has_constant="add")
    res = sm.Logit(diffs["left_won"].to_numpy(), X).fit(disp=0)
    return {f: float(res.params[i + 1]) for i, f in enumerate(names)}, float(res.params[0])


# ---------------------------------------------------------------------------------------------------- the pairs

def _judgment_rows(tables: dict[str, pd.DataFrame], split: str | None) -> pd.DataFrame:
    """Pairwise judgments with their post, the two summaries as shown (left, right), ``left_won``, dataset and split
    (only ``split``'s when given), and ``items``: each row's item as ``format_query`` reads it."""
    tasks, items = tables["tasks"], tables["items"].set_index("item_id")
    text = tables["generations"].set_index("gen_id")["text"]
    df = tables["judgments"].dropna(subset=["preferred"]).merge(tasks[["task_id", "item_id", "gen_id_left", "gen_id_right"]], on="task_id")
    df = df.assign(split=df["item_id"].map(items["split"]), dataset=df["item_id"].map(items["dataset"]), post=df["item_id"].map(items["body"]),
                   left=df["gen_id_left"].map(text), right=df["gen_id_right"].map(text), left_won=(df["preferred"] == "left").astype(int))
    if split:
        df = df[df["split"] == split]
    df["items"] = [{"dataset": ds, "body": body, "title": items.loc[i, "title"], "subreddit": items.loc[i, "subreddit"]}
                   for ds, body, i in zip(df["dataset"], df["post"], df["item_id"])]
    return df.reset_index(drop=True)


def released_comparisons(batches: tuple[str, ...] = VALIDATION_BATCHES, split: str | None = HELD_OUT_SPLIT) -> pd.DataFrame:
    """One row per released human judgment: the post, the two summaries as shown (left, right), who chose, which won,
    the batch and dataset, the split, and ``comparison`` (the post and the unordered pair of summaries)."""
    df = _judgment_rows(load_openai_comparisons([comparison_batch(b) for b in batches]), split)
    df["batch"] = df["source"].str.removesuffix(".json")
    df["comparison"] = [f"{i}|{'|'.join(sorted(p))}" for i, p in zip(df["item_id"], zip(df["gen_id_left"], df["gen_id_right"]))]
    return df[["comparison", "item_id", "dataset", "split", "batch", "labeler_id", "post", "items", "gen_id_left", "gen_id_right",
               "left", "right", "left_won"]]


def gpt4_pairs(split: str | None = HELD_OUT_SPLIT) -> pd.DataFrame:
    """The bundled GPT-4 verdicts (OpenAI's 1.3B RLHF summary vs the reference) as judgment rows, ``left_won`` GPT-4's."""
    return _judgment_rows(load_llm_judgments(), split)


# --------------------------------------------------------------------------------------------------------- judges

@dataclass
class Judge:
    """``judge_id`` names it in judgments and tables; ``labeler_kind`` is what its judgments record (never human)."""

    judge_id: str
    labeler_kind: str = "model"

    def prob_left(self, pairs: pd.DataFrame) -> np.ndarray:
        """P(the left summary is preferred) per row of ``pairs`` (columns post, items, left, right)."""
        raise NotImplementedError

    def both_orders(self, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """P(left preferred) as shown and P(left preferred) with the two summaries swapped (as P of the same summary)."""
        shown = self.prob_left(pairs)
        swapped = 1 - self.prob_left(pairs.rename(columns={"left": "right", "right": "left"}))
        return shown, swapped


class LengthJudge(Judge):
    def __init__(self):
        super().__init__("length", "model")

    def prob_left(self, pairs: pd.DataFrame) -> np.ndarray:
        diff = pairs["left"].str.len().to_numpy() - pairs["right"].str.len().to_numpy()
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))


class FeaturesJudge(Judge):
    """The bag-of-words feature model, fitted on the released comparisons outside the held-out split; its intercept
    (the labelers' position bias) is kept as ``position_bias`` and left out of the judge's own choice."""

    names: tuple[str, ...] = FEATURES

    def __init__(self, batches: tuple[str, ...] = VALIDATION_BATCHES, judge_id: str = "features"):
        super().__init__(judge_id, "model")
        every = released_comparisons(batches, split=None)
        held = set(every.loc[every["split"] == HELD_OUT_SPLIT, "item_id"])
        fit_rows = every[~every["item_id"].isin(held)]
        self.trained_on = set(fit_rows["item_id"])
        self.weights, self.position_bias = fit_feature_weights(self.diffs(fit_rows), self.names)

    def diffs(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """``d_<feature>``: left minus right, per row (and ``left_won`` where the rows have it)."""
        return _feature_diffs(pairs)

    def prob_left(self, pairs: pd.DataFrame) -> np.ndarray:
        diffs = self.diffs(pairs)
        z = sum(self.weights[f] * diffs[f"d_{f}"].to_numpy() for f in self.names)
        return 1 / (1 + np.exp(-z))


class EncoderJudge(FeaturesJudge):
    """The feature model plus one meaning feature: ``similarity``, the cosine between the post's and the summary's
    sentence embeddings (all-MiniLM-L6-v2 by default: mean-pooled, normalised, each text cut to the encoder's
    ``max_seq_length``), fitted the same way on the same rows. Each text is embedded once per machine (the
    encoder's store)."""

    names = (*FEATURES, "similarity")

    def __init__(self, folder: str | Path | None = None, batch_size: int = 32):
        from evalkit.models import SentenceEncoder  # torch and the encoder: loaded when this judge is asked for

        self.encoder = SentenceEncoder(folder, _device(), batch_size)
        super().__init__(judge_id=f"encoder:{folder}" if folder else "encoder")

    def embed(self, texts) -> np.ndarray:
        vectors = self.encoder.encode(list(texts))
        return np.stack([vectors[t] for t in texts]) if len(texts) else np.zeros((0, 1))

    def diffs(self, pairs: pd.DataFrame) -> pd.DataFrame:
        out = _feature_diffs(pairs)
        post, left, right = (self.embed(list(pairs[c])) for c in ("post", "left", "right"))
        out["d_similarity"] = (post * left).sum(1) - (post * right).sum(1) if len(pairs) else []
        return out


def _feature_diffs(pairs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for post, left, right in zip(pairs["post"], pairs["left"], pairs["right"]):
        fl, fr = features(left, post), features(right, post)
        rows.append({f"d_{f}": fl[f] - fr[f] for f in FEATURES})
    out = pd.DataFrame(rows, index=pairs.index)
    if "left_won" in pairs:
        out["left_won"] = pairs["left_won"].to_numpy()
    return out


class RewardModelJudge(Judge):
    """An evalkit reward model: each summary scored in its lineage's canonical form, the query run once per pair."""

    def __init__(self, folder: str | Path):
        from evalkit import decoding, precision  # torch: loaded when a model judge is asked for
        from evalkit.models import RewardModel, load_tokenizer

        super().__init__(f"rm:{folder}", "model")
        self._decoding, self._precision = decoding, precision
        self.device = _device()
        self.rm, self.tok, self.contract = RewardModel.load(folder).eval().to(self.device), load_tokenizer(folder), read_contract(folder)

    def prob_left(self, pairs: pd.DataFrame) -> np.ndarray:
        queries = [self._decoding.encode_query(self.tok, it, self.contract.max_query_tokens) for it in pairs["items"]]
        texts = [t for pair in zip(pairs["left"], pairs["right"]) for t in pair]
        with self._precision.weights_as(self._precision.resolve("auto", self.device), self.rm):  # bf16 where the device has the units
            scores = self._decoding.score_candidates(self.rm, self.tok, queries, texts, 2, self.contract, self.device).numpy().reshape(-1, 2)
        return 1 / (1 + np.exp(-(scores[:, 0] - scores[:, 1])))

    def both_orders(self, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        p = self.prob_left(pairs)  # a reward model scores each summary alone: the order cannot matter
        return p, p


class LanguageModelJudge(Judge):
    """A causal LM asked ``PROMPT``; P(A) from its next-token probabilities of " A" and " B", both orders averaged."""

    def __init__(self, folder: str | Path, max_post_tokens: int = 384):
        import torch

        from evalkit import precision
        from evalkit.models import load_causal_lm, load_tokenizer

        super().__init__(f"llm:{folder}@{PROMPT_VERSION}", "llm")
        self._torch, self._precision, self.device = torch, precision, _device()
        self.model, self.tok, self.max_post_tokens = load_causal_lm(folder).eval().to(self.device), load_tokenizer(folder), max_post_tokens
        self.choices = [self.tok.encode(c, add_special_tokens=False)[0] for c in (" A", " B")]
        self.context = model_context(self.model.config)

    def prob_left(self, pairs: pd.DataFrame) -> np.ndarray:
        torch = self._torch
        out = np.zeros(len(pairs))
        with torch.no_grad(), self._precision.weights_as(self._precision.resolve("auto", self.device), self.model):  # cast once
            for i, (item, left, right) in enumerate(zip(pairs["items"], pairs["left"], pairs["right"])):
                ids = self._prompt_ids(item, left.strip(), right.strip())
                logits = self.model(input_ids=torch.tensor([ids], device=self.device), logits_to_keep=1).logits[0, -1].float()
                a, b = logits[self.choices]
                out[i] = float(torch.sigmoid(a - b))
        return out


    def _prompt_ids(self, item: dict, a: str, b: str) -> list[int]:
        """The prompt's token ids, the post truncated (at a newline, as queries are) to fit the model's context."""
        overhead = len(self.tok.encode(PROMPT.format(post="", a=a, b=b), add_special_tokens=False))
        budget = min(self.max_post_tokens, self.context - overhead - 1)
        try:
            post = format_query(item, self.tok, max(16, budget), DEFAULT_FORMAT[item["dataset"]]).rsplit("\n\nTL;DR:", 1)[0]
        except EvalkitError:  # a context too short for even the post's title: the summaries alone are judged
            post = ""
        ids = self.tok.encode(PROMPT.format(post=post, a=a, b=b), add_special_tokens=False)
        return ids[-(self.context - 1):]  # summaries too long for the context keep the question at the end


def _device():
    """CUDA when present, else the CPU (model judges only; torch is loaded by then)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def judge_probabilities(judge: Judge, pairs: pd.DataFrame) -> np.ndarray:
    """P(left preferred) per row with the two orders averaged (a reward model's are one and the same)."""
    shown, swapped = judge.both_orders(pairs)
    return (shown + swapped) / 2


def make_judge(spec: str) -> Judge:
    """``length``, ``features``, ``encoder`` (or ``encoder:<folder>``), ``rm:<folder>`` or ``llm:<folder>``."""
    kind, _, folder = spec.partition(":")
    if spec == "length":
        return LengthJudge()
    if spec == "features":
        return FeaturesJudge()
    if spec == "encoder":
        return EncoderJudge()
    if kind in ("rm", "llm", "encoder") and folder:
        if not Path(folder).is_dir():
            raise EvalkitError(f"judge {spec!r}: no checkpoint folder at {folder}")
        return {"rm": RewardModelJudge, "llm": LanguageModelJudge, "encoder": EncoderJudge}[kind](folder)
    raise EvalkitError(f"unknown judge {spec!r}; expected length, features, encoder, encoder:<folder>, rm:<folder> or llm:<folder>")


# ------------------------------------------------------------------------------------------------------ validation

def leave_one_out(comparisons: pd.Series, left_won: pd.Series, predicted: np.ndarray | None = None) -> tuple[float, int]:
    """AlpacaEval's human agreement: on each comparison with two or more labels, each label is left out in turn and
    the majority of the others is the target (a tie among them: that label is skipped). ``predicted`` None scores the
    left-out human; otherwise the judge's choice for that row. Returns (agreement, targets scored)."""
    hits = n = 0
    df = pd.DataFrame({"c": comparisons.to_numpy(), "y": left_won.to_numpy(),
                       "p": left_won.to_numpy() if predicted is None else np.asarray(predicted)})
    for _, g in df.groupby("c"):
        if len(g) < 2:
            continue
        ys, ps = g["y"].to_numpy(), g["p"].to_numpy()
        for i in range(len(g)):
            others = np.delete(ys, i)
            if 2 * others.sum() == len(others):
                continue
            target = int(2 * others.sum() > len(others))
            hits += 0.5 if ps[i] == 0.5 else float(ps[i] == target)
            n += 1
    return (hits / n if n else math.nan), n


def pair_agreement(comparisons, labels) -> tuple[float, int]:
    """Labeler–labeler agreement over every two labels of one comparison (pair-weighted, as the paper's figure): the
    labels ``labels`` (1/0 in one orientation per comparison). Returns (agreement, pairs)."""
    df = pd.DataFrame({"c": np.asarray(comparisons), "y": np.asarray(labels, dtype=float)})
    g = df.groupby("c")["y"].agg(["sum", "count"])
    pairs = g["count"] * (g["count"] - 1) / 2
    agree = g["sum"] * (g["sum"] - 1) / 2 + (g["count"] - g["sum"]) * (g["count"] - g["sum"] - 1) / 2
    total = float(pairs.sum())
    return (float(agree.sum()) / total if total else math.nan), int(total)


def orient(df: pd.DataFrame) -> pd.DataFrame:
    """Each comparison's labels in one orientation (the summary whose id sorts first as ``left``), so that labels of
    one pair shown in different orders are comparable."""
    flip = df["gen_id_left"] > df["gen_id_right"]
    out = df.copy()
    out.loc[flip, ["left", "right"]] = df.loc[flip, ["right", "left"]].to_numpy()
    out.loc[flip, ["gen_id_left", "gen_id_right"]] = df.loc[flip, ["gen_id_right", "gen_id_left"]].to_numpy()
    for col in ("left_won", *(c for c in df if c.startswith("sim_"))):  # 1/0 choices of the left summary flip with it
        out.loc[flip, col] = 1 - df.loc[flip, col]
    return out


def prefers_longer_rate(left: pd.Series, right: pd.Series, chose_left: np.ndarray) -> float:
    """How often the longer summary is chosen, on pairs whose lengths differ by more than ``LONGER_BY_CHARS`` (a
    choice of ½, a tie, is left out)."""
    length = left.str.len().to_numpy() - right.str.len().to_numpy()
    chose_left = np.asarray(chose_left, dtype=float)
    decided = (np.abs(length) > LONGER_BY_CHARS) & (chose_left != 0.5)
    return float(np.mean((chose_left[decided] == 1) == (length[decided] > 0))) if decided.any() else math.nan


def evaluate(judge: Judge | None, pairs: pd.DataFrame, gpt4: pd.DataFrame | None = None) -> dict:
    """One evaluator-table row: ``judge`` None is the human row (each label against the other labels)."""
    df = orient(pairs)
    row: dict = {"judge": "human" if judge is None else judge.judge_id, "n_judgments": len(df),
                 "n_comparisons": int(df["comparison"].nunique())}
    if judge is None:
        row["position_bias"] = float(pairs["left_won"].mean())  # as shown: P(the first-shown summary wins)
        row["prefers_longer"] = prefers_longer_rate(df["left"], df["right"], df["left_won"].to_numpy())
        row["human_agreement"], row["n_loo"] = leave_one_out(df["comparison"], df["left_won"])
        for key, g in [*df.groupby("batch"), *df.groupby("dataset")]:
            row[f"loo_{key}"] = leave_one_out(g["comparison"], g["left_won"])[0]
        for key, g in df.groupby("dataset"):
            row[f"pair_agreement_{key}"], row[f"n_pairs_{key}"] = pair_agreement(g["comparison"], g["left_won"])
        return row
    unique = df.drop_duplicates("comparison")
    t0 = time.perf_counter()
    shown, swapped = judge.both_orders(unique)
    row["seconds_per_1000"] = (time.perf_counter() - t0) / max(1, 2 * len(unique)) * 1000
    p = (shown + swapped) / 2
    choice = pd.Series(np.where(p == 0.5, 0.5, (p > 0.5).astype(float)), index=unique["comparison"].to_numpy())
    chosen = df["comparison"].map(choice).to_numpy()
    credit = np.where(chosen == 0.5, 0.5, (chosen == df["left_won"].to_numpy()).astype(float))  # a tie scores half
    row["agreement_with_labels"] = float(credit.mean())
    row["human_agreement"], row["n_loo"] = leave_one_out(df["comparison"], df["left_won"], chosen)
    for key, g in [*df.groupby("batch"), *df.groupby("dataset")]:
        at = df.index.get_indexer(g.index)
        row[f"loo_{key}"] = leave_one_out(g["comparison"], g["left_won"], chosen[at])[0]
        row[f"labels_{key}"] = float(credit[at].mean())
    row["prefers_longer"] = prefers_longer_rate(unique["left"], unique["right"], np.where(p == 0.5, 0.5, (p > 0.5).astype(float)))
    row["position_bias"] = float(np.mean((shown + (1 - swapped)) / 2))  # P(the first-shown summary wins), 0.5 = none
    row["order_agreement"] = float(np.mean((shown > 0.5) == (swapped > 0.5)))
    if gpt4 is not None and len(gpt4):
        s2, w2 = judge.both_orders(gpt4)
        mine = ((s2 + w2) / 2 > 0.5).astype(int)
        k = cohen_kappa(mine, gpt4["left_won"].to_numpy(), clusters=gpt4["item_id"].to_numpy(), n_boot=500, rng=np.random.default_rng(0))
        row["kappa_gpt4"], row["kappa_gpt4_low"], row["kappa_gpt4_high"], row["n_gpt4"] = k["kappa"], k["ci_low"], k["ci_high"], len(gpt4)
    return row


COLUMNS_FIRST = ("judge", "human_agreement", "loo_batch13", "loo_batch18", "loo_batch0_cnndm", "agreement_with_labels", "prefers_longer",
                 "pair_agreement_tldr", "pair_agreement_cnndm", "position_bias", "order_agreement",
                 "kappa_gpt4", "kappa_gpt4_low", "kappa_gpt4_high", "n_gpt4", "seconds_per_1000", "n_judgments", "n_comparisons")


def evaluator_table(judges: list[Judge], max_comparisons: int = 0, seed: int = 0, extra_rows=()) -> pd.DataFrame:
    """The human row, then each judge's, on the held-out released comparisons (a seeded subset of ``max_comparisons``
    comparisons when set: every label of each kept comparison stays); ``extra_rows``: callables (pairs, gpt4) → a row
    each (the simulated panels' rows, made by ``evalkit.study.simulate``)."""
    pairs = released_comparisons()
    gpt4 = gpt4_pairs()
    if max_comparisons:
        keep = pd.Series(pairs["comparison"].unique()).sample(frac=1, random_state=seed).head(max_comparisons)
        pairs = pairs[pairs["comparison"].isin(set(keep))]
        gpt4 = gpt4.sample(frac=1, random_state=seed).head(max_comparisons)
    table = pd.DataFrame([evaluate(None, pairs)] + [evaluate(j, pairs, gpt4) for j in judges] + [row(pairs, gpt4) for row in extra_rows])
    first = [c for c in COLUMNS_FIRST if c in table]
    return table[first + sorted(c for c in table if c not in first)]


def evaluator_markdown(table: pd.DataFrame, max_comparisons: int = 0) -> str:
    """The evaluator table as a page: what each column means, then the rows (values not measured are "—")."""
    cols = [c for c in COLUMNS_FIRST if c in table]
    def cell(v, col=""):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "—"
        if col.startswith("n_"):  # counts, even in a column a missing value made float
            return str(int(v))
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["# Judges against real human labels", "",
             f"Held-out comparisons: the released batches' {HELD_OUT_SPLIT} judgments ({', '.join(VALIDATION_BATCHES)})"
             + (f", a seeded subset of {max_comparisons} comparisons" if max_comparisons else "") + "; no judge trains on them.",
             "`human_agreement`: leave one label out on comparisons with two or more labels and predict the majority of "
             "the others (ties among them skipped; a judge's tie scores half); the human row scores the left-out label "
             "by the same protocol. `agreement_with_labels`: agreement with every single human label. `prefers_longer`: "
             f"on pairs whose summaries differ by more than {LONGER_BY_CHARS} characters. `position_bias`: P(the first "
             "shown summary wins) over both orders (0.5 = none). `order_agreement`: the same choice in both orders. "
             "`kappa_gpt4`: Cohen's kappa against the bundled GPT-4 verdicts (OpenAI's 1.3B RLHF vs the reference), "
             "post-clustered 95% interval. `loo_<batch>`: `human_agreement` on one batch. `pair_agreement_<dataset>`: "
             "labeler–labeler agreement over every two labels of one comparison (humans: the released labels; a "
             "simulated panel: two of its labelers on each comparison). A `panel:` row is the simulated panel on that "
             "judge: each human label is replaced by one simulated labeler's, so its `human_agreement` is scored as the "
             "human row's is. Other per-batch and per-dataset columns (`labels_*`) are in evaluators.csv.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c], c) for c in cols) + " |" for r in table.to_dict("records")]
    return "\n".join(lines) + "\n"
