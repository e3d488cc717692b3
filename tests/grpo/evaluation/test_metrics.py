"""pass@k, maj@k, win rate and length statistics against hand values and brute-force enumeration."""

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from grpo.evaluation.metrics import (
    length_stats,
    maj_at_k,
    maj_at_k_exact,
    majority_vote,
    mean_or_none,
    pass_at_k,
    percentile,
    win_rate,
)


# ----------------------------------------------------------------------------------------------- pass@k
def brute_pass_at_k(n, c, k):
    """Share of k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 1, 0.3),  # pass@1 is the share of correct samples
    (10, 0, 5, 0.0),
    (10, 6, 5, 1.0),  # n - c < k: every 5-subset holds a correct sample
    (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_equals_enumeration_of_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = brute_pass_at_k(n, c, k)
                assert exact == 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-14), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    n, c, k = 2000, 3, 700
    with pytest.raises(OverflowError):
        float(math.comb(n, k))
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k", "field"), [(4, 5, 1, "c"), (4, -1, 1, "c"), (4, 1, 5, "k"), (4, 1, 0, "k"),
                                                    (0, 0, 1, "n")])
def test_pass_at_k_rejects_bad_arguments(n, c, k, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------------------- maj@k
def brute_maj_at_k(labels, correct, k):
    """Mean over all k-subsets of the vote credit: correct share of the labels tied for the most votes."""
    total, subsets = Fraction(0), list(itertools.combinations(range(len(labels)), k))
    for s in subsets:
        counts = Counter(labels[i] for i in s if labels[i] is not None)
        if counts:
            top = max(counts.values())
            tied = [lab for lab, v in counts.items() if v == top]
            total += Fraction(sum(lab in correct for lab in tied), len(tied))
    return total / len(subsets)


@pytest.mark.parametrize(("labels", "correct", "k", "expected"), [
    (["7", "8"], {"7"}, 2, Fraction(1, 2)),  # a two-way tie with one correct label counts half
    (["7", "8"], {"7"}, 1, Fraction(1, 2)),
    (["7", "7", "8"], {"7"}, 3, Fraction(1)),
    (["7", "7", "8"], {"7"}, 2, Fraction(2, 3)),  # {7,7} -> 1, {7,8} -> 1/2 twice: (1 + 1/2 + 1/2) / 3
    (["7", "7", "8"], {"8"}, 2, Fraction(1, 3)),  # {7,8} -> 1/2 twice, {7,7} -> 0
    (["a", "b", "c"], {"a"}, 3, Fraction(1, 3)),  # three-way tie
    (["0.5", "1/2", "3"], {"0.5", "1/2"}, 3, Fraction(2, 3)),  # two correct labels among three tied
    (["7", None, None], {"7"}, 2, Fraction(2, 3)),  # {None, None} has no vote and scores 0
    ([None, None], {"7"}, 1, Fraction(0)),
    (["8", "8", "7"], set(), 3, Fraction(0)),
])
def test_maj_at_k_hand_values(labels, correct, k, expected):
    assert maj_at_k_exact(labels, correct, k) == expected
    assert maj_at_k(labels, correct, k) == pytest.approx(float(expected), abs=1e-15)


def test_maj_at_k_equals_enumeration_of_all_subsets():
    rng = random.Random(0)
    alphabet = ["a", "b", "c", "d", None]
    for _ in range(120):
        n = rng.randint(1, 8)
        labels = [rng.choice(alphabet) for _ in range(n)]
        correct = {lab for lab in ("a", "b", "c", "d") if rng.random() < 0.4}
        for k in range(1, n + 1):
            assert maj_at_k_exact(labels, correct, k) == brute_maj_at_k(labels, correct, k), (labels, correct, k)


def test_maj_at_1_is_the_share_of_correct_votes():
    labels = ["a", "b", "a", None, "c", "a"]
    assert maj_at_k(labels, {"a"}, 1) == pytest.approx(3 / 6)


def test_maj_at_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be an integer in"):
        maj_at_k(["a", "b"], {"a"}, 3)


def test_majority_vote_breaks_ties_by_first_vote():
    assert majority_vote(["b", None, "a", "a", "b"]) == "b"  # a and b tie at 2; b voted first
    assert majority_vote([None, "a", "b", "b"]) == "b"
    assert majority_vote([None, None]) is None


# ----------------------------------------------------------------------------------------------- win rate, lengths
def test_win_rate_counts_ties_half_and_skips_missing_scores():
    # wins: (2 > 1) yes, (2 == 2) half, (0 < 3) no, None skipped -> (1 + 0.5 + 0) / 3
    assert win_rate([1.0, 2.0, 3.0, None], [2.0, 2.0, 0.0, 5.0]) == pytest.approx(0.5)
    assert win_rate([0.0, 0.0], [1.0, 1.0]) == 1.0
    assert win_rate([1.0, 5.0], [1.0, 5.0]) == 0.5
    assert win_rate([None], [1.0]) is None
    with pytest.raises(ValueError, match="one score per prompt"):
        win_rate([1.0], [1.0, 2.0])


def test_mean_or_none():
    assert mean_or_none([1.0, None, 0.0]) == 0.5
    assert mean_or_none([None]) is None


def test_length_stats_by_hand_and_against_numpy():
    stats = length_stats([1, 2, 3, 4, 10], [False, False, False, False, True])
    assert (stats.count, stats.mean, stats.p50, stats.p90, stats.max, stats.truncated) == (5, 4.0, 3.0, 7.6, 10, 0.2)
    rng = np.random.default_rng(0)
    values = rng.integers(0, 500, size=37).tolist()
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    with pytest.raises(ValueError, match="at least one completion"):
        length_stats([], [])
    with pytest.raises(ValueError, match=r"percentile q must lie in \[0, 100\]"):
        percentile([1], 101)
