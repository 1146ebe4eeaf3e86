"""output.tracking: the per-round metrics as TensorBoard events, read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the tracking extra (in dev)

from fedgt.server.tracking import Tracker, round_scalars

ROWS = [{"round": 0, "eval": {"org-loss": 2.0, "orgs": {"org-a": {"loss": 2.1}}}},
        {"round": 1, "eval": {"org-loss": 1.5, "lgr": float("nan"), "orgs": {"org-a": {"loss": 1.4}}}, "eval_s": 0.5,
         "own": {"own-loss": 1.2}, "log": {"accepted": [1, 2], "rejected": [], "declined": [{"node": 3}],
                                           "server_s": 0.25, "metrics": {"dp-epsilon-total-max": 4.0}}},
        {"round": 2, "eval": {"org-loss": 1.25, "orgs": {"org-a": {"loss": 1.3}}}}]


def _read(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return events


def test_every_round_s_scalars_reach_tensorboard(tmp_path) -> None:
    tracker = Tracker("tensorboard", tmp_path, {"train.lr": 0.01})
    for row in ROWS:
        tracker.log_round(row)
    tracker.close()
    events = _read(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("llm/org-loss")] == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert [e.value for e in events.Scalars("org/org-a/loss")] == pytest.approx([2.1, 1.4, 1.3])
    assert events.Scalars("replies/declined")[0].value == 1 and events.Scalars("privacy/dp-epsilon-total-max")
    assert "llm/lgr" not in events.Tags()["scalars"]  # NaN is not a point
    assert "run_config" in str(events.Tags())
    assert set(round_scalars(ROWS[1])) >= {"own_adapter/own-loss", "time/server_s", "time/eval_s"}


def test_a_resumed_run_replaces_the_rounds_a_killed_run_wrote(tmp_path) -> None:
    first = Tracker("tensorboard", tmp_path, {})
    for row in ROWS:  # rounds 0..2 logged, then the run died before checkpointing round 2
        first.log_round(row)
    first.close()
    resumed = Tracker("tensorboard", tmp_path, {}, first_round=2)
    resumed.log_round({"round": 2, "eval": {"org-loss": 1.0}})
    resumed.close()
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("llm/org-loss")] == [(0, 2.0), (1, 1.5), (2, 1.0)]


def test_tracking_is_off_by_default_and_a_bad_value_is_named(tmp_path) -> None:
    Tracker("", tmp_path, {}).log_round(ROWS[0])
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ValueError, match="output.tracking"):
        Tracker("wandb", tmp_path, {})


def test_tensorboard_without_its_package_fails_before_a_run_starts(monkeypatch) -> None:
    import importlib.util

    from fedgt.core.run_config import ConfigError, from_run_config

    assert from_run_config({"output.tracking": "tensorboard"}).output.tracking == "tensorboard"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"output.tracking.*pip install -e '.\[tracking\]'"):
        from_run_config({"output.tracking": "tensorboard"})
    assert from_run_config({"output.tracking": "tensorboard"}, check_paths=False)  # a site needs no tensorboard
