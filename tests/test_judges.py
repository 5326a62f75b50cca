"""Judges measured against people: the leave-one-out protocol, both orders averaged, no judge trained on the
held-out split, and the evaluator table on the released labels."""

import numpy as np
import pandas as pd
import pytest

from evalkit.errors import EvalkitError
from evalkit.judges import FeaturesJudge, Judge, LengthJudge, evaluate, leave_one_out, make_judge, released_comparisons


def test_leave_one_out_on_a_constructed_set():
    # comparison a: labels 1, 1, 0 -> leaving out each: targets 1 (from 1,0? tie: skipped), ... worked by hand below
    comparisons = pd.Series(["a", "a", "a", "b", "b", "c"])
    labels = pd.Series([1, 1, 0, 1, 1, 0])
    # a: leave out #0 -> others (1, 0) tie, skipped; #1 -> tie, skipped; #2 -> others (1, 1): target 1, the human said 0
    # b: leave out #3 -> target 1 (hit); #4 -> target 1 (hit); c has one label: not scored
    assert leave_one_out(comparisons, labels) == (2 / 3, 3)
    # a judge that always says 1 hits all three targets; one that ties everywhere scores half
    assert leave_one_out(comparisons, labels, np.ones(6)) == (1.0, 3)
    assert leave_one_out(comparisons, labels, np.full(6, 0.5)) == (0.5, 3)


class _Leftist(Judge):
    """A pure position bias: the first summary shown wins with probability 0.8, whatever it says."""

    def __init__(self):
        super().__init__("leftist")

    def prob_left(self, pairs):
        return np.full(len(pairs), 0.8)


def _pairs():
    rows = []
    for i in range(6):
        rows.append({"comparison": f"c{i}", "item_id": f"i{i}", "dataset": "tldr", "batch": "b", "labeler_id": "x",
                     "post": "a post about cats", "items": {}, "gen_id_left": f"g{i}a", "gen_id_right": f"g{i}b",
                     "left": "short", "right": "a much longer summary of the post about the cats" * (i % 2 + 1), "left_won": i % 2})
    return pd.DataFrame(rows)


def test_averaging_both_orders_cancels_a_pure_position_bias():
    row = evaluate(_Leftist(), _pairs())
    assert row["position_bias"] == pytest.approx(0.8)  # measured
    assert row["order_agreement"] == 0.0  # it flips with the order every time
    assert row["agreement_with_labels"] == 0.5  # averaged over both orders it ties everywhere: half credit, no side wins


def test_length_judge_prefers_the_longer_summary_always():
    row = evaluate(LengthJudge(), _pairs())
    assert row["prefers_longer"] == 1.0 and row["position_bias"] == 0.5 and row["order_agreement"] == 1.0
    assert row["agreement_with_labels"] == 0.5  # half of the constructed labels chose the longer summary


def test_no_judge_trains_on_a_held_out_post():
    held_out = set(released_comparisons()["item_id"])
    assert held_out and not (FeaturesJudge().trained_on & held_out)


def test_the_evaluator_table_on_the_released_labels():
    from evalkit.judges import evaluator_table

    table = evaluator_table([LengthJudge()]).set_index("judge")
    # the released valid2 judgments of batch13, batch18 and batch0_cnndm
    assert table.loc["human", "n_judgments"] == 1823 and table.loc["human", "n_loo"] == table.loc["length", "n_loo"] > 500
    # humans agree with the majority of the other labellers more often than "the longer summary wins" does
    assert table.loc["human", "human_agreement"] > table.loc["length", "human_agreement"] > 0.5
    assert table.loc["length", "prefers_longer"] == 1.0 and np.isfinite(table.loc["length", "kappa_gpt4"])


def test_the_encoder_judge_reads_which_post_a_summary_is_about():
    judge = make_judge("encoder")
    assert judge.judge_id == "encoder" and not (judge.trained_on & set(released_comparisons()["item_id"]))
    assert judge.weights["similarity"] > 0  # fitted on the released labels: people prefer summaries closer to the post
    refs = released_comparisons().drop_duplicates("item_id").head(40)
    posts, own = judge.embed(list(refs["post"])), judge.embed(list(refs["left"]))
    other = np.roll(own, 1, axis=0)  # another post's summary
    assert ((posts * own).sum(1) > (posts * other).sum(1)).mean() >= 0.9
    # a summary of another post loses to the post's own, averaged over both orders
    pairs = refs.assign(right=np.roll(refs["left"].to_numpy(), 1))
    p = (judge.prob_left(pairs) + 1 - judge.prob_left(pairs.rename(columns={"left": "right", "right": "left"}))) / 2
    assert (p > 0.5).mean() >= 0.8


def test_unknown_judges_are_one_line_errors(tmp_path):
    with pytest.raises(EvalkitError, match="unknown judge 'gpt5'"):
        make_judge("gpt5")
    with pytest.raises(EvalkitError, match="no checkpoint folder"):
        make_judge(f"rm:{tmp_path / 'missing'}")
    with pytest.raises(EvalkitError, match="no checkpoint folder"):
        make_judge(f"encoder:{tmp_path / 'missing'}")


