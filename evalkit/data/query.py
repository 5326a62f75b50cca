"""Query formats of the paper, with the 512-token limit enforced by truncating the post (or article).

TL;DR (exact, REFERENCE.md): ``SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:``.
When the query is longer than ``max_tokens``, the post is cut at the last newline at which the query fits (the
released code's rule: the newline and everything after it go); when no newline cut fits, the post is cut after the
last token that fits. CNN/DM transfer: ``{article}\\n\\nTL;DR:`` with the article truncated the same way.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

from tokenizers import Tokenizer

from evalkit.errors import EvalkitError
from evalkit.vocab import MAX_QUERY_TOKENS, MAX_SUMMARY_TOKENS  # noqa: F401  (evalkit.data re-exports both)

TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_TRANSFER_FORMAT = "{article}\n\nTL;DR:"

# name -> (template, the field that is truncated); the name is recorded in manifests
QUERY_FORMATS: dict[str, tuple[str, str]] = {
    "tldr": (TLDR_FORMAT, "post"),
    "cnndm_transfer": (CNNDM_TRANSFER_FORMAT, "article"),
}
DEFAULT_FORMAT = {"tldr": "tldr", "cnndm": "cnndm_transfer"}

_TLDR_RE = re.compile(r"\ASUBREDDIT: r/(?P<subreddit>[^\n]*)\n\nTITLE: (?P<title>.*?)\n\nPOST: (?P<post>.*)\n\nTL;DR:\Z", re.S)


def parse_tldr_query(query: str) -> dict[str, str]:
    """Split an already formatted TL;DR query back into subreddit, title and post (inverse of the format)."""
    m = _TLDR_RE.match(query)
    if m is None:
        head = query[:40].replace("\n", "\\n")
        raise EvalkitError(f"not a TL;DR query: {head!r}...; expected 'SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:'")
    return m.groupdict()


def token_counter(tokenizer) -> Callable[[str], int]:
    """A function counting tokens with an HF tokenizer (or a ``tokenizers.Tokenizer``), no special tokens."""
    return lambda text: len(_encode(tokenizer, text))


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}; pass a Hugging Face tokenizer")


def _token_prefixes(tokenizer, text: str) -> Callable[[int], str]:
    ids = _encode(tokenizer, text)
    n = len(ids)

    def prefix(k: int) -> str:
        return tokenizer.decode(ids[: max(0, min(k, n))])

    prefix.n = n  # type: ignore[attr-defined]
    return prefix


def truncate_field(template: str, fields: Mapping[str, str], field: str, tokenizer, max_tokens: int = MAX_QUERY_TOKENS) -> str:
    """Format ``template`` with ``fields``, shortening ``fields[field]`` until the result has at most ``max_tokens``."""
    count = token_counter(tokenizer)
    values = dict(fields)
    query = template.format(**values)
    if count(query) <= max_tokens:
        return query
    text = values[field]
    # 1. the last newline at which the query fits (newline positions tried from the end)
    cut = text.rfind("\n")
    while cut >= 0:
        values[field] = text[:cut]
        query = template.format(**values)
        if count(query) <= max_tokens:
            return query
        cut = text.rfind("\n", 0, cut)
    # 2. no newline cut fits: the longest token prefix of the field that fits (binary search on the token count)
    prefix = _token_prefixes(tokenizer, text)
    lo, hi = 0, prefix.n  # type: ignore[attr-defined]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        values[field] = prefix(mid)
        if count(template.format(**values)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    values[field] = prefix(lo)
    query = template.format(**values)
    if count(query) > max_tokens:
        rest = {k: v for k, v in values.items() if k != field}
        raise EvalkitError(f"the query without its {field} ({rest}) needs more than {max_tokens} tokens; raise max_tokens")
    return query


def format_query(item: Mapping[str, object], tokenizer=None, max_tokens: int = MAX_QUERY_TOKENS, query_format: str | None = None) -> str:
    """The model's query for one ``items`` row (``dataset``, ``subreddit``, ``title``, ``body``).

    With a tokenizer the query is truncated to ``max_tokens`` as described in the module docstring; without one it
    is returned whole.
    """
    name = query_format or DEFAULT_FORMAT.get(str(item.get("dataset")), "")
    if name not in QUERY_FORMATS:
        raise EvalkitError(f"unknown query format {name!r}; known: {', '.join(QUERY_FORMATS)}")
    template, field = QUERY_FORMATS[name]
    if name == "tldr":
        fields = {"subreddit": item.get("subreddit") or "", "title": item.get("title") or "", "post": item["body"]}
    else:
        fields = {"article": item["body"]}
    if tokenizer is None:
        return template.format(**fields)
    return truncate_field(template, fields, field, tokenizer, max_tokens)


def format_summary(summary: str) -> str:
    """The completion a model is trained to produce after the query: a leading space, then the summary."""
    return " " + summary.strip()
