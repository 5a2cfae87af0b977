"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ohlora_rag.answers import is_abstention, is_grounded, key_terms, rouge_l
from ohlora_rag.evaluate import calibrate, pair_metrics, ranking_metrics


def test_pair_metrics_by_hand() -> None:
    m = pair_metrics([0.9, 0.1, 0.4], [1.0, 0.0, 0.5])
    assert m.mse == pytest.approx((0.01 + 0.01 + 0.01) / 3)
    assert m.mae == pytest.approx(0.1)
    # predicted = target - 0.1 * [1, -1, 1]: Pearson by hand
    p, t = [0.9, 0.1, 0.4], [1.0, 0.0, 0.5]
    mp, mt = sum(p) / 3, sum(t) / 3
    cov = sum((a - mp) * (b - mt) for a, b in zip(p, t))
    var = math.sqrt(sum((a - mp) ** 2 for a in p) * sum((b - mt) ** 2 for b in t))
    assert m.pearson == pytest.approx(cov / var)
    assert m.spearman == pytest.approx(1.0)
    assert m.pairs == 3


def test_spearman_uses_average_ranks_for_ties() -> None:
    m = pair_metrics([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])
    # target ranks 1.5, 1.5, 3.5, 3.5 vs 1, 2, 3, 4: r = 4 / sqrt(5 * 4)
    assert m.spearman == pytest.approx(4 / math.sqrt(20))


def test_top1_among_each_questions_labelled_candidates() -> None:
    questions = ["a", "a", "a", "b", "b", "c", "c"]
    target = [1.0, 0.25, 0.0, 0.5, 1.0, 0.0, 0.1]  # c has no right entry: not counted
    predicted = [0.7, 0.8, 0.1, 0.6, 0.9, 0.9, 0.2]  # a: a 0.25 entry scores highest (miss); b: its 1.0 (hit)
    m = pair_metrics(predicted, target, questions)
    assert m.top1 == 0.5
    assert math.isnan(pair_metrics(predicted, target).top1)


def test_ranking_metrics_by_hand() -> None:
    r = ranking_metrics([1, 2, None, 6])
    assert r.recall_at_1 == 0.25 and r.recall_at_5 == 0.5
    assert r.mrr_at_10 == pytest.approx((1 + 0.5 + 1 / 6) / 4)
    assert r.questions == 4


def test_calibration_separates_right_from_unanswerable() -> None:
    c = calibrate(right=[0.9, 0.8, 0.7], wrong=[0.5], unanswerable=[0.4, 0.3])
    assert c.threshold == pytest.approx(0.6)  # halfway between 0.7 (lowest right) and 0.5
    assert c.precision == 1.0 and c.recall == 1.0 and c.coverage == pytest.approx(0.75)
    assert (c.answerable, c.unanswerable) == (4, 2)


def test_rouge_l_by_hand() -> None:
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    # LCS("a b c d", "a c d e") = "a c d": p = 3/4, r = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "x") == 0.0


def test_abstention_and_grounding() -> None:
    assert is_abstention("Sorry, my notes don't cover that. Try a search engine.")
    assert not is_abstention("Cosine similarity compares directions.")
    entry = "cosine similarity (cos sim) : measures the angle between two vectors | key idea: direction matters"
    assert key_terms(entry)[0] == [["cosine", "similarity"], ["cos", "sim"]]
    assert is_grounded("Cosine similarity measures the angle between vectors.", entry)
    assert not is_grounded("It measures the angle between vectors.", entry)  # never names the concept
    assert not is_grounded("Cosine similarity is great.", entry)  # names it, says nothing from the entry
    assert is_abstention("That is outside what my notes cover, so I won't guess.")
    assert not is_abstention(
        "My notes say dropout zeroes units; it is not a loss function.".replace("; it is", ". It is")
    )
    assert is_abstention("I don't have any matching information about the 2030 World Cup.")
    assert is_abstention("미안 ㅠㅠ 그런 건 AI-study 레포에서 찾아보면 될 것 같아!")
