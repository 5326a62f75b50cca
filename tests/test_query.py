"""Query formatting: exact golden strings, round trips over all bundled posts, and the 512-token truncation rule."""

import pytest

from evalkit.data import format_query, load_tldr, parse_tldr_query
from evalkit.data.bundled import GPT2_VOCAB_SIZE, TLDR_CSV, bundled_path
from evalkit.data.io import read_csv_columns
from evalkit.errors import EvalkitError


def tldr_item(post, subreddit="AskReddit", title="A title"):
    return {"dataset": "tldr", "subreddit": subreddit, "title": title, "body": post}


def test_gpt2_tokenizer_is_complete(gpt2):
    assert len(gpt2) == GPT2_VOCAB_SIZE == 50257
    assert gpt2.encode("Hello world\n\nTL;DR:") == [15496, 995, 198, 198, 14990, 26, 7707, 25]
    assert gpt2.eos_token_id == 50256


def test_tldr_golden_string():
    q = format_query(tldr_item("I lost my keys.\nWhat now?", "relationships", "Keys"))
    assert q == "SUBREDDIT: r/relationships\n\nTITLE: Keys\n\nPOST: I lost my keys.\nWhat now?\n\nTL;DR:"


def test_cnndm_transfer_golden_string():
    assert format_query({"dataset": "cnndm", "body": "(CNN) A story."}) == "(CNN) A story.\n\nTL;DR:"


def test_every_bundled_query_round_trips():
    raw = read_csv_columns(bundled_path(TLDR_CSV), ("query",))["query"]
    assert len(raw) == 1945
    for query in raw:
        parts = parse_tldr_query(query)
        assert format_query(tldr_item(parts["post"], parts["subreddit"], parts["title"])) == query


def test_items_reproduce_bundled_queries():
    items = load_tldr()
    raw = set(read_csv_columns(bundled_path(TLDR_CSV), ("query",))["query"])
    assert {format_query(r) for r in items.to_dict("records")} <= raw


def test_parse_rejects_non_query():
    with pytest.raises(EvalkitError, match="not a TL;DR query"):
        parse_tldr_query("TITLE: x\n\nPOST: y")


def test_short_query_is_untouched(gpt2):
    item = tldr_item("short post")
    assert format_query(item, gpt2) == format_query(item)


def test_truncates_at_last_newline_that_fits(gpt2):
    paragraphs = [f"Paragraph {i}: " + "word " * 40 for i in range(30)]
    item = tldr_item("\n".join(paragraphs))
    q = format_query(item, gpt2, max_tokens=200)
    assert len(gpt2.encode(q)) <= 200
    post = parse_tldr_query(q)["post"]
    # the post is a whole number of paragraphs, and one more paragraph would not fit
    n = post.count("\n") + 1
    assert post == "\n".join(paragraphs[:n])
    longer = format_query(tldr_item("\n".join(paragraphs[: n + 1])))
    assert len(gpt2.encode(longer)) > 200


def test_truncates_at_last_token_without_newlines(gpt2):
    item = tldr_item("lorem ipsum dolor " * 300)
    q = format_query(item, gpt2, max_tokens=128)
    n_tokens = len(gpt2.encode(q))
    assert n_tokens <= 128 and n_tokens >= 126  # the longest token prefix that fits
    assert q.endswith("\n\nTL;DR:")
    assert parse_tldr_query(q)["post"].startswith("lorem ipsum dolor")


def test_default_limit_is_512(gpt2):
    items = load_tldr()
    longest = max(items.to_dict("records"), key=lambda r: len(r["body"]))
    big = {**longest, "body": longest["body"] + "\n" + longest["body"] * 3}
    assert len(gpt2.encode(format_query(big, gpt2))) <= 512


def test_cnndm_article_truncated_to_fit(gpt2):
    from evalkit.data import load_cnndm

    article = max(load_cnndm()["body"], key=len)
    q = format_query({"dataset": "cnndm", "body": article}, gpt2)
    assert q.endswith("\n\nTL;DR:") and len(gpt2.encode(q)) <= 512
    assert article.startswith(q[: -len("\n\nTL;DR:")])
