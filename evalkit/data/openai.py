"""OpenAI's released human comparisons ("summarize from feedback") as evalkit tables.

Each JSON line is one judgment: a post (``info.post/title/subreddit``) or an article (``info.article/title/site``),
two summaries with their policy names, the labeler's ``choice`` (0 or 1) and ``extra.confidence`` on the 9-point
scale (1 = definitely the first summary, 9 = definitely the second). The first summary is taken as the one shown on
the left. The records become four tables: ``items``, ``generations`` (one row per distinct summary),
``tasks`` (one pairwise task per record) and ``judgments`` (``labeler_kind="imported"``, ``source`` = the file).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from evalkit.artifacts import SCHEMAS, conform
from evalkit.data.bundled import comparison_batch
from evalkit.data.io import iter_jsonl, require_keys
from evalkit.data.splits import check_split
from evalkit.errors import EvalkitError
from evalkit.seeds import stable_hash

log = logging.getLogger(__name__)

# size tokens in OpenAI's policy names; a name without one is the 1.3B model
OPENAI_SIZES = {"1b": 1_300_000_000, "3b": 2_700_000_000, "6b": 6_700_000_000, "12b": 12_900_000_000}
DEFAULT_OPENAI_SIZE = OPENAI_SIZES["1b"]
_SIZE_RE = re.compile(r"(?:^|_)(\d+b)(?=_|$)")
_TEMP_RE = re.compile(r"_t(\d*\.?\d+)(?=_|$)")
_TOP_P_RE = re.compile(r"_p(\d*\.?\d+)(?=_|$)")


def openai_policy_info(policy: str) -> dict[str, object]:
    """Kind, size and decoding encoded in an OpenAI policy name.

    ``sup4_6b_t0.7`` → sft, 6.7e9, T 0.7; ``sup4_6b`` → sft, T 0 (the paper's evaluation default when no decoding is
    named); ``sup4_6b_p.95`` → nucleus sampling, top-p 0.95 at T 1; ``sup4_ppo_rm4_t.7`` → ppo, 1.3e9 (no size token);
    ``pretrain_6b_t.7`` → pretrained; ``ref`` → the human reference; ``human_editor`` → external.
    """
    if policy == "ref":
        return {"policy_kind": "ref", "n_params": None, "temperature": None, "top_p": None}
    if policy.startswith("human"):
        return {"policy_kind": "external", "n_params": None, "temperature": None, "top_p": None}
    if "ppo" in policy:
        kind = "ppo"
    elif policy.startswith("sup"):
        kind = "sft"
    elif policy.startswith("pretrain"):
        kind = "pretrained"
    elif policy.startswith("lead"):
        return {"policy_kind": "lead3", "n_params": None, "temperature": None, "top_p": None}
    else:
        kind = "external"
    head = re.split(r"_(?:ppo|rm)", policy, maxsplit=1)[0]
    size = _SIZE_RE.search(head)
    n_params = OPENAI_SIZES.get(size.group(1), None) if size else DEFAULT_OPENAI_SIZE
    temperature, top_p = 0.0, None
    if m := _TOP_P_RE.search(policy):
        temperature, top_p = 1.0, float(m.group(1))
    elif m := _TEMP_RE.search(policy):
        temperature = float(m.group(1))
    return {"policy_kind": kind, "n_params": n_params, "temperature": temperature, "top_p": top_p}


def tldr_item_id(subreddit: str, title: str, post: str) -> str:
    """Content-derived id of a Reddit post, so the same post from two sources is one item."""
    return "tldr-" + stable_hash(subreddit.strip(), title.strip(), post.strip())


def cnndm_item_id(article_id: str | None, article: str) -> str:
    return "cnndm-" + (article_id.strip() if article_id else stable_hash(article.strip(), length=40))


def imported_gen_id(policy_id: str, item_id: str, text: str) -> str:
    return "gen-" + stable_hash("imported", policy_id, item_id, text)


def _item_from_info(info: dict, where: str, source: str) -> dict:
    if "article" in info:
        if not isinstance(info["article"], str):
            raise EvalkitError(f"{where}: info.article is {info['article']!r:.60}; expected a string")
        return {
            "item_id": cnndm_item_id(info.get("id"), info["article"]),
            "dataset": "cnndm",
            "subreddit": None,
            "title": info.get("title"),
            "body": info["article"],
            "source": source,
        }
    require_keys(info, ("post", "title", "subreddit"), f"{where}: info")
    for key in ("post", "title", "subreddit"):
        if not isinstance(info[key], str):
            raise EvalkitError(f"{where}: info.{key} is {info[key]!r:.60}; expected a string")
    return {
        "item_id": tldr_item_id(info["subreddit"], info["title"], info["post"]),
        "dataset": "tldr",
        "subreddit": info["subreddit"],
        "title": info["title"],
        "body": info["post"],
        "source": source,
    }


def read_openai_comparisons(path: str | Path) -> dict[str, pd.DataFrame]:
    """Parse one released comparison file (a path, or a bundled short name such as ``batch18``) into ``items``,
    ``generations``, ``tasks`` and ``judgments`` frames."""
    path = comparison_batch(str(path)) if not Path(path).is_file() else Path(path)
    source = path.name
    stem = path.stem
    items: dict[str, dict] = {}
    gens: dict[str, dict] = {}
    tasks, judgments = [], []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        require_keys(rec, ("info", "summaries", "choice"), where)
        summaries, choice = rec["summaries"], rec["choice"]
        if not isinstance(rec["info"], dict):
            raise EvalkitError(f"{where}: field 'info' should be an object")
        if not isinstance(summaries, list) or len(summaries) != 2:
            raise EvalkitError(f"{where}: field 'summaries' should hold exactly 2 summaries")
        if choice not in (0, 1):
            raise EvalkitError(f"{where}: field 'choice' is {choice!r}; expected 0 or 1")
        for s in summaries:
            if not isinstance(s, dict):
                raise EvalkitError(f"{where}: a summary is {s!r:.60}; expected an object with text and policy")
            require_keys(s, ("text", "policy"), f"{where}: summary")
            if not isinstance(s["text"], str) or not isinstance(s["policy"], str) or not s["policy"]:
                raise EvalkitError(f"{where}: summary text {s['text']!r:.40} / policy {s['policy']!r}: expected strings")
        split = rec.get("split")
        try:
            split = check_split(split) if split else None
        except EvalkitError as exc:
            raise EvalkitError(f"{where}: {exc}") from None
        if split is None:
            raise EvalkitError(f"{where}: missing field 'split'; expected train, valid1 or valid2")
        if rec.get("extra") is not None and not isinstance(rec["extra"], dict):
            raise EvalkitError(f"{where}: field 'extra' is {rec['extra']!r:.60}; expected an object")
        confidence = (rec.get("extra") or {}).get("confidence")
        if confidence is not None and (not isinstance(confidence, int) or not 1 <= confidence <= 9):
            raise EvalkitError(f"{where}: extra.confidence is {confidence!r}; expected an integer 1-9")

        item = _item_from_info(rec["info"], where, source)
        item_id = item["item_id"]
        if item_id not in items:
            items[item_id] = {**item, "split": split, "reference": None}
        gen_ids = []
        for s in summaries:
            policy = str(s["policy"])
            if policy == "ref" and items[item_id]["reference"] is None:
                items[item_id]["reference"] = s["text"].strip()
            gen_id = imported_gen_id(policy, item_id, s["text"])
            gen_ids.append(gen_id)
            if gen_id not in gens:
                info = openai_policy_info(policy)
                gens[gen_id] = {
                    "gen_id": gen_id, "item_id": item_id, "dataset": item["dataset"], "split": items[item_id]["split"],
                    "policy_id": policy, "policy_kind": info["policy_kind"], "n_params": info["n_params"],
                    "checkpoint": None, "temperature": info["temperature"], "top_p": info["top_p"], "seed": None,
                    "sample_idx": 0, "text": s["text"], "n_tokens": None, "hit_eos": None,
                }
        task_id = f"{stem}:{lineno:06d}"
        worker = str(rec.get("worker") or "unknown")
        tasks.append({
            "task_id": task_id, "study_id": f"openai:{rec.get('batch') or stem}", "kind": "pairwise", "item_id": item_id,
            "gen_id_left": gen_ids[0], "gen_id_right": gen_ids[1], "is_swapped": False, "batch": 0,
            "labeler_id": worker, "role": "main", "expected": None,
        })
        notes = [f"[{side}] {s['note'].strip()}" for side, s in zip(("left", "right"), summaries) if (s.get("note") or "").strip()]
        judgments.append({
            "judgment_id": f"j-{task_id}", "task_id": task_id, "labeler_id": worker, "labeler_kind": "imported",
            "preferred": ("left", "right")[choice], "preferred_gen_id": gen_ids[choice], "confidence": confidence,
            "overall": None, "accuracy": None, "coverage": None, "coherence": None,
            "note": "\n".join(notes) or None, "submitted_at": pd.NaT, "duration_s": None, "source": source,
        })
    return {
        "items": _frame(items.values(), "items"),
        "generations": _frame(gens.values(), "generations"),
        "tasks": _frame(tasks, "tasks"),
        "judgments": _frame(judgments, "judgments"),
    }


def _frame(rows: Iterable[dict], name: str) -> pd.DataFrame:
    return conform(pd.DataFrame(list(rows), columns=[c.name for c in SCHEMAS[name]]), name)


def merge_tables(parts: Iterable[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """Concatenate per-file tables; an item or generation seen in several files is kept once (first seen)."""
    parts = list(parts)
    out = {}
    for name, key in (("items", "item_id"), ("generations", "gen_id"), ("tasks", "task_id"), ("judgments", "judgment_id")):
        frames = [p[name] for p in parts if len(p[name])]
        df = pd.concat(frames, ignore_index=True) if frames else parts[0][name]
        if name == "items":
            # keep a reference found in any file
            refs = df.dropna(subset=["reference"]).drop_duplicates("item_id").set_index("item_id")["reference"]
            df = df.drop_duplicates(key).reset_index(drop=True)
            df["reference"] = df["item_id"].map(refs)
        else:
            dup = df[key].duplicated()
            if name in ("tasks", "judgments") and dup.any():
                raise EvalkitError(f"the same comparison file was given twice ({df.loc[dup, key].iloc[0]!r} repeats)")
            df = df.drop_duplicates(key).reset_index(drop=True)
        out[name] = df
    return out


def load_openai_comparisons(paths: Iterable[str | Path]) -> dict[str, pd.DataFrame]:
    """Read and merge several released comparison files (paths or bundled short names: batch18, batch13, ...)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return merge_tables(read_openai_comparisons(p) for p in paths)


