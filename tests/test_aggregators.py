"""Server-side math on update vectors: streaming aggregators, the server optimizer and central DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedgt.core.noise import SeededNoise
from strategies.aggregators import (
    AGGREGATORS,
    CoordinateMedian,
    NormBoundedMean,
    RelativeNormBoundedMean,
    TrimmedMean,
    WeightedMean,
    make_aggregator,
)
from strategies.central_dp import CentralDP
from strategies.merging import DareMerge, TaskArithmetic, TiesMerge
from strategies.server_opt import ServerOptimizer

# Five organizations' updates, dim 4; the tests use the first 3, 4 or 5.
ROWS = [
    [1.0, 2.0, 3.0, 4.0],
    [3.0, 0.0, -1.0, 2.0],
    [0.0, 4.0, 5.0, -6.0],
    [10.0, -2.0, 0.0, 1.0],
    [2.0, 1.0, -3.0, 7.0],
]


def vec(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def aggregate(agg, rows: list[list[float]], weights: list[float] | None = None) -> torch.Tensor:
    for row, weight in zip(rows, weights or [1.0] * len(rows), strict=True):
        agg.add(vec(row), weight)
    return agg.result()


# --- aggregators -------------------------------------------------------------------------------------


def test_weighted_mean_uses_weights():
    # (1*[1,2,3,4] + 2*[3,0,-1,2] + 1*[0,4,5,-6]) / 4 = [7,6,6,2] / 4
    out = aggregate(WeightedMean(4), ROWS[:3], [1.0, 2.0, 1.0])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, vec([1.75, 1.5, 1.5, 0.5]))


def test_norm_bounded_mean_scales_only_vectors_over_the_bound():
    agg = NormBoundedMean(4, bound=5.0)
    # norms 5 (at the bound: kept), 10 (scaled to [0,0,3,4]), 1
    out = aggregate(agg, [[3, 4, 0, 0], [0, 0, 6, 8], [1, 0, 0, 0]], [1.0, 1.0, 2.0])
    torch.testing.assert_close(out, vec([5.0, 4.0, 3.0, 4.0]) / 4)
    assert agg.clipped == 1
    assert agg.count == 3


def test_relative_norm_bound_caps_each_vector_at_a_multiple_of_the_median_norm():
    # norms 1, 2, 100; median 2, bound 1.5 -> limit 3: only the third is scaled (to norm 3)
    rows = [[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 60.0, 80.0]]
    with RelativeNormBoundedMean(4, capacity=3, bound=1.5) as agg:
        out = aggregate(agg, rows, [1.0, 1.0, 2.0])
    torch.testing.assert_close(out, vec([1.0, 2.0, 3.6, 4.8]) / 4)
    assert agg.clipped == 1


def test_median_odd_count():
    with CoordinateMedian(4, capacity=3) as agg:
        # columns {1,3,0} {2,0,4} {3,-1,5} {4,2,-6}
        torch.testing.assert_close(aggregate(agg, ROWS[:3]), vec([1.0, 2.0, 3.0, 2.0]))


def test_median_even_count_averages_the_middle_two():
    with CoordinateMedian(4, capacity=8) as agg:
        # sorted columns {0,1,3,10} {-2,0,2,4} {-1,0,3,5} {-6,1,2,4}
        torch.testing.assert_close(aggregate(agg, ROWS[:4]), vec([2.0, 1.0, 1.5, 1.5]))


def test_median_ignores_weights():
    with CoordinateMedian(4, capacity=3) as agg:
        torch.testing.assert_close(aggregate(agg, ROWS[:3], [100.0, 1.0, 1.0]), vec([1.0, 2.0, 3.0, 2.0]))


def test_trimmed_mean_beta_034_on_3_rows_is_the_median():
    with TrimmedMean(4, capacity=3, beta=0.34) as agg:  # floor(0.34 * 3) = 1 trimmed each side
        torch.testing.assert_close(aggregate(agg, ROWS[:3]), vec([1.0, 2.0, 3.0, 2.0]))


def test_trimmed_mean_beta_02_on_5_rows():
    with TrimmedMean(4, capacity=5, beta=0.2) as agg:  # floor(0.2 * 5) = 1 trimmed each side
        # kept {1,2,3} {0,1,2} {-1,0,3} {1,2,4}
        torch.testing.assert_close(aggregate(agg, ROWS), vec([2.0, 1.0, 2 / 3, 7 / 3]))


def test_trimmed_mean_trims_at_least_one_from_each_end_when_beta_n_is_below_one():
    # Flower's floor(0.1 * 5) = 0 would be the plain mean: one outlier among five would pass untouched.
    with TrimmedMean(4, capacity=5, beta=0.1) as agg:
        expected = np.sort(np.array(ROWS), axis=0)[1:4].mean(0)
        torch.testing.assert_close(aggregate(agg, ROWS), torch.tensor(expected, dtype=torch.float32))
    with TrimmedMean(4, capacity=5, beta=0.1) as agg:  # two organizations: nothing to trim, the plain mean
        torch.testing.assert_close(aggregate(agg, ROWS[:2]), torch.tensor(ROWS[:2]).mean(0))
    with TrimmedMean(4, capacity=5, beta=0.0) as agg:  # beta 0 asks for the plain mean
        torch.testing.assert_close(aggregate(agg, ROWS), torch.tensor(ROWS).mean(0))


def test_one_sign_flipped_scaled_update_among_five_is_trimmed_away():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(4, 32, generator=g) * 0.1 + 1.0
    attack = -100 * honest.mean(0)
    with TrimmedMean(32, capacity=5, beta=0.1) as agg:
        out = aggregate(agg, [*honest.tolist(), attack.tolist()])
    assert torch.nn.functional.cosine_similarity(out, honest.mean(0), dim=0) > 0.99


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_row_stores_are_blockwise_exact(block):
    rows = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    full = rows.numpy().astype(np.float64)
    with CoordinateMedian(10, capacity=6, block=block) as med, TrimmedMean(10, 6, beta=0.2, block=block) as trim:
        for row in rows:
            med.add(row, 1.0)
            trim.add(row, 1.0)
        # naive references over the whole (6, 10) array; floor(0.2 * 6) = 1 trimmed each side
        torch.testing.assert_close(med.result(), torch.from_numpy(np.median(full, axis=0)).float())
        torch.testing.assert_close(trim.result(), torch.from_numpy(np.sort(full, axis=0)[1:5].mean(0)).float())


def test_row_store_files_removed_after_close():
    agg = TrimmedMean(4, capacity=3, beta=0.2)
    agg.add(vec(ROWS[0]), 1.0)
    folder = agg.path.parent
    assert agg.path.exists()
    agg.close()
    assert not folder.exists()
    agg.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        agg.add(vec(ROWS[1]), 1.0)
    with CoordinateMedian(4, capacity=1) as agg:
        folder = agg.path.parent
    assert not folder.exists()


@pytest.mark.parametrize(
    ("vector", "weight", "match"),
    [
        (torch.zeros(5), 1.0, "length 5"),
        (torch.zeros(2, 2), 1.0, "1-D"),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), 1.0, "NaN"),
        (torch.tensor([1.0, float("inf"), 0.0, 0.0]), 1.0, "infinite"),
        (torch.zeros(4, dtype=torch.int64), 1.0, "floating"),
        (torch.zeros(4), 0.0, "weight"),
        (torch.zeros(4), -1.0, "weight"),
        (torch.zeros(4), float("nan"), "weight"),
    ],
)
@pytest.mark.parametrize("name", AGGREGATORS)
def test_add_rejects_bad_updates(name, vector, weight, match):
    with make_aggregator(name, 4, capacity=2) as agg, pytest.raises(ValueError, match=match):
        agg.add(vector, weight)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_result_needs_an_update(name):
    with make_aggregator(name, 4, capacity=2) as agg, pytest.raises(ValueError, match="no updates to aggregate"):
        agg.result()


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_row_store_rejects_over_capacity(name):
    with make_aggregator(name, 4, capacity=2) as agg:
        agg.add(vec(ROWS[0]), 1.0)
        agg.add(vec(ROWS[1]), 1.0)
        with pytest.raises(ValueError, match="capacity=2"):
            agg.add(vec(ROWS[2]), 1.0)
        assert agg.count == 2


def test_make_aggregator_builds_each_kind():
    kinds = {"mean": WeightedMean, "median": CoordinateMedian, "trimmed_mean": TrimmedMean,
             "norm_bounded_mean": RelativeNormBoundedMean, "task_arithmetic": TaskArithmetic, "ties": TiesMerge,
             "dare": DareMerge}
    assert set(kinds) == set(AGGREGATORS)
    for name, cls in kinds.items():
        with make_aggregator(name, 4, capacity=2, trim_beta=0.25, norm_bound=2.0) as agg:
            assert type(agg) is cls
    with make_aggregator("norm_bounded_mean", 4, capacity=2, norm_bound_mode="absolute") as agg:
        assert type(agg) is NormBoundedMean
    with pytest.raises(ValueError, match=r"'krum'.*median"):
        make_aggregator("krum", 4, capacity=2)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WeightedMean(0), "dim"),
        (lambda: NormBoundedMean(4, 0.0), "bound"),
        (lambda: CoordinateMedian(4, capacity=0), "capacity"),
        (lambda: TrimmedMean(4, capacity=3, beta=0.5), "beta"),
        (lambda: TrimmedMean(4, capacity=3, beta=-0.1), "beta"),
    ],
)
def test_constructors_reject_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --- server optimizer --------------------------------------------------------------------------------

D1, D2 = vec([1.0, -2.0]), vec([0.5, 0.0])


def test_server_opt_none_is_lr_times_delta():
    opt = ServerOptimizer("none", lr=0.3)
    torch.testing.assert_close(opt.step(D1), 0.3 * D1)
    torch.testing.assert_close(opt.step(D2), 0.3 * D2)


def test_fedavgm_two_steps():
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    torch.testing.assert_close(opt.step(D1), vec([0.5, -1.0]))  # v = [1, -2]
    torch.testing.assert_close(opt.step(D2), vec([0.7, -0.9]))  # v = 0.9 [1, -2] + [0.5, 0] = [1.4, -1.8]


def test_fedadam_two_steps():
    opt = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # m = 0.1 [1, -2] = [0.1, -0.2];  v = 0.01 [1, 4] = [0.01, 0.04]
    expected1 = 0.1 * vec([0.1 / (0.1 + 1e-3), -0.2 / (0.2 + 1e-3)])
    torch.testing.assert_close(opt.step(D1), expected1)
    # m = 0.9 [0.1, -0.2] + 0.1 [0.5, 0] = [0.14, -0.18];  v = 0.99 [0.01, 0.04] + 0.01 [0.25, 0] = [0.0124, 0.0396]
    expected2 = 0.1 * vec([0.14 / (math.sqrt(0.0124) + 1e-3), -0.18 / (math.sqrt(0.0396) + 1e-3)])
    torch.testing.assert_close(opt.step(D2), expected2)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam"])
def test_server_opt_state_dict_round_trip(kind):
    reference = ServerOptimizer(kind, lr=0.1)
    reference.step(D1)
    restored = ServerOptimizer(kind, lr=0.1)
    restored.load_state_dict(reference.state_dict())
    assert restored.steps == 1
    torch.testing.assert_close(restored.step(D2), reference.step(D2))
    with pytest.raises(ValueError, match="kind"):
        ServerOptimizer("none").load_state_dict(reference.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sgd"}, "kind"),
        ({"lr": 0.0}, "lr"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"tau": 0.0}, "tau"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_server_opt_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerOptimizer(**kwargs)


def test_server_opt_rejects_bad_delta():
    opt = ServerOptimizer("fedadam")
    opt.step(D1)
    with pytest.raises(ValueError, match="length 3"):
        opt.step(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        opt.step(vec([float("nan"), 0.0]))


# --- central DP --------------------------------------------------------------------------------------


def test_central_dp_clips_to_the_bound():
    dp = CentralDP(clip=5.0, noise_multiplier=1.0)
    kept, clipped = dp.clip_vector(vec([3.0, 4.0, 0.0, 0.0]))  # norm 5: at the bound
    assert not clipped
    torch.testing.assert_close(kept, vec([3.0, 4.0, 0.0, 0.0]))
    scaled, clipped = dp.clip_vector(vec([0.0, 0.0, 6.0, 8.0]))  # norm 10
    assert clipped
    torch.testing.assert_close(scaled, vec([0.0, 0.0, 3.0, 4.0]))


def test_noisy_mean_with_negligible_noise_is_the_mean():
    dp = CentralDP(clip=5.0, noise_multiplier=1e-9)
    torch.testing.assert_close(dp.noisy_mean(vec([3.0, 6.0, 9.0, 12.0]), 3), vec([1.0, 2.0, 3.0, 4.0]))


def test_noisy_mean_noise_std_is_z_clip_over_the_expected_participants():
    dp = CentralDP(clip=2.0, noise_multiplier=1.5, noise=SeededNoise(0))
    noise = dp.noisy_mean(torch.zeros(200_000), expected_participants=3)  # std 1.5 * 2 / 3 = 1
    assert abs(float(noise.std()) - 1.0) < 0.02
    assert abs(float(noise.mean())) < 0.01
    again = CentralDP(clip=2.0, noise_multiplier=1.5, noise=SeededNoise(0))
    torch.testing.assert_close(noise, again.noisy_mean(torch.zeros(200_000), expected_participants=3))  # seeded


def test_secret_noise_differs_between_instances_and_calls():
    dp = CentralDP(clip=1.0, noise_multiplier=1.0)
    a, b = dp.noisy_mean(torch.zeros(8), 1), dp.noisy_mean(torch.zeros(8), 1)
    c = CentralDP(clip=1.0, noise_multiplier=1.0).noisy_mean(torch.zeros(8), 1)
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_poisson_sampling_of_organizations_is_independent_at_rate_q():
    dp = CentralDP(clip=1.0, noise_multiplier=1.0)
    nodes = list(range(4000))
    first, second = dp.sample(nodes, 0.25), dp.sample(nodes, 0.25)
    assert abs(len(first) - 1000) < 5 * math.sqrt(4000 * 0.25 * 0.75)  # Binomial(4000, 0.25): 5 sigma
    assert first != second and set(first) <= set(nodes)
    assert dp.sample(nodes, 1.0) == nodes


def test_round_epsilon_matches_the_rdp_conversion_by_hand():
    # Gaussian mechanism, no subsampling: RDP(α) = α / (2 z²); Opacus converts with
    # ε = min_α RDP(α) + log((α-1)/α) - (log δ + log α) / (α - 1) over its default orders.
    z, delta = 1.3, 1e-5
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    by_hand = min(a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders)
    got = CentralDP(clip=1.0, noise_multiplier=z, delta=delta).record_round(1.0)["dp-central-round-epsilon"]
    assert got == pytest.approx(by_hand, rel=1e-9)


def test_accountant_state_round_trips_and_refuses_another_mechanism():
    dp = CentralDP(clip=1.0, noise_multiplier=1.0)
    dp.record_round(0.5)
    dp.record_round(0.5)
    resumed = CentralDP(clip=1.0, noise_multiplier=1.0)
    resumed.load_state_dict(dp.state_dict())
    assert resumed.record_round(0.5)["dp-central-run-epsilon"] == pytest.approx(dp.record_round(0.5)[
        "dp-central-run-epsilon"])
    with pytest.raises(ValueError, match="central DP state"):
        CentralDP(clip=2.0, noise_multiplier=1.0).load_state_dict(dp.state_dict())


def test_run_epsilon_grows_and_starts_at_the_round_epsilon():
    dp = CentralDP(clip=1.0, noise_multiplier=1.0, delta=1e-5)
    first = dp.record_round(sample_rate=0.5)
    assert first["dp-central-run-epsilon"] == pytest.approx(first["dp-central-round-epsilon"])
    second = dp.record_round(sample_rate=0.5)
    assert second["dp-central-round-epsilon"] == pytest.approx(first["dp-central-round-epsilon"])
    assert second["dp-central-run-epsilon"] > first["dp-central-run-epsilon"]
    assert second["dp-central-sigma"] == 1.0 and second["dp-delta"] == 1e-5
    assert set(second) == {"dp-central-round-epsilon", "dp-central-run-epsilon", "dp-central-sigma",
                           "dp-central-noise-multiplier", "dp-central-clip", "dp-delta"}


def test_more_noise_spends_less_epsilon():
    low = CentralDP(clip=1.0, noise_multiplier=1.0).record_round(sample_rate=1.0)
    high = CentralDP(clip=1.0, noise_multiplier=2.0).record_round(sample_rate=1.0)
    assert high["dp-central-round-epsilon"] < low["dp-central-round-epsilon"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip": 0.0, "noise_multiplier": 1.0}, "clip"),
        ({"clip": 1.0, "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
    ],
)
def test_central_dp_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CentralDP(**kwargs)


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_record_round_rejects_bad_sample_rate(rate):
    with pytest.raises(ValueError, match="sample_rate"):
        CentralDP(clip=1.0, noise_multiplier=1.0).record_round(rate)
