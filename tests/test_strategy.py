"""GradTransformerStrategy on hand-made replies: FedAvg equivalence, validation, modes, round schemes, central DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedgt.core.lora import LoraSettings
from fedgt.core.updates import UpdateSpec, flatten, to_array_record
from strategies.central_dp import CentralDP
from strategies.grad_transformer import GradTransformerStrategy
from strategies.server_opt import ServerOptimizer

KEYS = [f"model.layers.{i}.self_attn.q_proj.lora_{f}.weight" for i in range(2) for f in "AB"]
SHAPES = {k: (2, 4) if "lora_A" in k else (4, 2) for k in KEYS}
SPEC = UpdateSpec.from_parameters({k: torch.zeros(s) for k, s in SHAPES.items()})
INIT = {k: (torch.randn(s, generator=torch.Generator().manual_seed(1)) if "lora_A" in k else torch.zeros(s))
        for k, s in SHAPES.items()}


@pytest.fixture(autouse=True)
def _flower_task_identity(monkeypatch) -> None:
    """Messages are normally built inside a Flower run, which sets the run id; outside one, set it."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def update(seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    if error is not None:
        return Message(error=Error(code=1, reason=error), reply_to=instruction)
    return Message(content, reply_to=instruction)


def good(node: int, upd: dict, n: int) -> Message:
    return reply(node, RecordDict({"arrays": to_array_record(upd, SPEC), "metrics": MetricRecord({"num-examples": n})}))


# What these unit tests exercise unless they say otherwise: one plain mean of LoRA factors, folded in each round,
# weights taken as reported, a round made by any one reply (the run config's defaults are in tests/test_one_config).
UNIT = {"aggregator": "mean", "rounds": "merge", "space": "factors", "max_num_examples": math.inf,
        "max_weight_ratio": math.inf, "min_replies": 1}


def strategy(**kw) -> GradTransformerStrategy:
    return GradTransformerStrategy(translate=lambda x: x.clone(), tiny_spec=SPEC, llm_spec=SPEC, tiny_init=INIT,
                                   llm_init=INIT, lora=LoraSettings(), **{**UNIT, **kw})


def test_identity_map_equals_flower_fedavg_of_the_updates() -> None:
    updates, sizes = [update(s) for s in range(3)], [10, 30, 60]
    replies = [good(i + 1, u, n) for i, (u, n) in enumerate(zip(updates, sizes, strict=True))]
    s = strategy(rounds="naive")
    s.aggregate_train(1, replies)
    fedavg, _ = FedAvg().aggregate_train(1, replies)
    expected = {k: INIT[k] + torch.from_numpy(a.numpy()) for k, a in fedavg.items()}
    for k in KEYS:
        torch.testing.assert_close(s.llm.current[k], expected[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(s.tiny.current[k], expected[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean", "norm_bounded_mean"])
def test_both_orders_agree_under_the_identity_map(aggregator: str) -> None:
    replies = [good(i + 1, update(i), 10 * (i + 1)) for i in range(5)]
    a = strategy(mode="transform-then-aggregate", aggregator=aggregator, gt_batch_size=2, rounds="naive")
    b = strategy(mode="aggregate-then-transform", aggregator=aggregator, rounds="naive")
    a.aggregate_train(1, replies)
    b.aggregate_train(1, replies)
    for k in KEYS:
        torch.testing.assert_close(a.llm.current[k], b.llm.current[k], atol=1e-6, rtol=0)
    if aggregator == "median":
        stacked = torch.stack([flatten(update(i), SPEC) for i in range(5)])
        torch.testing.assert_close(flatten({k: a.llm.current[k] - INIT[k] for k in KEYS}, SPEC),
                                   stacked.median(0).values, atol=1e-6, rtol=0)


def test_bad_replies_are_left_out_with_their_reasons_and_the_round_goes_on() -> None:
    u1, u2 = update(1), update(2)
    nan = {**update(3), KEYS[0]: torch.full(SHAPES[KEYS[0]], math.nan)}
    wrong_shape = ArrayRecord({k: Array(np.zeros((3, 3), np.float32)) for k in KEYS})
    declined = reply(9, RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1}),
                                    "decline": ConfigRecord({"reason": "privacy budget: over"})}))
    replies = [
        good(1, u1, 10), good(2, u2, 30),
        good(3, nan, 10),
        reply(4, RecordDict({"arrays": wrong_shape, "metrics": MetricRecord({"num-examples": 5})})),
        reply(5, RecordDict({"arrays": to_array_record(u1, SPEC)})),
        reply(6, error="client crashed"),
        good(7, u1, 0),
        good(8, update(4, scale=1e3), 10),
        declined,
    ]
    s = strategy(rounds="naive", max_update_norm=50.0)
    arrays, metrics = s.aggregate_train(3, replies)
    assert arrays is not None
    assert (metrics["accepted"], metrics["rejected"], metrics["declined"]) == (2, 6, 1)
    assert metrics["rejected-nonfinite"] == 1 and metrics["rejected-norm"] == 1
    reasons = {r["node"]: r["reason"] for r in s.round_log[3]["rejected"]}
    assert "not finite" in reasons[3] and "shape" in reasons[4] and "metrics" in reasons[5]
    assert "client crashed" in reasons[6] and "num-examples" in reasons[7] and "max-update-norm" in reasons[8]
    assert s.round_log[3]["declined"] == [{"node": 9, "reason": "privacy budget: over"}]
    for k in KEYS:
        torch.testing.assert_close(s.llm.current[k], INIT[k] + (10 * u1[k] + 30 * u2[k]) / 40, atol=1e-6, rtol=0)


