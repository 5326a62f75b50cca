"""Decoding and scoring: the one batched sampler and the one reward-model scorer, below both the trainers and
``evalkit generate``.

- queries and summaries as token ids in the contract's canonical form (``encode_query``, ``encode_summary``);
- ``decode_batch``: prefill in chunks of similar length, then one static KV cache for the whole decode batch; greedy
  or temperature / top-p sampling, each row from its own seeded generator (a sample does not depend on its
  batch-mates); rows stop at EOS or at a token containing a newline (the contract's stop rule);
- ``SharedPrefix``: policies of one lineage whose lower blocks are bit-identical (a base, its SFT and PPO that
  trained only their top blocks, best-of-N's SFT) prefill those blocks once;
- ``score_summaries`` / ``score_candidates``: reward-model scores in the canonical form query + " " + text + EOS,
  a query shared by N candidates run once; ``best_of_n_candidates``: N samples per query and the kept one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import DynamicCache, StaticCache

from evalkit.contract import Decoding
from evalkit.data.query import format_query, format_summary
from evalkit.errors import EvalkitError
from evalkit.models import position_ids, raw_bytes, top_blocks

# how a completion's text is made from its tokens (recorded in generations' manifest)
POSTPROCESS = "cut at the first newline, then strip whitespace"


def iterate(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i: i + size]


def by_length(lengths: list[int], size: int) -> Iterator[list[int]]:
    """Index batches in order of length, so that each padded batch wastes little compute on padding."""
    yield from iterate(sorted(range(len(lengths)), key=lambda i: lengths[i]), size)


def encode_query(tok, item: dict, max_query_tokens: int) -> list[int]:
    """The item's query (REFERENCE.md format, truncated to fit) as token ids."""
    return list(tok.encode(format_query(item, tok, max_tokens=max_query_tokens), add_special_tokens=False))


def encode_summary(tok, text: str, max_summary_tokens: int, add_eos: bool = True) -> list[int]:
    """' ' + summary, at most ``max_summary_tokens`` tokens, then EOS."""
    ids = list(tok.encode(format_summary(text), add_special_tokens=False))[:max_summary_tokens]
    return ids + [tok.eos_token_id] if add_eos else ids




def postprocess(text: str) -> str:
    return text.split("\n", 1)[0].strip()




def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a rectangle; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask




# ------------------------------------------------------------------------------------------------------- decoding

def newline_token_ids(tok) -> torch.Tensor:
    """Ids of every token whose text contains a newline (generation stops after one). Decoding the whole vocabulary
    takes seconds for a 262k-word one (Gemma), and every checkpoint of a lineage loads its own tokenizer object, so
    the answer is kept per vocabulary (its contents), not per object."""
    key = (type(tok).__name__, len(tok), hash(frozenset(tok.get_vocab().items())))
    if key not in _NEWLINE_IDS:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        _NEWLINE_IDS[key] = torch.tensor([i for i, text in enumerate(texts) if "\n" in text], dtype=torch.long)
    return _NEWLINE_IDS[key]


_NEWLINE_IDS: dict[tuple, torch.Tensor] = {}


