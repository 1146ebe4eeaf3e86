"""One configuration system: the command-line flags, the provider and the strategy take the run config's defaults."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from fedgt.core.run_config import FedConfig, FederationSection, GTSection, StrategySection
from fedgt.provider.provision import ProviderConfig, provider_config_for
from fedgt.run.args import dp_config, finetune_config, lora_settings
from fedgt.run.cli import build_parser, train_gt_anchor_k
from strategies.grad_transformer import GradTransformerStrategy


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", ["finetune", "curate", "org-demo"])
def test_every_flag_defaults_to_its_run_config_key(command: str) -> None:
    args, cfg = _parse(command), FedConfig()
    assert lora_settings(args) == cfg.lora_settings()
    assert finetune_config(args) == cfg.finetune_config()
    assert dp_config(args).mode == cfg.dp.mode
    assert (args.delta, args.max_grad_norm, args.update_clip) == (cfg.dp.delta, cfg.dp.max_grad_norm,
                                                                  cfg.dp.update_clip)
    if command != "curate":
        assert (args.n_train, args.n_test) == (cfg.data.n_train, cfg.data.n_test)


def test_train_gt_trains_the_provider_default_gt_unless_told_otherwise() -> None:
    args = _parse("train-gt")
    assert args.epochs == GTSection.epochs and train_gt_anchor_k(args) == GTSection.anchor_k
    assert train_gt_anchor_k(_parse("train-gt", "--kind", "paper_gt")) == 0  # only a parallel GT can be residual
    assert train_gt_anchor_k(_parse("train-gt", "--anchor-k", "0")) == 0


def test_a_bare_provider_config_is_the_one_a_default_run_uses() -> None:
    assert provider_config_for(FedConfig()) == ProviderConfig()


def test_the_strategy_constructor_defaults_are_the_run_config_s() -> None:
    params = inspect.signature(GradTransformerStrategy).parameters
    objects = {"server_opt", "central_dp"}  # built from their strategy.* keys: None is the run config's default
    shared = [f.name for f in fields(StrategySection) if f.name in params and f.name not in objects]
    assert len(shared) >= 15  # every strategy.* knob the constructor takes as a value
    assert params["server_opt"].default is None and params["central_dp"].default is None
    assert not StrategySection.central_dp and StrategySection.server_opt == "none"
    for name in shared:
        assert params[name].default == getattr(StrategySection, name), name
    assert params["min_replies"].default == FederationSection.min_replies
    assert params["wait_s"].default == FederationSection.wait_s
    assert params["gt_batch_size"].default == GTSection.batch_size


def test_a_dp_flag_left_out_takes_the_run_config_s_epsilon() -> None:
    assert dp_config(_parse("finetune", "--dp-mode", "update")).epsilon == FedConfig().dp.epsilon
    sigma = dp_config(_parse("finetune", "--dp-mode", "dp-sgd", "--noise-multiplier", "1.0"))
    assert sigma.epsilon is None and sigma.noise_multiplier == 1.0  # σ given: no ε target
    assert dp_config(_parse("finetune", "--dp-mode", "dp-sgd", "--epsilon", "2")).epsilon == 2.0
