"""The whole Flower app on the toy pair through the real Flower simulation engine (`flwr run`, Ray)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedgt.core.lora import attach_lora
from fedgt.core.models import load_model
from fedgt.core.run_config import ConfigError, load_toml, pyproject_run_config
from fedgt.core.updates import spec_of
from fedgt.run.flwr_runner import _superlink_pids, run_federation

ROOT = Path(__file__).resolve().parents[1]


def toy_overrides(**extra) -> dict:
    cfg = {k: v for k, v in load_toml(ROOT / "simulations" / "toy.toml").__dict__.items()}  # validates the file
    assert cfg
    import tomllib

    return {**tomllib.loads((ROOT / "simulations" / "toy.toml").read_text()), **extra}


def _flat(d: dict) -> dict:
    from fedgt.core.run_config import _flatten

    return _flatten(d)


def test_two_rounds_two_organizations_with_flwr_run(toy_pair, tmp_path) -> None:
    out, home = tmp_path / "run", tmp_path / "flwr-home"
    # Sites that require DP-SGD at ε <= 4, budget 5, and release nothing but the update, num-examples and ε.
    # Their DP-SGD updates (16 examples each) lie far outside the toy GT's coverage (curated on 128 examples per
    # domain): applied anyway here, and no acceptance test, so the round's LLM and adapters are checked.
    overrides = _flat(toy_overrides(**{"output": {"dir": str(out), "tracking": "tensorboard"},
                                       "dp": {"mode": "dp-sgd", "epsilon": 4.0},
                                       "sim-sites": {"dp-mode": "dp-sgd", "max-epsilon": 4.0, "budget": 5.0,
                                                     "release": ""},
                                       "strategy": {"out-of-coverage": "apply", "accept-rounds": False}}))
    assert run_federation(ROOT, overrides, home, timeout=600) == 0
    assert _superlink_pids(home) == []  # the local SuperLink it started is stopped again
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval"]["org-loss"] > 0 and "lgr" in rows[1]["eval"]
    first, second = rows[1]["log"], rows[2]["log"]
    assert len(first["accepted"]) == 2 and first["metrics"]["dp-epsilon-total-max"] == pytest.approx(4.0, rel=0.05)
    # Budget 5: two ε=4 rounds compose (RDP) to ~6 > 5, so both organizations decline, saying why.
    assert len(second["declined"]) == 2 and "budget" in second["declined"][0]["reason"]
    # Every update's coverage score is in the round log, per node (and goes back to that node with round 2).
    assert sorted(first["coverage"]) == sorted(str(n) for n in first["accepted"]) and first["out-of-coverage"]
    assert first["coverage-action"] == "apply" and "round-accepted" not in first
    assert "| 2 |" in (out / "results.md").read_text() and (out / "metrics.png").is_file()

    # Everything that reached the server, reply by reply: the update of the TinyLM's spec and whitelisted metrics
    # only; declines carry their reason and nothing else (no loss, no raw norm, no test scores, no names).
    lora = load_toml(ROOT / "simulations" / "toy.toml", pyproject_run_config(ROOT / "pyproject.toml")).lora_settings()
    spec = spec_of(attach_lora(load_model(str(toy_pair[0]))[0], lora))
    shapes = {k: list(s) for k, s in zip(spec.keys, spec.shapes, strict=True)}
    assert len(first["received"]) == len(second["received"]) == 2
    for r in first["received"]:
        assert r["arrays"] == {"arrays": shapes} and r["configs"] == {}
        assert r["metrics"] == {"metrics": ["dp-epsilon-total", "num-examples"]}
        assert r["bytes"] == 4 * sum(math.prod(s) for s in spec.shapes)  # float32 payload
        assert sorted(r["values"]["metrics"]) == r["metrics"]["metrics"] and 0 <= r["seconds"] < 600
    # The run's report shows each organization's ε ledger over both rounds (what each reported).
    ledger = re.search(r"<table id=ledger>(.*?)</table>", (out / "report.html").read_text()).group(1)
    assert ledger.count("<tr>") == 3 and "round 2" in ledger
    # ... and output.tracking wrote the same rounds as TensorBoard events.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("llm/org-loss")] == [0, 1, 2]
    assert events.Scalars("llm/org-loss")[1].value == pytest.approx(rows[1]["eval"]["org-loss"])
    for r in second["received"]:
        assert r["arrays"] == {} and set(r["configs"]) == {"decline"} and list(r["configs"]["decline"]) == ["reason"]
        assert r["metrics"] == {"metrics": ["declined", "dp-epsilon-total", "num-examples"]}
        assert "org-" not in r["configs"]["decline"]["reason"] and "/" not in r["configs"]["decline"]["reason"]
    assert (out / "checkpoints" / "round-2.pt").is_file()

    # The final LLM is a standard peft adapter on the untouched base LLM.
    base, tok = load_model(str(toy_pair[1]))
    ids = torch.tensor([[1] + tok("Q: Kafek?", add_special_tokens=False).input_ids])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(out / "llm_adapter"))
    assert not torch.allclose(tuned(input_ids=ids).logits, before)
    # Each organization's own LLM adapter too, alone and on the shared LLM (multi-LoRA serving).
    assert sorted(p.name for p in (out / "org_adapters").glob("*/*")) == ["on_shared", "on_shared", "own", "own"]
    own = PeftModel.from_pretrained(load_model(str(toy_pair[1]))[0], str(next((out / "org_adapters").glob("*/own"))))
    assert not torch.allclose(own(input_ids=ids).logits, before)


def test_a_bad_run_config_fails_before_anything_starts(tmp_path) -> None:
    with pytest.raises(ConfigError, match="strategy.aggregator"):
        run_federation(ROOT, {"strategy.aggregator": "krum"}, tmp_path / "home")
    assert not (tmp_path / "home").exists()
    assert "num-server-rounds" in pyproject_run_config(ROOT / "pyproject.toml")


def test_exported_site_folders_load_back_as_the_same_organizations(tmp_path) -> None:
    from fedgt.core.data import load_user_domain
    from fedgt.core.org_data import simulated_organizations, write_jsonl
    from fedgt.core.run_config import from_run_config

    cfg = from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), "data.n-train": 8, "data.n-test": 4})
    org = simulated_organizations(cfg, 3)[1]
    back = load_user_domain(write_jsonl(org, tmp_path / "site"), test_fraction=0.2)
    assert sorted(e.text for e in back.train + back.test) == sorted(e.text for e in org.train + org.test)
    assert all(e.is_task for e in back.train)