def test_no_usable_reply_keeps_the_models() -> None:
    s = strategy()
    arrays, metrics = s.aggregate_train(1, [reply(1, error="boom")])
    assert arrays is None and metrics["accepted"] == 0
    assert all(torch.equal(s.llm.current[k], INIT[k]) for k in KEYS) and s.llm.merged == []


def test_merge_rounds_fold_into_the_base_and_restart_at_the_init() -> None:
    s = strategy(rounds="merge")
    s.aggregate_train(1, [good(1, update(1), 10)])
    s.aggregate_train(2, [good(1, update(2), 10)])
    assert len(s.llm.merged) == 2 and all(torch.equal(s.llm.current[k], INIT[k]) for k in KEYS)
    torch.testing.assert_close(s.llm.merged[1][KEYS[1]], INIT[KEYS[1]] + update(2)[KEYS[1]])
    base = s.tiny.base_factors()
    assert base[KEYS[0]].shape == (4, 4) and base[KEYS[1]].shape == (4, 4)  # rank 2 x 2 rounds


def test_central_dp_noises_the_clipped_mean_once_and_accounts() -> None:
    replies = [good(i + 1, update(i), 10 * (i + 1)) for i in range(4)]
    s = strategy(mode="aggregate-then-transform", rounds="naive",
                 central_dp=CentralDP(clip=100.0, noise_multiplier=1e-9))
    s.expected_participants[1] = 4.0  # what configure_train fixes: q * N connected organizations
    _, metrics = s.aggregate_train(1, replies)
    mean = {k: sum(update(i)[k] for i in range(4)) / 4 for k in KEYS}  # uniform weights under DP
    for k in KEYS:
        torch.testing.assert_close(s.llm.current[k], INIT[k] + mean[k], atol=1e-5, rtol=0)
    assert metrics["dp-central-run-epsilon"] > 0
    with pytest.raises(ValueError, match="central DP"):
        strategy(mode="transform-then-aggregate", central_dp=CentralDP(1.0, 1.0))


def test_central_dp_divides_by_the_participants_expected_before_the_round_not_the_replies() -> None:
    # 8 organizations connected, q = 1: the denominator is fixed at 8 when the round is configured. Only 4 reply;
    # dividing by 4 would make the noise scale (and the sensitivity) depend on who happened to reply.
    s = strategy(mode="aggregate-then-transform", rounds="naive",
                 central_dp=CentralDP(clip=100.0, noise_multiplier=1e-9))
    s.expected_participants[1] = 8.0
    s.aggregate_train(1, [good(i + 1, update(i), 10) for i in range(4)])
    for k in KEYS:
        expected = INIT[k] + sum(update(i)[k] for i in range(4)) / 8
        torch.testing.assert_close(s.llm.current[k], expected, atol=1e-5, rtol=0)


