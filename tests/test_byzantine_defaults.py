"""The app's default strategy settings bound what one lying organization can do to a round."""

from __future__ import annotations

import math

import torch
from flwr.app import MetricRecord, RecordDict

from fedgt.core.run_config import FedConfig
from fedgt.core.updates import flatten, to_array_record
from tests.test_strategy import INIT, KEYS, SPEC, _flower_task_identity, reply, strategy, update  # noqa: F401

DEFAULTS = FedConfig().strategy


def app_strategy(**kw):
    """The strategy as the ServerApp builds it from the default run config (the aggregator varies)."""
    return strategy(rounds="naive", max_num_examples=float(DEFAULTS.max_num_examples),
                    max_weight_ratio=DEFAULTS.max_weight_ratio, norm_bound=DEFAULTS.norm_bound,
                    norm_bound_mode=DEFAULTS.norm_bound_mode, trim_beta=DEFAULTS.trim_beta, **kw)


def sent(node: int, upd: dict, n: float, **metrics) -> object:
    return reply(node, RecordDict({"arrays": to_array_record(upd, SPEC),
                                   "metrics": MetricRecord({"num-examples": n, **metrics})}))


def llm_change(s) -> torch.Tensor:
    return flatten({k: s.llm.current[k] - INIT[k] for k in KEYS}, SPEC).reshape(-1)


def honest_mean(n: int) -> torch.Tensor:
    return torch.stack([flat(update(i)) for i in range(n)]).mean(0)


def flat(upd: dict) -> torch.Tensor:
    return flatten(upd, SPEC).reshape(-1)


def test_an_inflated_num_examples_is_capped_at_a_multiple_of_the_median() -> None:
    s = app_strategy(aggregator="mean")
    replies = [sent(i + 1, update(i), 128) for i in range(4)] + [sent(5, update(99), 1e9)]
    _, metrics = s.aggregate_train(1, replies)
    used = DEFAULTS.max_weight_ratio * 128
    assert s.round_log[1]["weight-capped"] == {"5": {"reported": float(DEFAULTS.max_num_examples), "used": used}}
    expected = (128 * sum(flat(update(i)) for i in range(4)) + used * flat(update(99))) \
        / (4 * 128 + used)
    torch.testing.assert_close(llm_change(s), expected, atol=1e-6, rtol=0)
    assert metrics["num-examples"] == 4 * 128 + used


def test_two_organizations_claiming_1e308_examples_do_not_zero_the_round() -> None:
    s = app_strategy(aggregator="mean")
    replies = [sent(i + 1, update(i), 100) for i in range(3)] + [sent(4, update(7), 1e308), sent(5, update(8), 1e308)]
    s.aggregate_train(1, replies)
    change = llm_change(s)
    assert torch.isfinite(change).all() and change.norm() > 0


def test_one_sign_flipped_update_times_100_among_five_is_trimmed_at_the_default_beta() -> None:
    s = app_strategy(aggregator="trimmed_mean")
    attack = {k: -100 * v for k, v in update(0).items()}
    s.aggregate_train(1, [sent(i + 1, update(i), 100) for i in range(4)] + [sent(5, attack, 100)])
    cos = torch.nn.functional.cosine_similarity(llm_change(s), honest_mean(4), dim=0)
    assert cos > 0  # the plain mean would point the other way (cos ~ -1)


def test_the_default_norm_bound_is_relative_to_the_round() -> None:
    # Every contribution is cut to the round's median norm (as FLAME clips): a x100 update pulls like an honest one.
    s = app_strategy(aggregator="norm_bounded_mean")
    big = {k: 100 * v for k, v in update(9).items()}
    s.aggregate_train(1, [sent(i + 1, update(i), 100) for i in range(4)] + [sent(5, big, 100)])
    rows = [flat(update(i)) for i in range(4)] + [flat(big)]
    median = sorted(float(r.norm()) for r in rows)[2]
    expected = sum(r * min(1.0, DEFAULTS.norm_bound * median / float(r.norm())) for r in rows) / 5
    torch.testing.assert_close(llm_change(s), expected, atol=1e-6, rtol=0)
    assert llm_change(s).norm() <= DEFAULTS.norm_bound * median


def test_a_nan_train_loss_does_not_make_the_round_metric_nan() -> None:
    s = app_strategy(aggregator="mean")
    replies = [sent(1, update(1), 100, **{"train-loss": 1.0}), sent(2, update(2), 100, **{"train-loss": 3.0}),
               sent(3, update(3), 100, **{"train-loss": math.nan})]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["train-loss"] == 2.0


def test_a_non_finite_gt_output_rejects_the_round_translation_and_the_run_goes_on() -> None:
    broken = {"on": True}

    def translate(x: torch.Tensor) -> torch.Tensor:
        return x * math.nan if broken["on"] else x.clone()

    for mode in ("transform-then-aggregate", "aggregate-then-transform"):
        s = app_strategy(aggregator="mean", mode=mode)
        s.translate = translate
        broken["on"] = True
        arrays, metrics = s.aggregate_train(1, [sent(i + 1, update(i), 100) for i in range(3)])
        assert arrays is None and metrics["translation-rejected"] == 1.0 and metrics["llm-unchanged"] == 1.0
        assert "not finite" in s.round_log[1]["translation-rejected"]
        assert all((s.llm.current[k] == INIT[k]).all() for k in KEYS)
        broken["on"] = False
        _, metrics = s.aggregate_train(2, [sent(i + 1, update(i), 100) for i in range(3)])
        assert metrics["translation-rejected"] == 0.0 and llm_change(s).norm() > 0
