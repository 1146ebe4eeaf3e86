"""Weight-space merge methods over task vectors: hand-computed cases, streaming == reference, knob checks."""

from __future__ import annotations

import pytest
import torch

from strategies.aggregators import AGGREGATORS, make_aggregator
from strategies.merging import DareMerge, TaskArithmetic, TiesMerge, dare, keep_count, task_arithmetic, ties


def stream(agg, deltas: torch.Tensor) -> torch.Tensor:
    """Feed each row of deltas (n, dim) to agg with weight 1 and return its result (dim,)."""
    with agg:
        for row in deltas:
            agg.add(row, 1.0)
        return agg.result()


def random_deltas(seed: int, n: int = 6, dim: int = 37) -> torch.Tensor:
    """Seeded random deltas (n, dim)."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_task_arithmetic_by_hand():
    # Prepare: 0.5 * ([1, 2] + [3, -4]) = 0.5 * [4, -2]
    deltas = torch.tensor([[1.0, 2.0], [3.0, -4.0]])

    # Execute
    merged = task_arithmetic(deltas, scale=0.5)

    # Assert
    torch.testing.assert_close(merged, torch.tensor([2.0, -1.0]))


def test_ties_by_hand():
    # Prepare: density 0.5 of dim 4 keeps ceil(2) = 2 entries per row, by magnitude:
    #   a = [ 4, -1,  3, -2] -> [4,  0, 3,  0]
    #   b = [ 2, -5,  1, -3] -> [0, -5, 0, -3]
    #   c = [ 6,  1, -2,  5] -> [6,  0, 0,  5]
    #   sums of trimmed      =  [10, -5, 3,  2] -> elected signs [+, -, +, +]
    #   disjoint means       =  [(4+6)/2, -5, 3, 5]  (c3 = -3 disagrees with + and is dropped)
    #   times scale 0.5      =  [2.5, -2.5, 1.5, 2.5]
    deltas = torch.tensor([[4.0, -1.0, 3.0, -2.0], [2.0, -5.0, 1.0, -3.0], [6.0, 1.0, -2.0, 5.0]])
    expected = torch.tensor([2.5, -2.5, 1.5, 2.5])

    # Execute
    merged = ties(deltas, density=0.5, scale=0.5)
    streamed = stream(TiesMerge(4, density=0.5, scale=0.5), deltas)

    # Assert
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(streamed, expected)


def test_ties_zero_sum_coordinate_is_zero():
    # Prepare: density 1 keeps everything; coordinate 0 sums to 0 (no elected sign), coordinate 1 = mean(2, 3)
    deltas = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])

    # Execute
    merged = ties(deltas, density=1.0)
    streamed = stream(TiesMerge(2, density=1.0), deltas)

    # Assert
    torch.testing.assert_close(merged, torch.tensor([0.0, 2.5]))
    torch.testing.assert_close(streamed, torch.tensor([0.0, 2.5]))


def test_keep_count_is_ceiling_without_float_noise():
    # Prepare / Execute / Assert: 0.3 * 10 is 3.0000000000000004 in floats, still 3 kept
    assert keep_count(0.3, 10) == 3
    assert keep_count(0.25, 10) == 3
    assert keep_count(1e-9, 10) == 1
    assert keep_count(1.0, 7) == 7


def test_dare_single_row_entries_are_dropped_or_rescaled():
    # Prepare
    delta = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0]])

    # Execute
    merged = dare(delta, density=0.25, scale=1.0, generator=torch.Generator().manual_seed(3))

    # Assert: each entry is 0 (dropped) or 4x its value (kept, rescaled by 1/density)
    kept = merged != 0
    torch.testing.assert_close(merged[kept], 4.0 * delta[0][kept])


def test_dare_density_one_is_task_arithmetic():
    # Prepare
    deltas = random_deltas(1)

    # Execute
    merged = dare(deltas, density=1.0, scale=0.7, generator=torch.Generator().manual_seed(0))

    # Assert
    torch.testing.assert_close(merged, task_arithmetic(deltas, scale=0.7))


def test_dare_keeps_the_expectation():
    # Prepare
    deltas = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 4.0]])
    seeds = range(2000)

    # Execute
    runs = [dare(deltas, 0.5, 1.0, torch.Generator().manual_seed(s)) for s in seeds]
    mean = torch.stack(runs).mean(dim=0)

    # Assert: per-coordinate std of the mean is about |x| / sqrt(2000) ~ 0.02 |x|
    torch.testing.assert_close(mean, deltas.sum(dim=0), atol=0.25, rtol=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_equals_reference(seed):
    # Prepare
    deltas = random_deltas(seed)
    n, dim = deltas.shape

    # Execute
    pairs = [
        (stream(TaskArithmetic(dim, scale=0.7), deltas), task_arithmetic(deltas, 0.7)),
        (stream(TiesMerge(dim, density=0.3, scale=0.7), deltas), ties(deltas, 0.3, 0.7)),
        (stream(DareMerge(dim, density=0.3, scale=0.7, seed=seed), deltas),
         dare(deltas, 0.3, 0.7, torch.Generator().manual_seed(seed))),
    ]

    # Assert
    for streamed, reference in pairs:
        torch.testing.assert_close(streamed, reference, rtol=1e-6, atol=1e-6)


def test_dare_streaming_masks_follow_arrival_order():
    # Prepare: same rows, different order -> different masks per row (almost surely a different result)
    deltas = random_deltas(5, n=3, dim=64)

    # Execute
    forward = stream(DareMerge(64, density=0.5, seed=9), deltas)
    reversed_ = stream(DareMerge(64, density=0.5, seed=9), deltas.flip(0))

    # Assert
    torch.testing.assert_close(forward, dare(deltas, 0.5, 1.0, torch.Generator().manual_seed(9)))
    assert not torch.equal(forward, reversed_)


def test_weight_is_unused_but_checked():
    # Prepare
    row = torch.tensor([1.0, -2.0])

    # Execute
    with TaskArithmetic(2) as agg:
        agg.add(row, 5.0)
        agg.add(row, 0.1)
        merged = agg.result()

    # Assert
    torch.testing.assert_close(merged, 2 * row)
    with TaskArithmetic(2) as agg, pytest.raises(ValueError, match="weight"):
        agg.add(row, 0.0)


@pytest.mark.parametrize(
    ("build", "knob"),
    [
        (lambda: TaskArithmetic(4, scale=0.0), "scale"),
        (lambda: TaskArithmetic(4, scale=float("inf")), "scale"),
        (lambda: TiesMerge(4, density=0.0), "density"),
        (lambda: TiesMerge(4, density=1.5), "density"),
        (lambda: TiesMerge(4, scale=-1.0), "scale"),
        (lambda: DareMerge(4, density=float("nan")), "density"),
        (lambda: DareMerge(4, scale=float("nan")), "scale"),
        (lambda: task_arithmetic(torch.ones(2, 4), scale=-0.5), "scale"),
        (lambda: ties(torch.ones(2, 4), density=0.0), "density"),
        (lambda: dare(torch.ones(2, 4), 2.0, 1.0, torch.Generator()), "density"),
        (lambda: dare(torch.ones(2, 4), 0.5, 0.0, torch.Generator()), "scale"),
        (lambda: ties(torch.ones(4), density=0.5), "deltas"),
    ],
)
def test_bad_knobs_raise_naming_the_knob(build, knob):
    with pytest.raises(ValueError, match=knob):
        build()


def test_make_aggregator_builds_each_merge():
    # Prepare
    kinds = {"task_arithmetic": TaskArithmetic, "ties": TiesMerge, "dare": DareMerge}

    # Execute
    built = {name: make_aggregator(name, 4, capacity=2, merge_scale=0.5, density=0.25, seed=7) for name in kinds}

    # Assert
    assert set(kinds) <= set(AGGREGATORS)
    for name, cls in kinds.items():
        assert type(built[name]) is cls
        assert built[name].scale == 0.5
    assert built["ties"].density == 0.25
    assert built["dare"].density == 0.25
    assert built["dare"].seed == 7
    with pytest.raises(ValueError, match="density"):
        make_aggregator("ties", 4, capacity=2, density=0.0)