def test_central_dp_noises_and_accounts_a_round_nobody_answered() -> None:
    # Skipping an empty round would reveal that nobody was sampled or answered: the mechanism runs regardless.
    s = strategy(mode="aggregate-then-transform", rounds="naive", central_dp=CentralDP(clip=1.0, noise_multiplier=1.0))
    s.expected_participants[1] = 2.0
    _, metrics = s.aggregate_train(1, [])
    assert metrics["dp-central-run-epsilon"] > 0 and len(s.central_dp.history) == 1
    assert any(not torch.equal(s.llm.current[k], INIT[k]) for k in KEYS)  # noise moved the model
    with pytest.raises(ValueError, match="expected participants"):
        s.aggregate_train(2, [good(1, update(1), 10)])  # a round nobody configured has no fixed denominator


def test_a_claimed_num_examples_weighs_at_most_max_num_examples() -> None:
    s = strategy(rounds="naive", max_num_examples=20)
    s.aggregate_train(1, [good(1, update(1), 10), good(2, update(2), 10**9)])  # the claim is clipped to 20
    for k in KEYS:
        expected = INIT[k] + (10 * update(1)[k] + 20 * update(2)[k]) / 30
        torch.testing.assert_close(s.llm.current[k], expected, atol=1e-6, rtol=0)


