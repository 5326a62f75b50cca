"""OpenAI's released human comparisons: exact counts from REFERENCE.md, table shapes, and bad files."""

import json

import pytest

from evalkit import validate
from evalkit.data import load_openai_comparisons, openai_policy_info, preferred_to_reference, read_openai_comparisons
from evalkit.errors import EvalkitError


def counts(tables, split="valid2", baseline="ref"):
    rates = preferred_to_reference(tables, split=split, baseline=baseline)
    return {(r.dataset, r.policy_id): (r.wins, r.n) for r in rates.itertuples()}


def test_batch18_counts(batch_tables):
    c = counts(batch_tables["batch18"])
    assert c[("tldr", "sup4_6b")] == (30, 85)
    assert c[("tldr", "sup4_6b_t0.7")] == (20, 84)
    assert c[("tldr", "sup4_6b_p.95")] == (12, 84)


def test_batch0_cnndm_counts(batch_tables):
    c = counts(batch_tables["batch0_cnndm"])
    assert c[("cnndm", "sup4_6b_ppo_rm4_6b_kl14")] == (38, 74)
    assert c[("cnndm", "pretrain_6b_t.7")] == (22, 73)
    assert c[("cnndm", "sup4_6b_t0.7")] == (15, 74)


def test_batch13_ppo_over_12b_sft(batch_tables):
    t = batch_tables["batch13"]
    assert counts(t, baseline="sup4_12b_t0.7")[("tldr", "sup4_ppo_rm4_t.7")] == (598, 832)
    assert counts(t, split=None, baseline="sup4_12b_t0.7")[("tldr", "sup4_ppo_rm4_t.7")] == (788, 1097)


def test_tables_validate_and_link(batch_tables):
    t = batch_tables["batch18"]
    for name in ("items", "generations", "tasks", "judgments"):
        validate(t[name], name)
    assert len(t["judgments"]) == len(t["tasks"]) == 674
    assert len(t["items"]) == 110 and t["judgments"]["labeler_id"].nunique() == 11
    assert set(t["judgments"]["labeler_kind"]) == {"imported"} and set(t["judgments"]["source"]) == {"batch18.json"}
    # one generation per distinct (policy, item, text)
    g = t["generations"]
    assert not g.duplicated(["policy_id", "item_id", "text"]).any()
    assert set(t["tasks"]["gen_id_left"]) | set(t["tasks"]["gen_id_right"]) == set(g["gen_id"])
    # the preferred summary is the one on the side the labeler chose; confidence agrees with the side
    j = t["judgments"].merge(t["tasks"], on="task_id")
    side_gen = j["gen_id_left"].where(j["preferred"] == "left", j["gen_id_right"])
    assert (side_gen == j["preferred_gen_id"]).all()
    assert ((j["confidence"] <= 4) == (j["preferred"] == "left")).all()
    assert j["note"].notna().sum() > 0


def test_news_records_become_cnndm_items(batch_tables):
    items = batch_tables["batch0_cnndm"]["items"]
    assert set(items["dataset"]) == {"cnndm"} and len(items) == 45
    assert items["reference"].notna().all() and items["title"].notna().all()


def test_policy_names():
    assert openai_policy_info("sup4_6b_t0.7") == {"policy_kind": "sft", "n_params": 6_700_000_000, "temperature": 0.7, "top_p": None}
    assert openai_policy_info("sup4_6b") == {"policy_kind": "sft", "n_params": 6_700_000_000, "temperature": 0.0, "top_p": None}
    assert openai_policy_info("sup4_6b_p.95")["top_p"] == 0.95
    assert openai_policy_info("sup4_ppo_rm4_t.7") == {"policy_kind": "ppo", "n_params": 1_300_000_000, "temperature": 0.7, "top_p": None}
    assert openai_policy_info("sup4_12b_t0.7")["n_params"] == 12_900_000_000
    assert openai_policy_info("sup4_6b_ppo_rm4_6b_kl14")["policy_kind"] == "ppo"
    assert openai_policy_info("pretrain_6b_t.7")["policy_kind"] == "pretrained"
    assert openai_policy_info("ref")["policy_kind"] == "ref"
    assert openai_policy_info("human_editor")["policy_kind"] == "external"


def test_merging_files_keeps_items_once(batch_tables):
    from evalkit.data import comparison_batch

    merged = load_openai_comparisons([comparison_batch("batch18"), comparison_batch("edit_b2_eval_test")])
    assert len(merged["judgments"]) == 674 + 5
    assert merged["items"]["item_id"].is_unique
    with pytest.raises(EvalkitError, match="given twice"):
        load_openai_comparisons([comparison_batch("batch18"), comparison_batch("batch18")])


GOOD = {"info": {"id": "t3_x", "post": "p", "title": "t", "subreddit": "s"}, "split": "valid2",
        "summaries": [{"text": " a", "policy": "ref", "note": ""}, {"text": " b", "policy": "sup4_6b", "note": ""}],
        "choice": 1, "worker": "w1", "batch": "b", "extra": {"confidence": 8}}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("choice"), r":2: missing field 'choice'"),
    (lambda r: r.update(choice=2), r":2: field 'choice' is 2; expected 0 or 1"),
    (lambda r: r["summaries"].pop(), r":2: field 'summaries' should hold exactly 2"),
    (lambda r: r.update(split="dev"), r":2: unknown split 'dev'"),
    (lambda r: r.update(extra={"confidence": 12}), r":2: extra.confidence is 12"),
])
def test_bad_records_name_their_line(tmp_path, mutate, message):
    bad = json.loads(json.dumps(GOOD))
    mutate(bad)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(EvalkitError, match=message):
        read_openai_comparisons(path)


def test_truncated_line(tmp_path):
    path = tmp_path / "c.json"
    line = json.dumps(GOOD)
    path.write_text(line + "\n" + line[: len(line) // 2] + "\n")
    with pytest.raises(EvalkitError, match=r"c.json:2: malformed JSON"):
        read_openai_comparisons(path)