def _real_pairs(n=6):
    return released_comparisons().drop_duplicates("comparison").head(n).reset_index(drop=True)


def test_a_reward_model_judge_scores_each_summary_alone(concise_rm_dir):
    judge = make_judge(f"rm:{concise_rm_dir}")
    pairs = _real_pairs()
    shown, swapped = judge.both_orders(pairs)
    assert np.all((shown > 0) & (shown < 1)) and np.array_equal(shown, swapped)
    flipped = judge.prob_left(pairs.rename(columns={"left": "right", "right": "left"}))
    assert np.allclose(shown, 1 - flipped, atol=1e-6)  # P(A over B) = 1 - P(B over A)
    assert judge.labeler_kind == "model"


def test_a_language_model_judge_reads_a_and_b_and_averages_both_orders(pretrained):
    judge = make_judge(f"llm:{pretrained}")
    assert judge.labeler_kind == "llm" and judge.judge_id.endswith("@tldr-pairwise-v1")
    row = evaluate(judge, _real_pairs())
    assert 0 <= row["position_bias"] <= 1 and 0 <= row["order_agreement"] <= 1 and row["seconds_per_1000"] > 0


def test_pair_agreement_counts_every_two_labels_of_a_comparison():
    from evalkit.judges import pair_agreement

    # a: labels 1, 1, 0 -> 3 pairs, 1 agreeing; b: 1, 1 -> 1 pair agreeing; c: one label, no pair
    assert pair_agreement(["a", "a", "a", "b", "b", "c"], [1, 1, 0, 1, 1, 0]) == (0.5, 4)


def test_the_reward_trainer_never_trains_on_a_released_held_out_post():
    """The released valid2 comparisons include posts the bundled TL;DR set lacks: the trainer drops them by the
    release's own split, so a reward model trained on every released batch can be validated on valid2."""
    from evalkit.train.reward import comparison_sources, split_pairs

    pairs, _ = comparison_sources(("batch13", "batch18", "oai1b-gpt4-judged"))
    train, held, dropped = split_pairs(pairs, "valid2", 0.15)
    released_valid2 = set(released_comparisons()["item_id"])
    assert len(train) > 500 and dropped > 1000
    assert not (set(train["item_id"]) | set(held["item_id"])) & released_valid2


def test_judge_labels_stay_apart_from_peoples(tmp_path):
    """`evalkit judge run` labels each distinct pair once as the judge (never human), resumes after a kill, and its
    labels enter no analysis of people's labels unless pooling is asked for."""
    from conftest import baseline_study, run_cli
    from test_study_build import SETTINGS

    from evalkit.analysis import comparisons
    from evalkit.analysis.labels import select_labels
    from evalkit.study.exchange import load_study_tables

    baseline_study(tmp_path, *SETTINGS)
    sets = [x for s in SETTINGS for x in ("--set", s)]
    args = ["judge", "run", "studies/default", "--judge", "length", "--batch-size", "5", "--set", f"study.out_dir={tmp_path}", *sets]
    run_cli("study", "simulate", "studies/default", "--set", f"study.out_dir={tmp_path}", "--set", "labelers.judge=features", *sets, check=True)
    target = tmp_path / "study" / "judgments.parquet"
    simulated = pd.read_parquet(target)
    # people: half of the simulated answers relabelled as if a person had given them
    people = simulated.assign(labeler_kind="human", source="web", judgment_id="j-h-" + simulated["judgment_id"]).iloc[::2]
    pd.concat([simulated, people], ignore_index=True).to_parquet(target)
    first = run_cli(*args, check=True)
    judged = pd.read_parquet(target)
    mine = judged[judged["source"] == "judge:length"]
    tables = load_study_tables(tmp_path / "study")
    pair = tables["tasks"][tables["tasks"]["kind"] == "pairwise"]
    assert len(mine) == len(pair.drop_duplicates(["item_id", "gen_id_left", "gen_id_right"])) and "tasks judged by length" in first.stdout
    assert set(mine["labeler_kind"]) == {"model"} and set(mine["labeler_id"]) == {"length"}
    # killed part-way: the judge's last judgments lost; a re-run judges exactly those, then nothing
    pd.concat([judged[judged["source"] != "judge:length"], mine.iloc[:-7]]).to_parquet(target)
    assert "7 tasks judged" in run_cli(*args, check=True).stdout
    assert "0 tasks judged" in run_cli(*args, check=True).stdout
    tables["judgments"] = pd.read_parquet(target)
    assert len(tables["judgments"]) == len(judged)
    chosen, name, words = select_labels(tables["judgments"])
    assert name == "people" and set(chosen["labeler_kind"]) == {"human"} and "human labels" in words
    assert len(comparisons(tables)) == len(comparisons({**tables, "judgments": people}))
    assert len(comparisons(tables, labels="length")) < len(comparisons(tables, labels="all"))
    with pytest.raises(EvalkitError, match="labels 'gpt5'"):
        select_labels(tables["judgments"], "gpt5")
    bad = run_cli("judge", "run", "studies/default", "--judge", "oracle", "--set", f"study.out_dir={tmp_path}", *sets)
    assert bad.returncode == 2 and "unknown judge 'oracle'" in bad.stderr