def test_server_optimizer_scales_the_llm_step() -> None:
    s = strategy(rounds="naive", server_opt=ServerOptimizer("none", lr=0.5))
    s.aggregate_train(1, [good(1, update(1), 10)])
    for k in KEYS:
        torch.testing.assert_close(s.llm.current[k], INIT[k] + 0.5 * update(1)[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(s.tiny.current[k], INIT[k] + update(1)[k], atol=1e-6, rtol=0)


def test_retranslate_rounds_map_the_whole_adapter_each_round() -> None:
    s = strategy(rounds="retranslate")
    s.aggregate_train(1, [good(1, update(1), 10), good(2, update(2), 10)])
    s.aggregate_train(2, [good(1, update(3), 10)])
    # Identity GT: the LLM adapter is the image of the TinyLM's whole adapter, never a sum of per-round images.
    for k in KEYS:
        torch.testing.assert_close(s.llm.current[k], s.tiny.current[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(s.tiny.current[k], INIT[k] + (update(1)[k] + update(2)[k]) / 2 + update(3)[k],
                                   atol=1e-6, rtol=0)
    assert s.llm.merged == [] and s.tiny.base_factors() == {}


def test_retranslate_feeds_the_gt_the_adapter_relative_to_the_init() -> None:
    seen = []
    s = GradTransformerStrategy(translate=lambda x: seen.append(x.clone()) or torch.zeros_like(x), tiny_spec=SPEC,
                                llm_spec=SPEC, tiny_init=INIT, llm_init=INIT, lora=LoraSettings(),
                                **{**UNIT, "rounds": "retranslate", "mode": "aggregate-then-transform"})
    s.aggregate_train(1, [good(1, update(1), 10)])
    s.aggregate_train(2, [good(1, update(2), 10)])
    expected = flatten({k: update(1)[k] + update(2)[k] for k in KEYS}, SPEC)
    torch.testing.assert_close(seen[1][0], expected, atol=1e-6, rtol=0)


def test_weights_space_aggregates_the_exact_mean_weight_change() -> None:
    from fedgt.server.global_adapter import dense_change, dense_to_vector

    lora = LoraSettings()
    ups, sizes = [update(s) for s in range(3)], [10, 30, 60]
    s = strategy(space="weights", rounds="retranslate")
    s.aggregate_train(1, [good(i + 1, u, n) for i, (u, n) in enumerate(zip(ups, sizes, strict=True))])
    expected = sum(n / 100 * dense_to_vector(dense_change({k: INIT[k] + u[k] for k in KEYS}, SPEC, lora.scaling), SPEC)
                   for u, n in zip(ups, sizes, strict=True))
    torch.testing.assert_close(s.llm_dense, expected, atol=1e-5, rtol=0)
    factor_mean = dense_to_vector(dense_change({k: INIT[k] + sum(n / 100 * u[k] for u, n in zip(ups, sizes,
                                                strict=True)) for k in KEYS}, SPEC, lora.scaling), SPEC)
    assert not torch.allclose(expected, factor_mean, atol=1e-4)  # the two spaces really differ
    with pytest.raises(ValueError, match="retranslate"):
        strategy(space="weights", rounds="merge")


def _dense(u: dict) -> torch.Tensor:
    from fedgt.server.global_adapter import dense_change, dense_to_vector

    return dense_to_vector(dense_change({k: INIT[k] + u[k] for k in KEYS}, SPEC, LoraSettings().scaling), SPEC)


def test_task_arithmetic_sums_the_weight_changes_times_the_scale_and_keeps_the_tiny_mean() -> None:
    ups, sizes = [update(s) for s in range(3)], [10, 30, 60]
    s = strategy(space="weights", rounds="retranslate", aggregator="task_arithmetic", merge_scale=0.3)
    s.aggregate_train(1, [good(i + 1, u, n) for i, (u, n) in enumerate(zip(ups, sizes, strict=True))])
    torch.testing.assert_close(s.llm_dense, 0.3 * sum(_dense(u) for u in ups), atol=1e-5, rtol=0)
    tiny_mean = {k: INIT[k] + sum(n / 100 * u[k] for u, n in zip(ups, sizes, strict=True)) for k in KEYS}
    for k in KEYS:  # the TinyLM adapter organizations start from stays FedAvg
        torch.testing.assert_close(s.tiny.current[k], tiny_mean[k], atol=1e-6, rtol=0)


def test_distill_gives_the_teachers_and_the_tiny_updates_and_applies_the_joint_update() -> None:
    ups = [update(s) for s in range(3)]
    seen = {}
    joint = update(9)

    def distill(teachers: torch.Tensor, tiny: torch.Tensor) -> torch.Tensor:
        seen["teachers"], seen["tiny"] = teachers, tiny
        return flatten(joint, SPEC)

    s = strategy(space="weights", rounds="retranslate", aggregator="distill", distill=distill)
    s.aggregate_train(1, [good(i + 1, u, 10) for i, u in enumerate(ups)])
    expected = torch.stack([flatten(u, SPEC) for u in ups])  # identity GT: each teacher is its own update
    torch.testing.assert_close(seen["teachers"], expected)
    torch.testing.assert_close(seen["tiny"], expected)
    torch.testing.assert_close(s.llm_dense, _dense(joint), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="distill"):
        strategy(aggregator="distill", mode="aggregate-then-transform", distill=distill)
    with pytest.raises(ValueError, match="distill"):
        strategy(aggregator="distill")


def test_each_organization_keeps_its_own_llm_update_alone_and_on_the_shared_llm() -> None:
    ups = [update(s) for s in range(3)]
    s = strategy(space="weights", rounds="retranslate")
    s.aggregate_train(1, [good(i + 1, u, 10) for i, u in enumerate(ups)])
    assert sorted(s.org_llm) == [1, 2, 3]
    from fedgt.server.global_adapter import dense_to_vector

    own = dense_to_vector(s.org_weight_change(2), SPEC)
    torch.testing.assert_close(own, _dense(ups[1]), atol=1e-6, rtol=0)
    on_shared = dense_to_vector(s.org_weight_change(2, on_shared=True), SPEC)
    torch.testing.assert_close(on_shared, s.llm_dense + _dense(ups[1]), atol=1e-6, rtol=0)
    with pytest.raises(KeyError, match="node 7"):
        s.org_weight_change(7)


def test_a_failed_consolidation_falls_back_to_the_mean_and_the_round_goes_on() -> None:
    ups, sizes = [update(s) for s in range(3)], [10, 30, 60]

    def distill(teachers: torch.Tensor, tiny: torch.Tensor) -> torch.Tensor:
        raise ValueError("consolidation: no teacher finished an answer")

    s = strategy(space="weights", rounds="retranslate", aggregator="distill", distill=distill)
    _, metrics = s.aggregate_train(1, [good(i + 1, u, n) for i, (u, n) in enumerate(zip(ups, sizes, strict=True))])
    expected = sum(n / 100 * _dense(u) for u, n in zip(ups, sizes, strict=True))
    torch.testing.assert_close(s.llm_dense, expected, atol=1e-5, rtol=0)
    assert metrics["distill-fallback"] == 1.0


def test_fresh_rounds_keep_the_tinylm_at_the_init_and_rederive_the_llm_each_round() -> None:
    s = strategy(space="weights", rounds="fresh")
    s.aggregate_train(1, [good(i + 1, update(i), 10) for i in range(2)])
    for k in KEYS:  # organizations start every round from the seeded init
        torch.testing.assert_close(s.tiny.current[k], INIT[k])
    s.aggregate_train(2, [good(i + 1, update(10 + i), 10) for i in range(2)])
    expected = (_dense(update(10)) + _dense(update(11))) / 2  # round 2's updates only, no memory of round 1
    torch.testing.assert_close(s.llm_dense, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ do no harm

CURATED = torch.stack([flatten(update(s), SPEC) for s in range(10)])  # the GT's training updates (Ls, Ds) each
NEAR = {k: v + 1e-3 for k, v in update(0).items()}  # next to a curated update: inside coverage
FAR = update(99, scale=5.0)  # fifty times the curated spread: outside


def coverage():
    from fedgt.provider.coverage import Coverage

    return Coverage.fit(CURATED.mean(0), CURATED.std(0), CURATED)


def test_coverage_scores_each_update_and_logs_it_per_node() -> None:
    cov = coverage()
    s = strategy(rounds="naive", coverage=cov, out_of_coverage="apply")
    _, metrics = s.aggregate_train(1, [good(1, NEAR, 10), good(2, FAR, 10)])
    scores = s.round_log[1]["coverage"]
    assert scores[1] < 0.1 and scores[2] > 5 and s.round_log[1]["out-of-coverage"] == [2]
    assert scores[2] == pytest.approx(float(cov(flatten(FAR, SPEC)[None])[0]))
    assert metrics["out-of-coverage"] == 1 and metrics["coverage-max"] == pytest.approx(scores[2])


@pytest.mark.parametrize("action", ["skip", "shrink", "apply"])
def test_an_update_outside_coverage_is_skipped_shrunk_or_applied(action: str) -> None:
    s = strategy(rounds="naive", coverage=coverage(), out_of_coverage=action, coverage_threshold=1.0)
    s.aggregate_train(1, [good(1, NEAR, 10), good(2, FAR, 30)])
    far_scale = {"skip": 0.0, "shrink": 1.0 / s.coverage_scores[2], "apply": 1.0}[action]
    for k in KEYS:  # identity GT: the LLM update is the weighted mean of (scaled) updates
        llm = (10 * NEAR[k] + 30 * far_scale * FAR[k]) / 40 if action != "skip" else NEAR[k]
        tiny = (10 * NEAR[k] + 30 * FAR[k]) / 40 if action != "skip" else NEAR[k]  # shrink scales the LLM side only
        torch.testing.assert_close(s.llm.current[k], INIT[k] + llm, atol=1e-6, rtol=0)
        torch.testing.assert_close(s.tiny.current[k], INIT[k] + tiny, atol=1e-6, rtol=0)
    if action == "shrink":
        assert s.round_log[1]["coverage-scale"] == {2: pytest.approx(far_scale)} and 0 < far_scale < 0.2


def test_shrink_in_aggregate_then_transform_scales_the_tinylm_update_entering_the_aggregate() -> None:
    s = strategy(rounds="naive", mode="aggregate-then-transform", coverage=coverage(), out_of_coverage="shrink")
    s.aggregate_train(1, [good(1, NEAR, 10), good(2, FAR, 10)])
    c = 1.0 / s.coverage_scores[2]
    for k in KEYS:
        torch.testing.assert_close(s.llm.current[k], INIT[k] + (NEAR[k] + c * FAR[k]) / 2, atol=1e-6, rtol=0)


def test_when_every_update_is_outside_coverage_the_llm_is_unchanged_and_the_round_says_so() -> None:
    s = strategy(space="weights", rounds="fresh", coverage=coverage())  # skip: the default
    arrays, metrics = s.aggregate_train(1, [good(1, FAR, 10), good(2, update(98, scale=5.0), 10)])
    assert arrays is None and metrics["llm-unchanged"] == 1.0 and metrics["out-of-coverage"] == 2
    assert s.round_log[1]["llm-unchanged"] and torch.count_nonzero(s.llm_dense) == 0


def test_each_node_gets_its_own_coverage_score_with_its_next_train_message() -> None:
    from fedgt.core.run_config import COVERAGE_KEY

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3]

    s = strategy(rounds="naive", coverage=coverage(), min_available_nodes=3)
    s.aggregate_train(1, [good(1, NEAR, 10), good(2, FAR, 10)])  # node 3 did not take part
    messages = {m.metadata.dst_node_id: m for m in s.configure_train(2, s.current_arrays(), ConfigRecord({}), Grid())}
    sent = {n: m.content["config"].get(COVERAGE_KEY) for n, m in messages.items()}
    assert sent == {1: pytest.approx(s.coverage_scores[1]), 2: pytest.approx(s.coverage_scores[2]), 3: None}
    assert all(m.content["config"]["server-round"] == 2 for m in messages.values())


def _distance_to(target: dict[str, torch.Tensor]):
    """A public validation loss: the LLM adapter's squared distance to a target adapter."""
    def public_loss(adapter, dense) -> float:
        if dense is not None:
            return float((dense_vector(dense) - _dense(target)).square().sum())
        return float(sum((adapter.current[k] - INIT[k] - target[k]).square().sum() for k in KEYS))
    return public_loss


def dense_vector(dense: dict[str, torch.Tensor]) -> torch.Tensor:
    from fedgt.server.global_adapter import dense_to_vector

    return dense_to_vector(dense, SPEC)


@pytest.mark.parametrize(("space", "rounds"), [("factors", "naive"), ("weights", "retranslate")])
def test_a_round_that_worsens_public_validation_is_rolled_back(space: str, rounds: str) -> None:
    target = update(1)
    s = strategy(space=space, rounds=rounds, public_loss=_distance_to(target),
                 server_opt=ServerOptimizer("fedavgm", lr=1.0))
    untuned = _distance_to(target)(s.llm, s.llm_weight_change())
    _, first = s.aggregate_train(1, [good(1, {k: 0.5 * v for k, v in target.items()}, 10)])  # halfway: better
    assert first["round-accepted"] == 1.0 and first["candidate-public-loss"] < untuned
    kept = ({k: v.clone() for k, v in s.llm.current.items()}, {k: v.clone() for k, v in s.tiny.current.items()},
            None if s.llm_dense is None else s.llm_dense.clone(), s.server_opt.state_dict()["m"].clone())
    _, second = s.aggregate_train(2, [good(1, update(7, scale=1.0), 10)])  # elsewhere: worse
    log = s.round_log[2]
    assert log["round-accepted"] is False and second["round-accepted"] == 0.0 and second["llm-unchanged"] == 1.0
    assert log["candidate-public-loss"] > log["accepted-public-loss"] == pytest.approx(first["candidate-public-loss"])
    for k in KEYS:  # both shared models, the weight change and the server optimizer's momentum as before the round
        assert torch.equal(s.llm.current[k], kept[0][k]) and torch.equal(s.tiny.current[k], kept[1][k])
    assert kept[2] is None or torch.equal(s.llm_dense, kept[2])
    assert torch.equal(s.server_opt.state_dict()["m"], kept[3])


def test_a_round_within_the_tolerance_is_accepted() -> None:
    target = update(1)
    loss = _distance_to(target)
    s = strategy(rounds="naive", public_loss=loss, accept_tolerance=10.0)
    _, metrics = s.aggregate_train(1, [good(1, update(7, scale=0.2), 10)])
    assert metrics["candidate-public-loss"] > metrics["accepted-public-loss"] and metrics["round-accepted"] == 1.0
    assert s.accepted_public_loss == metrics["candidate-public-loss"]
    with pytest.raises(ValueError, match="accept-tolerance"):
        strategy(accept_tolerance=-1.0)
    with pytest.raises(ValueError, match="out-of-coverage"):
        strategy(out_of_coverage="ignore")
    with pytest.raises(ValueError, match="coverage-threshold"):
        strategy(coverage_threshold=0.0)