def _pick(logits: torch.Tensor, dec: Decoding, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Greedy, or one draw per row from its own generator by inverse CDF: a uniform per row, one cumulative sum and
    one search for the whole batch (``torch.multinomial`` row by row took most of a 256-row step over Gemma's
    262,144-word vocabulary)."""
    if dec.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / dec.temperature, dim=-1)
    if dec.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < dec.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]) * cdf[:, -1]
    # the first token whose cumulative probability exceeds u: never one of probability 0
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _left_pad(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def layer_digests(folder: str | Path) -> list[str] | None:
    """Digests of a checkpoint's input embeddings, then of each transformer block, read from its safetensors files
    (no model is built): equal prefixes mean bit-identical lower blocks. None for a model with learned absolute
    positions (GPT-2's ``wpe`` enters after the embedding, so its lower blocks cannot be shared this way)."""
    files = [f for f in sorted(Path(folder).glob("*.safetensors")) if f.name != "reward_head.safetensors"]
    if not files:
        return None
    groups: dict[int, list[tuple[str, bytes]]] = {}
    try:
        for path in files:
            with safe_open(str(path), "pt") as fh:
                for name in fh.keys():
                    if "wpe" in name:
                        return None
                    m = _LAYER_INDEX.search(name)
                    if m is None and "embed" not in name and "wte" not in name:
                        continue  # the final norm and the head come after the blocks
                    groups.setdefault(int(m.group(1)) if m else -1, []).append((name, raw_bytes(fh.get_tensor(name))))
    except Exception:  # noqa: BLE001 — an unreadable checkpoint shares nothing; loading it says what is wrong, in one line
        return None
    if -1 not in groups:
        return None
    return [hashlib.sha256(b"".join(n.encode() + b for n, b in sorted(groups[i]))).hexdigest() for i in sorted(groups)]


class SharedPrefix:
    """The lower blocks that the policies of one lineage share, bit-identical: SFT and PPO that trained only their top
    blocks, best-of-N's SFT, and the base they started from. The first policy's prefill keeps, per chunk of queries,
    the KV cache of blocks below ``depth`` and the hidden state entering block ``depth``; the others run only their
    own blocks from ``depth`` up (then the final norm and the LM head) on it. The same numbers as each policy's own
    full prefill, for a fraction of its cost."""

    def __init__(self, depth: int):
        self.depth, self.store = depth, {}

    @classmethod
    def plan(cls, sources: list[str]) -> dict[str, "SharedPrefix"]:
        """One ``SharedPrefix`` per group of sources whose embeddings and first block agree, at the depth all of
        them share (at least one block below the top runs per policy); sources alone in their group get none."""
        digests = {s: layer_digests(s) for s in dict.fromkeys(sources)}
        groups: dict[tuple[str, str], list[str]] = {}
        for s, dg in digests.items():
            if dg and len(dg) > 2:
                groups.setdefault((dg[0], dg[1]), []).append(s)
        out = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            first = digests[members[0]]
            depth = min(next((i for i, (a, b) in enumerate(zip(first, digests[m])) if a != b), len(first)) for m in members[1:])
            depth = min(depth, len(first) - 1) - 1  # digest 0 is the embeddings; keep at least one block to run
            if depth >= 1:
                shared = cls(depth)
                out.update({m: shared for m in members})
        return out

    def run(self, model, ids: torch.Tensor, mask: torch.Tensor):
        """The model's prefill output for one chunk (``cache``, ``logits``), from the shared blocks when stored."""
        key = (tuple(ids.flatten().tolist()), tuple(ids.shape))
        pos = position_ids(mask)
        if key not in self.store:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, output_hidden_states=True)
            self.store[key] = (list(out.cache.layers[: self.depth]), out.hidden_states[self.depth])
            return out
        lower, hidden = self.store[key]
        cache = DynamicCache(config=model.config)  # every block's slot, made before the stack is cut to the top ones
        with top_blocks(model, model.config.num_hidden_layers - self.depth):
            out = model(inputs_embeds=hidden, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        out.cache.layers[: self.depth] = lower
        return out


@torch.no_grad()
def _prefill(model, queries: list[list[int]], pad: int, chunk: int, max_new_tokens: int, repeats: int = 1,
             shared: SharedPrefix | None = None):
    """Run the prompts in chunks of similar length (little padding), then merge their KV caches, left-padded to
    one width, into a preallocated (static) cache for a single decode batch: decoding then writes one position per
    step instead of copying the whole cache. With ``repeats`` > 1 each prompt is run once and its cache copied into
    that many consecutive rows (N samples of one query: best-of-N). With ``shared``, the lower blocks a lineage shares
    run once per chunk for all its policies. Returns (cache, attention mask, next positions, last logits)."""
    caches, masks, logits = [], [], []
    device = next(model.parameters()).device
    for start in range(0, len(queries), chunk):
        ids, mask = (t.to(device) for t in pad_batch(queries[start: start + chunk], pad, side="left"))
        if shared is not None:
            out = shared.run(model, ids, mask)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
        caches.append(out.cache)
        masks.append(mask)
        logits.append(out.logits[:, -1])
    next_pos = torch.tensor([[len(q)] for q in queries], device=device).repeat_interleave(repeats, 0)
    width = max(m.shape[1] for m in masks)
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    for layer, layer_parts in zip(cache.layers, zip(*(c.layers for c in caches))):
        layer.update(torch.cat([_left_pad(part.keys, width, 2) for part in layer_parts]).repeat_interleave(repeats, 0),
                     torch.cat([_left_pad(part.values, width, 2) for part in layer_parts]).repeat_interleave(repeats, 0))
    mask = torch.cat([_left_pad(m, width, 1) for m in masks]).repeat_interleave(repeats, 0)
    return cache, mask, next_pos, torch.cat(logits).repeat_interleave(repeats, 0)


@torch.no_grad()
def decode_batch(model, tok, queries: list[list[int]], dec: Decoding, seeds: list[int] | None = None,
                 stop_ids: torch.Tensor | None = None, prefill_chunk: int = 16, repeats: int = 1,
                 shared: SharedPrefix | None = None) -> list[tuple[list[int], bool]]:
    """Decode one batch with a KV cache: (new token ids, hit EOS) per query; rows stop at EOS or a newline token.

    Prompts are prefilled in chunks of ``prefill_chunk`` (pass them sorted by length to keep padding small) and
    decoded together, so a large decode batch does not pay for padding every prompt to the longest one. With
    ``repeats`` = N every query is prefilled once and decoded N times (``seeds``: one per row, query-major); the
    result has N rows per query in that order.
    """
    if dec.max_new_tokens is None:
        raise EvalkitError("decode_batch needs a concrete max_new_tokens (the checkpoint contract's max_summary_tokens)")
    pad = tok.pad_token_id
    generators = [torch.Generator().manual_seed(s) for s in seeds] if dec.temperature > 0 else None
    past, mask, next_pos, logits = _prefill(model, queries, pad, prefill_chunk, dec.max_new_tokens, repeats, shared)
    device = mask.device
    rows = len(queries) * repeats
    active = list(range(rows))  # the output row of each row still in the decode batch
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    hit_eos = [False] * rows
    produced: list[list[int]] = [[] for _ in range(rows)]
    stop_ids = (stop_ids if stop_ids is not None else torch.tensor([], dtype=torch.long)).to(device)
    for _ in range(dec.max_new_tokens):
        # sampling draws from each row's own CPU generator, so a sample does not depend on the device or its batch-mates
        token = _pick(logits.float().cpu(), dec, generators).to(device)
        token_list, was_done = token.tolist(), done.tolist()
        is_eos = token == tok.eos_token_id
        for row, (i, finished) in enumerate(zip(active, was_done)):
            if not finished:
                produced[i].append(token_list[row])
                hit_eos[i] = token_list[row] == tok.eos_token_id
        done |= is_eos | torch.isin(token, stop_ids)
        if bool(done.all()):
            break
        if int(done.sum()) * 4 >= len(active):  # finished rows leave the batch (when a quarter of it is done)
            keep = ~done
            for layer in past.layers:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            kept = keep.tolist()
            active = [i for i, k in zip(active, kept) if k]
            generators = [g for g, k in zip(generators, kept) if k] if generators is not None else None
            mask, next_pos, token, done = mask[keep], next_pos[keep], token[keep], done[keep]
        token = token.masked_fill(done, pad)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, cache=past, use_cache=True)
        past, logits = out.cache, out.logits[:, -1]
        next_pos = next_pos + 1
    return [(p, bool(h)) for p, h in zip(produced, hit_eos)]




# ------------------------------------------------------------------------------------------- sampling and scoring

def finished(ids: list[int], hit_eos: bool, stop_ids: set[int]) -> bool:
    """Whether a completion stopped by the contract's rule (EOS or a newline token) rather than running out."""
    return hit_eos or bool(ids and ids[-1] in stop_ids)


def response_text(tok, ids: list[int]) -> str:
    """A completion's summary text: special tokens dropped, cut at the first newline, stripped (the contract's rule)."""
    return postprocess(tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True))


