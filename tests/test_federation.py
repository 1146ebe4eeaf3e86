"""The whole Flower app on the toy pair through the real Flower simulation engine (`flwr run`, Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedgt.fed_config import ConfigError, load_toml, pyproject_run_config
from fedgt.flwr_runner import _superlink_pids, run_federation
from fedgt.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def toy_overrides(**extra) -> dict:
    cfg = {k: v for k, v in load_toml(ROOT / "simulations" / "toy.toml").__dict__.items()}  # validates the file
    assert cfg
    import tomllib

    return {**tomllib.loads((ROOT / "simulations" / "toy.toml").read_text()), **extra}


def _flat(d: dict) -> dict:
    from fedgt.fed_config import _flatten

    return _flatten(d)


def test_two_rounds_two_organizations_with_flwr_run(toy_pair, tmp_path) -> None:
    out, home = tmp_path / "run", tmp_path / "flwr-home"
    overrides = _flat(toy_overrides(**{"output": {"dir": str(out)}, "dp": {"mode": "dp-sgd", "epsilon": 4.0,
                                                                           "budget": 5.0}}))
    assert run_federation(ROOT, overrides, home, timeout=600) == 0
    assert _superlink_pids(home) == []  # the local SuperLink it started is stopped again
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval"]["org-loss"] > 0 and "lgr" in rows[1]["eval"]
    first, second = rows[1]["log"], rows[2]["log"]
    assert len(first["accepted"]) == 2 and first["metrics"]["dp-epsilon-total-max"] == pytest.approx(4.0, rel=0.05)
    # Budget 5: two ε=4 rounds compose (RDP) to ~6 > 5, so both organizations decline, saying why.
    assert len(second["declined"]) == 2 and "budget" in second["declined"][0]["reason"]
    assert "| 2 |" in (out / "results.md").read_text() and (out / "metrics.png").is_file()
    assert (out / "checkpoints" / "round-2.pt").is_file()

    # The final LLM is a standard peft adapter on the untouched base LLM.
    base, tok = load_model(str(toy_pair[1]))
    ids = torch.tensor([[1] + tok("Q: Kafek?", add_special_tokens=False).input_ids])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(out / "llm_adapter"))
    assert not torch.allclose(tuned(input_ids=ids).logits, before)


def test_a_bad_run_config_fails_before_anything_starts(tmp_path) -> None:
    with pytest.raises(ConfigError, match="strategy.aggregator"):
        run_federation(ROOT, {"strategy.aggregator": "krum"}, tmp_path / "home")
    assert not (tmp_path / "home").exists()
    assert "num-server-rounds" in pyproject_run_config(ROOT / "pyproject.toml")


def test_exported_site_folders_load_back_as_the_same_organizations(tmp_path) -> None:
    from fedgt.data import load_user_domain
    from fedgt.fed_config import from_run_config
    from fedgt.fed_data import simulated_organizations, write_jsonl

    cfg = from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), "data.n-train": 8, "data.n-test": 4})
    org = simulated_organizations(cfg, 3)[1]
    back = load_user_domain(write_jsonl(org, tmp_path / "site"), test_fraction=0.2)
    assert sorted(e.text for e in back.train + back.test) == sorted(e.text for e in org.train + org.test)
    assert all(e.is_task for e in back.train)
