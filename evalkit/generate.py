"""Checkpoints × items → the ``generations`` table.

Decoding as in the paper: greedy (T = 0) by default, or temperature / top-p sampling with a seed derived from
(policy, item, sample index), so a sample does not depend on which other items share its batch; at most 48 new
tokens; generation stops at EOS or at a token containing a newline. Post-processing (recorded in the manifest): the
text is cut at its first newline and stripped.

Baselines are policies too: ``ref`` (the human reference), ``lead3`` (the first three sentences; news), ``external``
rows from a file (the bundled OpenAI 1.3B RLHF summaries are ``openai-ppo-1.3b``).

Efficiency: items are sorted by query length and decoded in batches (left padding, KV cache, one LM-head row per
step). Policies of one lineage whose lower blocks are bit-identical (a base, its SFT and PPO that trained only their
top blocks, best-of-N's SFT) prefill those blocks once per batch (``SharedPrefix``); best-of-N prefills each query once
for its N samples and scores the N candidates from one reward-model pass over the query. Resumability: every finished batch is written atomically as a part file under ``<out>/generations.parts``;
a re-run skips the ``gen_id``s already there, so a killed run loses at most the batch in flight; the final
``generations.parquet`` is assembled (atomically) from the parts.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch.distributed as dist
from tqdm import tqdm

from evalkit import artifacts, precision as prec
from evalkit.checkpoints import read_metadata
from evalkit.contract import read_contract, same_lineage
from evalkit.data import load_openai_ppo_summaries
from evalkit.data.openai import _frame, imported_gen_id
from evalkit.data.query import DEFAULT_FORMAT, format_query
from evalkit.decoding import POSTPROCESS, Decoding, SharedPrefix, best_of_n_candidates, decode_batch, newline_token_ids, postprocess
from evalkit.distributed import init_distributed, shutdown_distributed
from evalkit.errors import EvalkitError
from evalkit.models import RewardModel, count_params, load_causal_lm, load_tokenizer
from evalkit.seeds import derive_seed, stable_hash
from evalkit.train.best_of_n import read_best_of_n
from evalkit.vocab import BASELINES, POLICY_KINDS, SAMPLING_TEMPERATURE

log = logging.getLogger(__name__)

PARTS_DIR = "generations.parts"


@dataclass(frozen=True)
class Policy:
    """A checkpoint folder with how it enters the tables."""

    policy_id: str
    checkpoint: str
    policy_kind: str = ""  # read from the checkpoint's evalkit.json when empty
    n_params: int | None = None  # read or counted when None

    @classmethod
    def from_config(cls, cfg) -> "Policy":
        """A study.toml ``[[policies]]`` entry (the folder name is the id when none is given)."""
        return cls(cfg.id or Path(cfg.checkpoint).name, cfg.checkpoint, cfg.kind, cfg.n_params or None)

    @classmethod
    def parse(cls, spec: str) -> "Policy":
        """``name=path`` or just ``path`` (the folder name becomes the id)."""
        name, _, path = spec.rpartition("=")
        path = path.strip()
        return cls(policy_id=name.strip() or Path(path).name, checkpoint=path)


def checkpoint_fingerprint(folder: str | Path) -> str:
    """What identifies a checkpoint's weights without reading them: its manifest (trainers write one, with the
    weights' hashes) or best_of_n.json, else the names and sizes of its weight files and its config."""
    folder = Path(folder)
    for name in ("manifest.json", "best_of_n.json"):
        if (folder / name).is_file():
            return stable_hash((folder / name).read_bytes().decode("utf-8", "replace"))
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("config.json"))
    return stable_hash(*[f"{f.name}:{f.stat().st_size}" for f in files])


def gen_id(policy_id: str, item_id: str, dec: Decoding, query_format: str, sample_idx: int, checkpoint: str = "") -> str:
    """A generation's identity: policy, item, decoding, query format, sample and the checkpoint's fingerprint (a
    retrained checkpoint makes new generations, never reuses old ones)."""
    return "gen-" + stable_hash(policy_id, item_id, dec.temperature, dec.top_p, dec.max_new_tokens, dec.max_query_tokens,
                                query_format, dec.seed, sample_idx, checkpoint, *([dec.dtype] if dec.dtype != "float32" else []))


