"""The federation's run config: every shipped config file validates, and bad values fail naming their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgt.core.run_config import (
    KEYS,
    UPPER,
    ConfigError,
    FedConfig,
    from_run_config,
    load_toml,
    pyproject_run_config,
    to_run_config,
)
from fedgt.provider.provision import provider_config_for

ROOT = Path(__file__).resolve().parents[1]
BASE = pyproject_run_config(ROOT / "pyproject.toml")


def test_pyproject_lists_every_knob_with_its_default() -> None:
    assert sorted(BASE) == sorted(KEYS)
    assert from_run_config(BASE) == FedConfig()
    assert from_run_config(to_run_config(FedConfig())) == FedConfig()


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_scenario_file_loads(path: Path) -> None:
    cfg = load_toml(path, BASE)
    assert cfg.federation.num_organizations >= 1


@pytest.mark.parametrize("key, value, words", [
    ("dp.mode", "dp-sgb", "dp.mode"),
    ("strategy.aggregator", "krum", "strategy.aggregator"),
    ("strategy.trim-beta", 0.5, "strategy.trim-beta"),
    ("strategy.merge-scale", float("inf"), "strategy.merge-scale"),
    ("strategy.density", 0.0, "strategy.density"),
    ("strategy.out-of-coverage", "ignore", "strategy.out-of-coverage"),
    ("strategy.coverage-threshold", 0.0, "strategy.coverage-threshold"),
    ("strategy.coverage-threshold", float("inf"), "strategy.coverage-threshold"),
    ("strategy.accept-tolerance", -0.1, "strategy.accept-tolerance"),
    ("strategy.accept-rounds", "yes", "expected bool"),
    ("distill.steps", 0, "distill.steps"),
    ("distill.lr", float("nan"), "distill.lr"),
    ("train.steps", 0, "train.steps"),
    ("train.lr", "fast", "expected float"),
    ("federation.num-organizations", 2.5, "expected int"),
    ("eval.ceiling", 1, "expected bool"),
    ("model.pair", "huge", "model.pair"),
    ("gt.checkpoint", "/no/such/dir", "gt.checkpoint"),
    ("gt.anchor-k", -1, "gt.anchor-k"),
    ("data.path", "/no/such/dir", "data.path"),
])
def test_a_bad_value_fails_naming_its_key(key: str, value, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as err:
        from_run_config({**BASE, key: value})
    assert key in str(err.value)


FLOAT_KEYS = sorted(k for k, (sec, name) in KEYS.items() if isinstance(getattr(getattr(FedConfig(), sec), name), float))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_knob_rejects_non_finite_values(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match="finite") as err:
        from_run_config({**BASE, key: value})
    assert key in str(err.value)


@pytest.mark.parametrize("key", sorted(UPPER))
def test_every_size_has_an_upper_bound_named_in_the_message(key: str) -> None:
    bound = UPPER[key]
    too_big = bound * 10 if isinstance(bound, float) else bound * 10 + 1
    with pytest.raises(ConfigError, match="must be <=") as err:
        from_run_config({**BASE, key: too_big})
    assert key in str(err.value)


def test_a_huge_max_length_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.max-length.*<= 131072"):
        from_run_config({**BASE, "train.max-length": 1_000_000_000})


def test_unknown_keys_and_incompatible_choices_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown run config key"):
        from_run_config({**BASE, "strategy.agregator": "mean"})
    with pytest.raises(ConfigError, match="central DP needs"):
        from_run_config({**BASE, "strategy.central-dp": True, "strategy.aggregator": "median"})
    with pytest.raises(ConfigError, match="'distill' needs"):
        from_run_config({**BASE, "strategy.aggregator": "distill", "strategy.mode": "aggregate-then-transform"})
    bad = tmp_path / "bad.toml"
    bad.write_text('dp.mode = "loud"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*dp\.mode"):
        load_toml(bad, BASE)
    bad.write_text("dp.mode = \n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(bad, BASE)


def test_derived_library_configs() -> None:
    cfg = from_run_config({**BASE, "dp.mode": "dp-sgd", "dp.epsilon": 4.0, "lora.targets": "q_proj, k_proj"})
    assert cfg.lora_settings().target_modules == ("q_proj", "k_proj")
    assert cfg.dp_config().epsilon == 4.0 and cfg.dp_config().mode == "dp-sgd"
    provider = provider_config_for(cfg)
    assert provider.tiny_dp.mode == "dp-sgd" and provider.shadow_domains == cfg.gt.shadow_domains
    assert cfg.model_names() == ("tinylm", "llm")


def test_a_residual_gt_is_a_different_provider_and_a_plain_one_keeps_its_key() -> None:
    from fedgt.provider.provision import provider_config_for

    plain = provider_config_for(from_run_config({**BASE, "gt.anchor-k": 0}))
    residual = provider_config_for(from_run_config(BASE))  # the default
    assert residual.anchor_k == 3 and plain.anchor_k == 0 and residual.key() != plain.key()
    # A plain GT's key hashes the fields a provider had before anchor_k (and the default examples_per_pair).
    import hashlib
    import json
    from dataclasses import asdict

    fields = {k: v for k, v in asdict(plain).items() if k not in ("workers", "anchor_k", "examples_per_pair")}
    assert plain.key() == hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
