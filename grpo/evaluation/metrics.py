"""Evaluation metrics as small pure functions: pass@k, maj@k, win rate, length statistics.

Definitions (``n`` samples of one prompt, ``c`` of them correct, ``1 <= k <= n``):

* **pass@k** is the unbiased estimator of Chen et al. (2021), the probability that a uniformly drawn k-subset of
  the ``n`` samples holds at least one correct sample: ``1 - C(n-c, k) / C(n, k)``. It is computed as
  ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms a binomial coefficient, so it neither overflows nor
  loses precision for large ``n``.
* **maj@k** is likewise the expectation over all k-subsets of a majority vote: each sample carries a final-answer
  *label* (equivalent answers share one; ``None`` when no answer was extracted, and such samples do not vote).
  The subset's vote goes to the most frequent label. **Ties count as a fraction**: when ``m`` labels tie for
  the most votes, the subset scores ``(number of correct labels among them) / m``; a subset without any vote
  scores 0. The expectation is computed exactly with a dynamic program over the labels (:func:`maj_at_k`),
  equal to enumerating all ``C(n, k)`` subsets.
* **majority vote** of a single set of samples (:func:`majority_vote`, used to report a prompt's voted answer)
  breaks ties deterministically by taking, among the tied labels, the one whose first vote comes first.
* **win rate** of B over A: the share of prompts where B's score is higher than A's, ties counting one half;
  prompts where either score is ``None`` are left out.
* **percentiles** interpolate linearly between order statistics (numpy's default ``linear`` method).

Example:
    >>> pass_at_k(n=4, c=1, k=2)
    0.5
    >>> maj_at_k(["7", "7", "8", None], correct={"7"}, k=4)
    1.0
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction


def _check_nk(n: int, k: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, ``1 - C(n-c, k) / C(n, k)``, computed as a stable product.

    Args:
        n: Samples drawn for the prompt.
        c: Correct samples among them.
        k: Subset size.

    Returns:
        The probability that a random k-subset of the samples contains a correct one.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.

    Example:
        >>> pass_at_k(n=10, c=0, k=5), pass_at_k(n=10, c=6, k=5)
        (0.0, 1.0)
    """
    _check_nk(n, k)
    if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be an integer in [0, n={n}], got {c!r}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(labels: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-``None`` label; among tied labels, the one whose first occurrence comes first.

    Example:
        >>> majority_vote(["b", None, "a", "a", "b"]), majority_vote([None, None])
        ('b', None)
    """
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(label for label in labels if label is not None and counts[label] == top)


def _ways_others_at_most(others: Sequence[int], t: int, budget: int) -> list[list[int]]:
    """Counts the ways to draw from the other labels with every label drawn at most ``t`` times.

    Args:
        others: Sample count of each other label.
        t: The most any other label may be drawn (the vote count of the label being scored).
        budget: The most samples drawn from the other labels in total.

    Returns:
        ``ways[s][r]``: the number of ways to draw ``s`` samples in total with exactly ``r`` labels drawn ``t``
        times (tying the scored label).
    """
    max_ties = budget // t
    ways = [[0] * (max_ties + 1) for _ in range(budget + 1)]
    ways[0][0] = 1
    for m in others:
        new = [[0] * (max_ties + 1) for _ in range(budget + 1)]
        for s in range(budget + 1):
            for r in range(max_ties + 1):
                if ways[s][r] == 0:
                    continue
                for x in range(min(t, m, budget - s) + 1):
                    tie = int(x == t)
                    if r + tie <= max_ties:
                        new[s + x][r + tie] += ways[s][r] * math.comb(m, x)
        ways = new
    return ways


def maj_at_k_exact(labels: Sequence[Hashable | None], correct: Collection[Hashable], k: int) -> Fraction:
    """Exact maj@k (see the module docstring) as a fraction; :func:`maj_at_k` returns it as a float."""
    n = len(labels)
    _check_nk(n, k)
    counts = Counter(label for label in labels if label is not None)
    abstain = n - sum(counts.values())
    total = Fraction(0)
    for label, m_c in counts.items():
        if label not in correct:
            continue
        others = [m for other, m in counts.items() if other != label]
        for t in range(1, min(k, m_c) + 1):
            ways = _ways_others_at_most(others, t, k - t)
            credit = Fraction(0)
            for s, by_ties in enumerate(ways):
                fill = math.comb(abstain, k - t - s)  # the rest of the subset comes from non-voting samples
                if fill:
                    credit += sum(Fraction(w * fill, r + 1) for r, w in enumerate(by_ties) if w)
            total += math.comb(m_c, t) * credit
    return total / math.comb(n, k)


def maj_at_k(labels: Sequence[Hashable | None], correct: Collection[Hashable], k: int) -> float:
    """Expected majority-vote accuracy over all k-subsets of the samples, ties counting as a fraction.

    Args:
        labels: One final-answer label per sample (``None``: no answer; such samples do not vote).
        correct: The labels that are correct answers.
        k: Subset size, ``1 <= k <= len(labels)``.

    Returns:
        maj@k in ``[0, 1]``.

    Example:
        >>> maj_at_k(["7", "8"], correct={"7"}, k=2)  # one tie of two labels, one of them correct
        0.5
    """
    return float(maj_at_k_exact(labels, correct, k))


def win_rate(scores_a: Sequence[float | None], scores_b: Sequence[float | None]) -> float | None:
    """Share of prompts where B scores higher than A, ties counting half; ``None`` when no prompt has both.

    Example:
        >>> win_rate([1.0, 2.0, 3.0, None], [2.0, 2.0, 0.0, 5.0])
        0.5
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate needs one score per prompt on both sides, got {len(scores_a)} and {len(scores_b)}")
    pairs = [(a, b) for a, b in zip(scores_a, scores_b) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(1.0 if b > a else 0.5 if b == a else 0.0 for a, b in pairs) / len(pairs)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the non-``None`` values, or ``None`` when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 <= q <= 100``), interpolating linearly between order statistics.

    Example:
        >>> percentile([1, 2, 3, 4, 10], 90)
        7.6
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must lie in [0, 100], got {q!r}")
    ordered = [Fraction(v) for v in sorted(values)]  # exact interpolation, rounded once at the end
    pos = (len(ordered) - 1) * Fraction(q) / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass(frozen=True)
class LengthStats:
    """Completion lengths in tokens.

    Attributes:
        count: Completions measured.
        mean: Mean length.
        p50: Median length.
        p90: 90th percentile.
        max: Longest completion.
        truncated: Share of completions cut at ``max_new_tokens`` (finish reason ``length``).
    """

    count: int
    mean: float
    p50: float
    p90: float
    max: int
    truncated: float


def length_stats(lengths: Sequence[int], truncated: Sequence[bool]) -> LengthStats:
    """Summarises completion lengths.

    Args:
        lengths: Token count of each completion.
        truncated: Whether each completion hit the token limit.

    Example:
        >>> length_stats([1, 2, 3, 4, 10], [False, False, False, False, True])
        LengthStats(count=5, mean=4.0, p50=3.0, p90=7.6, max=10, truncated=0.2)
    """
    if len(lengths) != len(truncated):
        raise ValueError(f"length_stats: {len(lengths)} lengths but {len(truncated)} truncation flags")
    if not lengths:
        raise ValueError("length_stats needs at least one completion")
    return LengthStats(
        count=len(lengths),
        mean=sum(lengths) / len(lengths),
        p50=percentile(lengths, 50),
        p90=percentile(lengths, 90),
        max=max(lengths),
        truncated=sum(bool(t) for t in truncated) / len(truncated),
    )