@torch.no_grad()
def score_summaries(reward_model, tok, queries: list[list[int]], texts: list[str], contract, device=torch.device("cpu"),
                    batch_size: int = 16) -> torch.Tensor:
    """Reward-model scores of summaries in the contract's canonical form: query + " " + text + EOS.

    Every scorer (RM training and evaluation, PPO, best-of-N, held-out quality) goes through this form, so the RM
    never sees a newline token or a multi-line completion it was not trained on."""
    seqs = [q + encode_summary(tok, t, contract.max_summary_tokens) for q, t in zip(queries, texts)]
    out = torch.zeros(len(seqs))
    for chunk in by_length([len(s) for s in seqs], batch_size):
        ids, mask = pad_batch([seqs[i] for i in chunk], tok.pad_token_id)
        out[chunk] = reward_model(ids.to(device), mask.to(device)).float().cpu()
    return out


@torch.no_grad()
def score_candidates(reward_model, tok, queries: list[list[int]], texts: list[str], n: int, contract,
                     device=torch.device("cpu"), batch_size: int = 8) -> torch.Tensor:
    """The same scores as :func:`score_summaries` for ``n`` candidate summaries per query (``texts`` query-major),
    with each query run through the reward model once (:func:`prefix_scores`). For best-of-N the query is ~90% of
    every scored sequence."""
    summaries = [encode_summary(tok, t, contract.max_summary_tokens) for t in texts]
    return prefix_scores(reward_model, queries, summaries, n, tok.pad_token_id, device, batch_size)


