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


def test_unknown_judges_are_one_line_errors(tmp_path):
    with pytest.raises(EvalkitError, match="unknown judge 'gpt5'"):
        make_judge("gpt5")
    with pytest.raises(EvalkitError, match="no checkpoint folder"):
        make_judge(f"rm:{tmp_path / 'missing'}")


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
