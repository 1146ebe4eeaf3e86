"""LGR / PGR bookkeeping on hand-computed values."""

from __future__ import annotations

import math

import pytest

from fedgt.core.metrics import gain_ratio, per_domain, pooled_ratio, summarize


def test_gain_ratio_by_hand() -> None:
    assert gain_ratio(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert gain_ratio(1.5, 2.0, 1.0) == pytest.approx(0.5)  # loss: lower is better, same formula
    assert gain_ratio(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)  # worse than the floor is negative
    assert math.isnan(gain_ratio(0.3, 0.2, 0.2))


def test_pooled_ratio_weighs_domains_by_their_gain() -> None:
    # Domain 1 gains 0.6 (recovered 0.3), domain 2 gains 0.1 (recovered 0.1): (0.3 + 0.1) / (0.6 + 0.1).
    assert pooled_ratio([0.5, 0.3], [0.2, 0.2], [0.8, 0.3]) == pytest.approx(0.4 / 0.7)


def test_summarize_and_per_domain() -> None:
    domains = {
        "a": {"llm_base": {"loss": 2.0, "exact_match": 0.0}, "llm_ft": {"loss": 1.0, "exact_match": 0.8},
              "tiny_ft": {"loss": 1.8, "exact_match": 0.1}, "gt": {"loss": 1.4, "exact_match": 0.5}},
        "b": {"llm_base": {"loss": 3.0, "exact_match": 0.2}, "llm_ft": {"loss": 1.0, "exact_match": 0.6},
              "tiny_ft": {"loss": 2.0, "exact_match": 0.2}, "gt": {"loss": 2.0, "exact_match": 0.2}},
    }
    s = summarize(domains, ["gt", "llm_base", "llm_ft"])
    assert s["gt"]["lgr"] == pytest.approx((0.6 + 1.0) / (1.0 + 2.0))
    assert s["gt"]["lgr_acc"] == pytest.approx((0.5 + 0.0) / (0.8 + 0.4))
    assert s["gt"]["pgr"] == pytest.approx((0.4 + 0.0) / (0.8 + 1.0))
    assert s["gt"]["pgr_acc"] == pytest.approx((0.4 + 0.0) / (0.7 + 0.4))
    assert s["gt"]["acc"] == pytest.approx(0.35) and s["gt"]["loss"] == pytest.approx(1.7)
    assert s["llm_base"]["lgr"] == 0 and s["llm_ft"]["lgr_acc"] == 1
    d = per_domain(domains["a"], "gt")
    assert d["lgr"] == pytest.approx(0.6) and d["pgr_acc"] == pytest.approx(0.4 / 0.7)
