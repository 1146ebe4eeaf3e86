"""One organization's round at its site on the toy TinyLM: model check, grant, secret noise, its own ledger."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedgt.core.data import DomainData
from fedgt.core.examples import task_example
from fedgt.core.identity import model_identity
from fedgt.core.lora import attach_lora, lora_parameters
from fedgt.core.models import load_model
from fedgt.core.noise import SecretNoise, SeededNoise
from fedgt.core.run_config import FedConfig, from_run_config
from fedgt.org.ledger import PrivacyLedger
from fedgt.org.policy import SitePolicy
from fedgt.org.site import local_round, round_noise

TRAIN = tuple(task_example(f"n{i}", str(i % 10)) for i in range(16))
DATA = DomainData("org-private-folder-name", TRAIN, TRAIN[:4], "files")


def toy_cfg(**dp) -> FedConfig:
    return from_run_config({"model.pair": "toy", "train.steps": 3, "train.batch-size": 8,
                            **{f"dp.{k}": v for k, v in dp.items()}})


def start_state(tiny_dir, cfg: FedConfig) -> dict[str, torch.Tensor]:
    return lora_parameters(attach_lora(load_model(tiny_dir)[0], cfg.lora_settings()))


def run_round(tiny_dir, cfg, policy, published, ledger=None, noise=None):
    return local_round(cfg, DATA, policy, {}, start_state(tiny_dir, cfg), 1, ledger, noise or SecretNoise(),
                       tiny_dir, published)


def test_a_tinylm_other_than_the_published_one_is_declined(toy_pair) -> None:
    cfg = toy_cfg()
    published = model_identity(toy_pair[0], cfg.lora_settings())
    other = model_identity(toy_pair[1], cfg.lora_settings())  # another model under the provider's name
    result = run_round(toy_pair[0], cfg, SitePolicy(dp_mode="none"), other)
    assert result.update is None and "model identity" in result.decline and "weights" in result.decline
    assert run_round(toy_pair[0], cfg, SitePolicy(dp_mode="none"), None).decline.startswith("model identity")
    assert run_round(toy_pair[0], cfg, SitePolicy(dp_mode="none"), published).decline is None


def test_a_request_below_the_site_policy_is_declined_before_training(toy_pair) -> None:
    cfg = toy_cfg(mode="none")
    published = model_identity(toy_pair[0], cfg.lora_settings())
    result = run_round(toy_pair[0], cfg, SitePolicy(), published)  # default policy: DP-SGD required
    assert result.update is None and result.decline.startswith("privacy request refused")
    assert "org-private-folder-name" not in result.decline


def test_the_round_spends_from_the_sites_own_ledger(toy_pair, tmp_path) -> None:
    cfg = toy_cfg(mode="update", epsilon=4.0)
    policy = SitePolicy(dp_mode="update", max_epsilon=4.0, budget=5.0, ledger=str(tmp_path / "site" / "l.json"))
    published = model_identity(toy_pair[0], cfg.lora_settings())
    ledger = PrivacyLedger(tmp_path / "site" / "l.json", policy.budget, policy.max_delta)
    first = run_round(toy_pair[0], cfg, policy, published, ledger)
    assert first.update is not None and first.metrics["dp-epsilon-total"] == pytest.approx(4.0, rel=0.02)
    again = PrivacyLedger(tmp_path / "site" / "l.json", policy.budget, policy.max_delta)  # what a restart reads
    second = run_round(toy_pair[0], cfg, policy, published, again)
    assert second.update is None and "budget" in second.decline


def test_identical_organizations_release_different_noise_and_a_seed_only_in_simulation(toy_pair) -> None:
    cfg = toy_cfg(mode="update", epsilon=8.0)
    policy = SitePolicy(dp_mode="update")
    published = model_identity(toy_pair[0], cfg.lora_settings())
    a = run_round(toy_pair[0], cfg, policy, published).update
    b = run_round(toy_pair[0], cfg, policy, published).update  # same data, same config, same round
    assert any(not torch.equal(a[k], b[k]) for k in a)
    seeded = dataclasses.replace(policy, noise_seed=7)
    assert isinstance(round_noise(policy, "0", 1), SecretNoise)
    assert isinstance(round_noise(seeded, "0", 1), SeededNoise)
    c = run_round(toy_pair[0], cfg, seeded, published, noise=round_noise(seeded, "0", 1)).update
    d = run_round(toy_pair[0], cfg, seeded, published, noise=round_noise(seeded, "0", 1)).update
    e = run_round(toy_pair[0], cfg, seeded, published, noise=round_noise(seeded, "1", 1)).update
    assert all(torch.equal(c[k], d[k]) for k in c) and any(not torch.equal(c[k], e[k]) for k in c)


def test_a_failing_round_declines_without_sending_its_details(toy_pair, tmp_path, monkeypatch) -> None:
    """The ClientApp turns any failure into a generic decline: the site's path and error text stay in its log."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgt.org.client_app import train

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    missing = tmp_path / "secret-partner-folder"  # does not exist: loading the site's data fails
    context = Context(run_id=1, node_id=5, node_config={"data-path": str(missing), "dp-mode": "none"},
                      state=RecordDict(), run_config={"model.pair": "toy"})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train")
    reply = train(msg, context)
    reason = reply.content["decline"]["reason"]
    assert reason.startswith("site error (FileNotFoundError)") and "secret-partner-folder" not in reason
    assert set(reply.content.array_records) == set() and dict(reply.content["metrics"])["declined"] == 1.0


def test_a_supernode_with_a_partition_id_is_a_site_not_a_simulation(toy_pair, monkeypatch) -> None:
    """The scenario's permissive sim-sites policy and data partition never apply outside a Ray simulation."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgt.org.client_app import train

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={"model.pair": "toy", "sim-sites.dp-mode": "none",
                                                      "data.path": "/nonexistent/on/the/site"})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train")
    reason = train(msg, context).content["decline"]["reason"]
    assert reason.startswith("site error (ValueError)")  # no data-path: a site without data, not partition 0
