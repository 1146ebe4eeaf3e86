"""Secure aggregation (SecAgg+) in a real `flwr run`: the server only ever holds the mean TinyLM update."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from fedgt.core.run_config import ConfigError, _flatten, from_run_config, pyproject_run_config

ROOT = Path(__file__).resolve().parents[1]


def _scenario(*names: str) -> dict:
    out: dict = {}
    for name in names:
        out.update(_flatten(tomllib.loads((ROOT / "simulations" / name).read_text())))
    return out


def _federate(tmp_path: Path, name: str, **extra) -> list[dict]:
    from fedgt.run.flwr_runner import run_federation

    overrides = {**_scenario("toy.toml", "secagg.toml"), "federation.num-organizations": 3,
                 "strategy.out-of-coverage": "apply", "output.dir": str(tmp_path / name), **extra}
    assert run_federation(ROOT, overrides, tmp_path / f"home-{name}", timeout=600) == 0, \
        (tmp_path / name / "error.txt").read_text() if (tmp_path / name / "error.txt").is_file() else name
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def _weight_changes(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(run / "llm_adapter" / "adapter_model.safetensors")
    return {k: t[k.replace("lora_A", "lora_B")] @ t[k] for k in t if "lora_A" in k}


def test_secure_aggregation_needs_the_mean_of_tinylm_updates() -> None:
    base = {**pyproject_run_config(ROOT / "pyproject.toml"), "strategy.secure-aggregation": True}
    with pytest.raises(ConfigError, match="strategy.secure-aggregation"):
        from_run_config(base)  # the default transform-then-aggregate + distill needs each organization's update
    ok = from_run_config({**base, "strategy.mode": "aggregate-then-transform", "strategy.aggregator": "mean"})
    assert ok.strategy.secure_aggregation and ok.strategy.secagg_clip == 8.0
    with pytest.raises(ConfigError, match="strategy.secagg-clip"):
        from_run_config({**base, "strategy.mode": "aggregate-then-transform", "strategy.aggregator": "mean",
                         "strategy.secagg-clip": 0.0})


def test_a_secagg_round_reveals_only_the_sum_and_the_adapter_loads(toy_pair, tmp_path) -> None:
    """3 organizations, 2 rounds under SecAgg+: no reply holds an update the server can read; updates are clipped."""
    from peft import PeftModel

    from fedgt.core.models import load_model

    clip, max_weight = 1e-4, 1000  # SecAgg+ clips w_i * u_i (w_i = n_i / max_weight) to [-clip, clip]
    rows = _federate(tmp_path, "secagg", **{"strategy.secagg-clip": clip, "strategy.max-num-examples": max_weight})
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        log = row["log"]
        assert {k: log["secagg"][k] for k in ("participants", "dropped")} == {"participants": 3, "dropped": 0}
        # The mean sum(clip(w_i u_i)) / sum(w_i) is at most this bound, and reaches it exactly where every site's
        # coordinate was clipped: the clip binds (these updates' largest coordinates are far above it).
        bound = clip * max_weight * 3 / sum(log["secagg"]["num-examples"])
        assert log["secagg"]["max-abs"] == pytest.approx(bound, rel=1e-3)
        assert log["received"] == [] and log["accepted"] == [0]  # one contribution: the unmasked mean
        assert not log.get("llm-unchanged")
    PeftModel.from_pretrained(load_model(toy_pair[1])[0], str(tmp_path / "secagg" / "llm_adapter"))
    assert "3 organizations under SecAgg+" in (tmp_path / "secagg" / "report.html").read_text()  # written by the run


@pytest.mark.slow
def test_secagg_equals_plain_aggregate_then_transform_within_quantisation(toy_pair, tmp_path) -> None:
    """The same federation with and without SecAgg+: the adapters agree up to the [-8, 8] / 2^22 quantisation."""
    secagg = _federate(tmp_path, "secagg")
    plain = _federate(tmp_path, "plain", **{"strategy.secure-aggregation": False})
    assert len(plain[1]["log"]["accepted"]) == 3 and secagg[1]["log"]["secagg"]["max-abs"] < 8.0
    a, b = _weight_changes(tmp_path / "secagg"), _weight_changes(tmp_path / "plain")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].abs().max() > 0
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