@torch.no_grad()
def prefix_scores(reward_model, prefixes: list[list[int]], suffixes: list[list[int]], n: int, pad_id: int,
                  device=torch.device("cpu"), batch_size: int = 8) -> torch.Tensor:
    """Reward-model scores of ``prefix + suffix`` for ``n`` non-empty suffixes per prefix (query-major): each prefix
    runs once, its KV cache is copied to its ``n`` rows, which then run only their suffix tokens. The score is read
    at each suffix's last token, as the reward model reads a whole sequence's."""
    out = torch.zeros(len(suffixes))
    for chunk in by_length([len(q) for q in prefixes], batch_size):
        q_ids, q_mask = (t.to(device) for t in pad_batch([prefixes[i] for i in chunk], pad_id, side="left"))
        cache = reward_model.backbone(input_ids=q_ids, attention_mask=q_mask, position_ids=position_ids(q_mask), use_cache=True).cache
        cache.batch_repeat_interleave(n)
        rows = [i * n + k for i in chunk for k in range(n)]
        s_ids, s_mask = (t.to(device) for t in pad_batch([suffixes[r] for r in rows], pad_id))
        mask = torch.cat([q_mask.repeat_interleave(n, 0), s_mask], 1)
        start = q_mask.sum(1).repeat_interleave(n)[:, None]
        hidden = reward_model.backbone(input_ids=s_ids, attention_mask=mask, position_ids=start + torch.arange(s_ids.shape[1], device=device),
                                       cache=cache, use_cache=True).last_hidden_state
        out[rows] = reward_model.head_scores(hidden[torch.arange(len(rows), device=device), s_mask.sum(1) - 1]).cpu()
    return out


def shared_prefix(a: list[int], b: list[int]) -> int:
    """The length of the common start of two token sequences, leaving each at least its last token."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(a) - 1, len(b) - 1)


def best_index(scores: torch.Tensor, is_finished: list[bool], no_eos_score: float) -> int:
    """Best-of-N's pick: the highest score under the contract (an unfinished candidate scores ``no_eos_score``), ties
    (e.g. every candidate unfinished) broken by the reward model's own score."""
    keys = [(float(s) if fin else no_eos_score, float(s)) for s, fin in zip(scores, is_finished)]
    return max(range(len(keys)), key=lambda i: keys[i])


def best_of_n_candidates(model, tok, reward_model, queries: list[list[int]], seeds: list[int], n: int, temperature: float,
                         contract, prefill_chunk: int = 16, shared=None) -> tuple[list[tuple[list[int], bool]], torch.Tensor, list[int]]:
    """N samples per query (``seeds``: one per candidate, query-major), their RM scores in the canonical form and the
    index of each query's kept candidate (``best_index``). Returns (candidates as (ids, finished), raw scores, best)."""
    cands = sample(model, tok, queries, contract, temperature, seeds, batch_size=len(queries), prefill_chunk=prefill_chunk, repeats=n,
                   shared=shared)
    device = next(reward_model.parameters()).device
    raw = score_candidates(reward_model, tok, queries, [response_text(tok, ids) for ids, _ in cands], n, contract, device)
    best = [best_index(raw[q * n: (q + 1) * n], [fin for _, fin in cands[q * n: (q + 1) * n]], contract.no_eos_score)
            for q in range(len(queries))]
    return cands, raw, best


def sample(model, tok, queries: list[list[int]], contract, temperature: float, seeds: list[int], batch_size: int = 32,
           prefill_chunk: int = 16, repeats: int = 1, shared=None) -> list[tuple[list[int], bool]]:
    """Completions from ``decode_batch`` (the one sampling loop), with the contract's stop rule;
    queries are decoded in length-sorted batches and returned in their original order as (ids, finished). With
    ``repeats`` = N each query is prefilled once and sampled N times (``seeds`` and the result: N per query,
    query-major). ``shared``: a lineage's shared lower blocks (``SharedPrefix``)."""
    stop = newline_token_ids(tok)
    stop_set = set(stop.tolist())
    dec = Decoding(temperature=temperature, max_new_tokens=contract.max_summary_tokens, max_query_tokens=contract.max_query_tokens)
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    out: list[tuple[list[int], bool]] = [([], False)] * (len(queries) * repeats)
    for chunk in iterate(order, batch_size):
        rows = [i * repeats + k for i in chunk for k in range(repeats)]
        results = decode_batch(model, tok, [queries[i] for i in chunk], dec, [seeds[r] for r in rows], stop, prefill_chunk, repeats, shared)
        for r, (ids, hit) in zip(rows, results):
            out[r] = (ids, finished(ids, hit, stop_set))
    return out