def preferred_to_reference(tables: dict[str, pd.DataFrame], split: str | None = "valid2", baseline: str = "ref") -> pd.DataFrame:
    """Per dataset and policy compared with ``baseline`` (the human reference by default): wins (the policy's summary
    preferred) and comparisons, from tables holding tasks, judgments, generations and items.

    This is the raw count the paper reports; intervals and models live in ``evalkit.analysis``.
    """
    tasks, judgments, gens = tables["tasks"], tables["judgments"], tables["generations"]
    policy_of = gens.set_index("gen_id")["policy_id"]
    df = judgments.merge(tasks[["task_id", "gen_id_left", "gen_id_right", "item_id"]], on="task_id")
    df["left"] = df["gen_id_left"].map(policy_of)
    df["right"] = df["gen_id_right"].map(policy_of)
    df["winner"] = df["preferred_gen_id"].map(policy_of)
    df = df[(df["left"] == baseline) ^ (df["right"] == baseline)]
    items = tables["items"].set_index("item_id")
    df = df.assign(dataset=df["item_id"].map(items["dataset"]), split=df["item_id"].map(items["split"]))
    if split is not None:
        df = df[df["split"] == split]
    df = df.assign(policy_id=df["left"].where(df["right"] == baseline, df["right"]))
    df = df.assign(win=(df["winner"] == df["policy_id"]).astype(int))
    out = df.groupby(["dataset", "policy_id"], sort=True)["win"].agg(wins="sum", n="count").reset_index()
    out["rate"] = out["wins"] / out["n"]
    return out
