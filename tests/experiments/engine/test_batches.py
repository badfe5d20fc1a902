"""Compute matching (`experiments.engine.batches.allocate_steps`): expert budgets checked against
largest-remainder shares worked out here with exact fractions, on cases with remainders, ties and
clusters too small for one step."""
from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from experiments.engine.batches import allocate_steps


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Reference: exact quotas `total * s / sum(s)` as fractions, floors, then one more step to the
    largest remainders (ties: the lower index first); a part left at 0 takes one step from the
    largest part (the lowest index among equals)."""
    quotas = [Fraction(total * s, sum(sizes)) for s in sizes]
    parts = [q.numerator // q.denominator for q in quotas]
    for i in sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - parts[i]), i))[: total - sum(parts)]:
        parts[i] += 1
    while min(parts) < 1:
        parts[parts.index(max(parts))] -= 1
        parts[parts.index(min(parts))] += 1
    return parts


@pytest.mark.parametrize("total, sizes, expected", [
    (10, [5, 3, 2], [5, 3, 2]),             # exact shares, no remainder
    (7, [5, 3, 2], [4, 2, 1]),              # quotas 3.5, 2.1, 1.4: the 0.5 remainder gets the step
    (10, [1, 1, 1], [4, 3, 3]),             # three equal remainders 1/3: the first cluster
    (6, [1, 2, 1], [2, 3, 1]),              # quotas 1.5, 3, 1.5: tied remainders, the lower index
    (11, [2, 2, 2, 2], [3, 3, 3, 2]),       # 2.75 each: three of the four tied parts get one more
    (3, [1, 1000], [1, 2]),                 # quota 0.003 -> 0: one step taken from the largest
    (4, [1, 1, 1000], [1, 1, 2]),           # two tiny clusters, each made up from the largest
    (100, [300, 100, 100, 500], [30, 10, 10, 50]),
])
def test_budgets_are_largest_remainder_shares(total, sizes, expected):
    assert largest_remainder(total, sizes) == expected           # the worked value above is right
    assert allocate_steps(total, sizes) == expected


@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.integers(0, 200))
def test_budgets_sum_to_the_total_and_stay_within_one_of_the_quota(sizes, extra):
    total = len(sizes) + extra
    steps = allocate_steps(total, sizes)
    assert sum(steps) == total and min(steps) >= 1
    quotas = [Fraction(total * s, sum(sizes)) for s in sizes]
    if all(q >= 1 for q in quotas):                               # no tiny-cluster correction needed
        assert all(abs(p - q) < 1 for p, q in zip(steps, quotas))
    remainders = [q - int(q) for q in quotas]
    if len(set(remainders)) == len(remainders):                  # no tie: the reference is unambiguous
        assert steps == largest_remainder(total, sizes)


def test_budget_errors():
    with pytest.raises(ValueError, match="total_steps"):
        allocate_steps(2, [1, 1, 1])
    with pytest.raises(ValueError, match="sizes"):
        allocate_steps(5, [1, 0])
    with pytest.raises(ValueError, match="sizes"):
        allocate_steps(5, [])
