"""Round checkpoints: atomic, sha256-verified, damaged ones skipped; a resumed strategy equals an unbroken one."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fedgt.server.checkpoint import (
    MANIFEST,
    ResumeError,
    check_same_run,
    latest_checkpoint,
    load_checkpoint,
    prepare_output,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from strategies.server_opt import ServerOptimizer
from tests.test_strategy import KEYS, _flower_task_identity, good, strategy, update  # noqa: F401


def test_checkpoints_round_trip_and_are_listed_with_their_sha256(tmp_path) -> None:
    for rnd in (1, 2):
        save_checkpoint(tmp_path, rnd, {"x": torch.full((3,), float(rnd))})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(manifest) == {"round-1.pt", "round-2.pt"} and all(len(h) == 64 for h in manifest.values())
    assert latest_checkpoint(tmp_path)["round"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed


def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file(tmp_path, caplog) -> None:
    for rnd in (1, 2):
        save_checkpoint(tmp_path, rnd, {"x": torch.arange(1000.0)})
    newest = tmp_path / "round-2.pt"
    data = bytearray(newest.read_bytes())
    data[-100:] = b"\0" * 100  # its tail overwritten
    newest.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"round-2\.pt: sha256 .* differs"):
        load_checkpoint(newest)
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path)["round"] == 1
    assert "round-2.pt" in caplog.text
    (tmp_path / "round-3.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match=r"round-3\.pt: not listed"):
        load_checkpoint(tmp_path / "round-3.pt")
    (tmp_path / MANIFEST).write_text("{ torn")
    with pytest.raises(ResumeError, match="corrupt checkpoint manifest"):
        latest_checkpoint(tmp_path)


def test_a_previous_runs_folder_needs_resume_and_resume_needs_a_run(tmp_path) -> None:
    prepare_output(tmp_path / "new", resume=False)  # absent: fine
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ResumeError, match="holds a previous run; set output.resume"):
        prepare_output(tmp_path / "used", resume=False)
    with pytest.raises(ResumeError, match="no run to resume"):
        prepare_output(tmp_path / "used", resume=True)
    (tmp_path / "used" / "config.json").write_text("{}")
    prepare_output(tmp_path / "used", resume=True)


def test_a_resumed_run_must_keep_its_config(tmp_path) -> None:
    (tmp_path / "run_config.json").write_text(json.dumps({"train.lr": 0.01, "output.resume": False}))
    check_same_run(tmp_path, {"train.lr": 0.01, "output.resume": True})
    with pytest.raises(ResumeError, match=r"train\.lr: 0\.01 -> 0\.02"):
        check_same_run(tmp_path, {"train.lr": 0.02, "output.resume": True})


def test_rng_state_round_trips() -> None:
    state = rng_state()
    expected = (random.random(), torch.rand(3))
    set_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def _round(s, rnd: int) -> None:
    s.aggregate_train(rnd, [good(i + 1, update(10 * rnd + i), 10 + i) for i in range(3)])


@pytest.mark.parametrize("rounds", ["naive", "merge"])
def test_a_strategy_resumed_from_its_checkpoint_ends_where_an_unbroken_one_does(tmp_path, rounds: str) -> None:
    def build():
        return strategy(rounds=rounds, server_opt=ServerOptimizer("fedadam", lr=0.5))

    unbroken = build()
    for rnd in (1, 2, 3):
        _round(unbroken, rnd)
        if rnd == 1:
            save_checkpoint(tmp_path, 1, {"strategy": unbroken.state_dict()})
    resumed = build()  # a new process: built from the same config, then its state loaded
    resumed.load_state_dict(latest_checkpoint(tmp_path)["strategy"])
    for rnd in (2, 3):
        _round(resumed, rnd)
    for k in KEYS:
        assert torch.equal(resumed.llm.current[k], unbroken.llm.current[k])
        assert torch.equal(resumed.tiny.current[k], unbroken.tiny.current[k])
    assert resumed.llm.state_dict()["merged"].__len__() == unbroken.llm.state_dict()["merged"].__len__()
    assert resumed.server_opt.state_dict()["steps"] == unbroken.server_opt.state_dict()["steps"] == 3
