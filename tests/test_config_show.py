"""`fedgt config show`: every key's effective value and where it came from; the output is a valid scenario file."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fedgt.core.run_config import from_run_config, pyproject_run_config, to_run_config
from fedgt.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _show(capsys, *args: str) -> tuple[dict, dict]:
    assert main(["config", "show", "--app", str(ROOT), *args]) == 0
    out = capsys.readouterr().out
    sources = {line.split(" = ")[0]: line.rsplit("# ", 1)[1] for line in out.splitlines()}
    return tomllib.loads(out), sources  # the comments are TOML comments: the listing is itself a scenario file


def test_each_value_names_its_source_and_later_layers_win(capsys) -> None:
    values, sources = _show(capsys, "--scenario", str(ROOT / "simulations" / "secagg.toml"), "--rounds", "5",
                            "--set", "strategy.secagg-clip=4.0", "--set", "num-server-rounds=7")
    assert values["strategy"]["mode"] == "aggregate-then-transform"
    assert sources["strategy.mode"] == f"scenario {ROOT / 'simulations' / 'secagg.toml'}"
    assert values["strategy"]["secagg-clip"] == 4.0 and sources["strategy.secagg-clip"] == "--set"
    assert values["num-server-rounds"] == 7 and sources["num-server-rounds"] == "--set"  # --set after --rounds
    assert sources["train.lr"] == "default"
    flat = _flat(values)
    assert to_run_config(from_run_config(flat, check_paths=False)) == flat  # every key, exactly one value


def test_a_finished_run_shows_what_it_ran_with(tmp_path, capsys) -> None:
    recorded = to_run_config(from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), "train.lr": 0.02},
                                             check_paths=False))
    (tmp_path / "run_config.json").write_text(json.dumps(recorded))
    values, sources = _show(capsys, "--run", str(tmp_path))
    default_lr = pyproject_run_config(ROOT / "pyproject.toml")["train.lr"]
    assert values["train"]["lr"] == 0.02 and sources["train.lr"] == f"run (default {default_lr!r})"
    assert sources["train.steps"] == "default"


def test_a_bad_value_or_key_is_refused_naming_it(capsys) -> None:
    assert main(["config", "show", "--app", str(ROOT), "--set", "train.lr=inf"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["config", "show", "--app", str(ROOT), "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