# ------------------------------------------------------------------------------------------------------ baselines

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "gov", "sen", "rep", "lt", "col", "sgt", "capt",
                  "mt", "no", "vs", "inc", "co", "corp", "ltd", "u.s", "u.k", "u.n", "jan", "feb", "aug", "sept", "oct", "nov", "dec"}


def sentences(text: str) -> list[str]:
    """Split at end punctuation followed by a capitalised word, except after common abbreviations (Mr., U.S., ...)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        last_word = text[start: m.start()].rsplit(None, 1)[-1].rstrip(".").lower() if text[start: m.start()].strip() else ""
        if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
            continue
        out.append(text[start: m.start()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def lead3(article: str) -> str:
    """The first three sentences of an article (the CNN/DM lead-3 baseline), after the dateline/byline."""
    body = re.sub(r"^\s*(?:\(CNN\)\s*--?|\(CNN\)|By \. [^.]+ \. (?:PUBLISHED: \. [^.]+ \. )?(?:\| \. )?(?:UPDATED: \. [^.]+ \. )?)", "", article.strip())
    return " ".join(sentences(body)[:3])


def baseline_rows(items: pd.DataFrame, name: str) -> pd.DataFrame:
    """Generations rows for a non-model policy: ``ref``, ``lead3`` or ``openai-ppo-1.3b``."""
    if name == "openai-ppo-1.3b":
        gens = load_openai_ppo_summaries()
        out = gens[gens["item_id"].isin(items["item_id"])]
        if out.empty:
            raise EvalkitError("openai-ppo-1.3b summaries exist only for the bundled TL;DR posts; none of these items has one")
        return out.reset_index(drop=True)
    if name not in ("ref", "lead3"):
        raise EvalkitError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    rows = []
    for item in items.to_dict("records"):
        text = item["reference"] if name == "ref" else lead3(item["body"])
        if not isinstance(text, str) or not text:
            continue
        rows.append({"gen_id": imported_gen_id(name, item["item_id"], text), "item_id": item["item_id"], "dataset": item["dataset"],
                     "split": item["split"], "policy_id": name, "policy_kind": name, "n_params": None, "checkpoint": None,
                     "temperature": None, "top_p": None, "seed": None, "sample_idx": 0, "text": text, "n_tokens": None, "hit_eos": None})
    return _frame(rows, "generations")


# --------------------------------------------------------------------------------------------------------- driver

def _policy_info(policy: Policy, model) -> tuple[str, int]:
    meta = read_metadata(policy.checkpoint)
    kind = policy.policy_kind or meta.get("policy_kind") or "external"
    if kind not in POLICY_KINDS:
        raise EvalkitError(f"policy {policy.policy_id}: unknown policy_kind {kind!r}; expected one of: {', '.join(POLICY_KINDS)}")
    n_params = policy.n_params or meta.get("n_params") or count_params(model)["n_params"]
    return kind, int(n_params)


def _best_of_n(model, tok, reward_model, queries, seeds, spec: dict, dec: Decoding, contract, prefill_chunk: int,
               shared: SharedPrefix | None = None):
    """N samples per query at the spec's temperature (the one sampling loop, ``train.decoding.sample``); each is scored
    in the contract's canonical form, an unfinished one gets the contract's no-EOS score; the best is kept."""
    n, temperature = int(spec["n"]), float(spec.get("temperature", SAMPLING_TEMPERATURE))
    cand_seeds = [derive_seed("best-of-n", s, j) for s in seeds for j in range(n)]
    cands, _, best = best_of_n_candidates(model, tok, reward_model, queries, cand_seeds, n, temperature, contract, prefill_chunk, shared)
    picked = [cands[q * n + b] for q, b in enumerate(best)]
    # decode_batch's (ids, hit_eos): the kept candidate's own EOS flag
    eos = tok.eos_token_id
    return ([(ids, bool(ids) and ids[-1] == eos) for ids, _ in picked], [cand_seeds[q * n + b] for q, b in enumerate(best)], temperature)


def _read_parts(out_dir: Path) -> pd.DataFrame:
    """Every generation written so far (part files and the last table). An unreadable file — a truncated write from
    another tool, a damaged disk — is moved aside as ``*.corrupt`` with a warning, and its rows are made again."""
    parts = sorted((out_dir / PARTS_DIR).glob("part-*.parquet"))
    final = out_dir / "generations.parquet"
    frames = []
    for path in [*parts, *([final] if final.is_file() else [])]:
        try:
            frames.append(artifacts.read_table(path, "generations"))
        except EvalkitError as exc:
            aside = path.with_name(path.name + ".corrupt")
            path.replace(aside)
            log.warning("%s; moved aside to %s, its generations will be made again", exc, aside.name)
    if not frames:
        return artifacts.empty_table("generations")
    return pd.concat(frames, ignore_index=True).drop_duplicates("gen_id").reset_index(drop=True)


def generate(items: pd.DataFrame, policies: list[Policy], out_dir: str | Path, dec: Decoding = Decoding(),
             baselines: tuple[str, ...] = (), batch_size: int = 64, query_format: str | None = None,
             progress: bool = True, prefill_chunk: int = 16) -> pd.DataFrame:
    """Generate summaries of ``items`` with every policy (and add baselines); write ``generations.parquet``.

    Under ``torchrun`` each rank decodes every world-th item of the length-sorted list (on its GPU when present) and
    writes its own parts; rank 0 then merges one table, equal to a single-process run's."""
    dec = dec.check()
    if items.empty:
        raise EvalkitError("no items to summarise")
    if batch_size < 1:
        raise EvalkitError(f"batch size {batch_size} is not positive")
    out_dir = Path(out_dir)
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    d = init_distributed()
    dec = replace(dec, dtype=prec.resolve(dec.dtype, d.device, "dtype"))
    existing = _read_parts(out_dir)
    done_ids = set(existing["gen_id"])
    wanted: set[str] = set()  # this call's generations (parts from other settings stay cached but out of the table)
    formats = {}
    contracts = {}
    inputs = []
    specs = [read_best_of_n(p.checkpoint) if Path(p.checkpoint).is_dir() else None for p in policies]
    sources = [spec["policy"] if spec else p.checkpoint for p, spec in zip(policies, specs)]
    shared_prefixes = SharedPrefix.plan([s for s in sources if Path(s).is_dir()])
    last_use = {id(shared_prefixes[s]): i for i, s in enumerate(sources) if s in shared_prefixes}
    for index, (policy, best_of, source) in enumerate(zip(policies, specs, sources)):
        for sp in shared_prefixes.values():
            if last_use[id(sp)] < index:
                sp.store.clear()  # its lineage is done: free the stored prefills
        shared = shared_prefixes.get(source)
        model = load_causal_lm(source).eval().to(d.device)
        prec.cast_weights(dec.dtype, model)
        tok = load_tokenizer(source)
        kind, n_params = ("best_of_n", int(best_of.get("n_params") or count_params(model)["n_params"])) if best_of else _policy_info(policy, model)
        contract = read_contract(source, model)
        q_tokens, s_tokens = contract.require_query(dec.max_query_tokens, dec.max_new_tokens, f"policy {policy.policy_id}")
        pdec = replace(dec, max_query_tokens=q_tokens, max_new_tokens=s_tokens)
        contracts[policy.policy_id] = contract.to_dict()
        reward_model = None
        if best_of:
            reward_model = RewardModel.load(best_of["reward_model"]).eval().to(d.device)
            prec.cast_weights(dec.dtype, reward_model)
            rm_contract = read_contract(best_of["reward_model"])
            same_lineage(contract, rm_contract, f"best-of-N policy {source}", f"reward model {best_of['reward_model']}")
            contract = rm_contract  # its no-EOS score is on the RM's scale
        stop_ids = newline_token_ids(tok)
        inputs += [p for p in sorted(Path(source).glob("*.safetensors"))]
        todo = []
        fingerprint = checkpoint_fingerprint(policy.checkpoint)
        for item in items.to_dict("records"):
            fmt = query_format or DEFAULT_FORMAT[item["dataset"]]
            formats[item["dataset"]] = fmt
            for k in range(dec.n_samples):
                gid = gen_id(policy.policy_id, item["item_id"], pdec, fmt, k, fingerprint)
                wanted.add(gid)
                if gid not in done_ids:
                    todo.append((item, k, gid, fmt))
        if not todo:
            log.info("%s: every generation already written", policy.policy_id)
            continue
        encoded = [tok.encode(format_query(it, tok, pdec.max_query_tokens, fmt), add_special_tokens=False) for it, _, _, fmt in todo]
        order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))[d.rank::d.world]  # this rank's share
        bar = tqdm(total=len(order), desc=policy.policy_id, unit="item", disable=not progress or not d.main)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            seeds = [derive_seed("generate", policy.policy_id, todo[i][0]["item_id"], dec.seed, todo[i][1]) for i in chunk]
            t0 = time.perf_counter()
            queries = [encoded[i] for i in chunk]
            if best_of:
                results, seeds, temperature = _best_of_n(model, tok, reward_model, queries, seeds, best_of, pdec, contract, prefill_chunk, shared)
            else:
                results = decode_batch(model, tok, queries, pdec, seeds, stop_ids, prefill_chunk, shared=shared)
                temperature = dec.temperature
            rows = []
            for i, seed, (new_ids, hit) in zip(chunk, seeds, results):
                item, k, gid, fmt = todo[i]
                text = postprocess(tok.decode([t for t in new_ids if t != tok.eos_token_id], skip_special_tokens=True))
                rows.append({"gen_id": gid, "item_id": item["item_id"], "dataset": item["dataset"], "split": item["split"],
                             "policy_id": policy.policy_id, "policy_kind": kind, "n_params": n_params,
                             "checkpoint": str(policy.checkpoint), "temperature": temperature,
                             "top_p": dec.top_p if temperature > 0 and not best_of else None, "seed": seed if temperature > 0 else None,
                             "sample_idx": k, "text": text, "n_tokens": len(new_ids), "hit_eos": hit})
            artifacts.write_table(_frame(rows, "generations"), out_dir / PARTS_DIR / f"part-{stable_hash(*[r['gen_id'] for r in rows])}.parquet", "generations")
            bar.update(len(chunk))
            bar.set_postfix(items_per_s=f"{len(chunk) / (time.perf_counter() - t0):.1f}")
        bar.close()
    if d.enabled:
        dist.barrier()  # every rank's parts are written
    table = _read_parts(out_dir)
    table = table[table["gen_id"].isin(wanted)]
    for name in baselines:
        table = pd.concat([table, baseline_rows(items, name)], ignore_index=True).drop_duplicates("gen_id")
    table = table.sort_values(["policy_id", "item_id", "sample_idx"]).reset_index(drop=True)
    if not d.main:
        shutdown_distributed(d)
        return table
    artifacts.write_table(table, out_dir / "generations.parquet", "generations")
    config = {"stage": "generate", "policies": [p.__dict__ for p in policies], "decoding": dec.__dict__, "contracts": contracts, "baselines": list(baselines),
              "batch_size": batch_size, "query_formats": formats, "postprocess": POSTPROCESS,
              "stop": "EOS or a token containing a newline"}
    artifacts.write_manifest(out_dir, artifacts.build_manifest("generations", config, inputs=inputs,
                                                               seeds={"decoding": dec.seed}, outputs={"generations": len(table)},
                                                               extra={"world_size": d.world}))
    shutdown_distributed(d)
    return table
