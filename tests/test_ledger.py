"""The privacy ledger: RDP composition across rounds, persistence, and declining over budget."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fedgt.core.dp import DPConfig, rdp_epsilon, update_sigma
from fedgt.org.ledger import BudgetExceeded, PrivacyLedger, round_mechanisms


def test_dp_sgd_round_mechanism_matches_its_target_epsilon() -> None:
    dp = DPConfig(mode="dp-sgd", epsilon=8.0)
    (mech,) = round_mechanisms(dp, num_examples=128, batch_size=16, steps=100)
    z, q, steps = mech
    assert q == pytest.approx(1 / 8) and steps == 100
    assert rdp_epsilon([mech], 1e-5) == pytest.approx(8.0, rel=0.02)  # Opacus solves σ for this ε
    assert round_mechanisms(DPConfig(), 128, 16, 100) == []


def test_update_mode_mechanism_is_the_gaussian_release_at_its_replace_one_sensitivity() -> None:
    dp = DPConfig(mode="update", epsilon=8.0, update_clip=2.0)
    ((z, q, steps),) = round_mechanisms(dp, 128, 16, 100)
    assert (q, steps) == (1.0, 1) and z == pytest.approx(update_sigma(dp) / (2 * 2.0))  # σ over sensitivity 2C
    assert rdp_epsilon([(z, q, steps)], 1e-5) == pytest.approx(8.0, rel=0.01)  # the ledger spends what was asked


def test_ledger_composes_persists_and_declines(tmp_path) -> None:
    path = tmp_path / "org" / "ledger.json"
    mech = round_mechanisms(DPConfig(mode="dp-sgd", epsilon=4.0), 128, 16, 50)
    ledger = PrivacyLedger(path, budget=10.0, delta=1e-5)
    assert ledger.spent() == 0.0
    first = ledger.record(mech, 1)
    assert first == pytest.approx(4.0, rel=0.02)
    again = PrivacyLedger(path, budget=10.0, delta=1e-5)  # a new process reads what was spent
    second = again.projected(mech)
    assert first < second < 2 * first  # RDP composition: more than one round, less than adding ε
    again.record(mech, 2)
    with pytest.raises(BudgetExceeded, match="over the budget"):
        for _ in range(10):
            again.check(mech)
            again.record(mech, 3)
    assert again.spent() <= 10.0
    assert json.loads(path.read_text())["rounds"][0]["round"] == 1


def test_a_corrupt_or_mismatched_ledger_is_refused(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt privacy ledger"):
        PrivacyLedger(path, budget=1.0, delta=1e-5)
    PrivacyLedger(tmp_path / "ok.json", 5.0, 1e-5).record([(1.0, 0.1, 10)], 1)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(tmp_path / "ok.json", 5.0, 1e-6)


def test_concurrent_runs_cannot_spend_the_same_budget_twice(tmp_path) -> None:
    # Two runs at one site open the ledger before either has spent: each charge re-reads under a lock.
    path = tmp_path / "ledger.json"
    mech = round_mechanisms(DPConfig(mode="dp-sgd", epsilon=4.0), 128, 16, 50)
    run_a, run_b = PrivacyLedger(path, budget=5.0, delta=1e-5), PrivacyLedger(path, budget=5.0, delta=1e-5)
    assert run_a.spend(mech, server_round=1) == pytest.approx(4.0, rel=0.05)
    with pytest.raises(BudgetExceeded, match="over the budget"):
        run_b.spend(mech, server_round=1)  # run b saw an empty ledger when it opened it
    assert len(json.loads(path.read_text())["rounds"]) == 1


def _spend_many(path: str, n: int, tag: str) -> None:
    ledger = PrivacyLedger(Path(path), budget=1e6, delta=1e-5)  # opened before the other writer spent anything
    for i in range(n):
        charge = ledger.spend if i % 2 else ledger.record
        charge([(1.0, 1.0, 1)], server_round=i, note={"writer": tag})


def test_two_processes_writing_one_ledger_lose_no_release(tmp_path) -> None:
    # Two runs at one site charging rounds at the same time: every release they made is on disk.
    path = tmp_path / "ledger.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spend_many, args=(str(path), 15, tag)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert [r["writer"] for r in data["rounds"]].count("a") == 15
    assert [r["writer"] for r in data["rounds"]].count("b") == 15
    assert len(data["history"]) == 30
    reread = PrivacyLedger(path, budget=1e6, delta=1e-5)
    assert reread.spent() == pytest.approx(rdp_epsilon([(1.0, 1.0, 1)] * 30, 1e-5))
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind
