"""A site's own policy: what it grants the server's request, where its ledger lives, and what its replies hold."""

from __future__ import annotations

import pytest
import torch

from fedgt.core.run_config import ConfigError, DPSection, SimSitesSection, from_run_config
from fedgt.core.updates import UpdateSpec
from fedgt.org.policy import PolicyError, RequestRefused, SitePolicy, grant, simulated_policy, site_policy
from fedgt.org.release import ALWAYS, release
from fedgt.org.site import is_simulated, ledger_path

DP_SGD_8 = DPSection(mode="dp-sgd", epsilon=8.0, delta=1e-5)


# --- granting the request -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (DPSection(mode="none"), "requires dp.mode='dp-sgd'"),
        (DPSection(mode="update", epsilon=4.0), "requires dp.mode='dp-sgd'"),
        (DPSection(mode="dp-sgd", epsilon=9.0), "ε <= 8"),
        (DPSection(mode="dp-sgd", epsilon=4.0, delta=1e-3), "δ <= 1e-05"),
    ],
)
def test_a_request_weaker_than_the_policy_is_refused_saying_why(request_, match) -> None:
    with pytest.raises(RequestRefused, match=match):
        grant(SitePolicy(), request_)


def test_a_request_as_strong_or_stronger_is_granted_as_requested() -> None:
    dp = grant(SitePolicy(max_epsilon=8.0), DPSection(mode="dp-sgd", epsilon=2.0, delta=1e-6, max_grad_norm=0.5))
    assert (dp.mode, dp.epsilon, dp.delta, dp.max_grad_norm) == ("dp-sgd", 2.0, 1e-6, 0.5)
    assert grant(SitePolicy(dp_mode="none"), DPSection(mode="none")).mode == "none"
    assert grant(SitePolicy(dp_mode="none"), DP_SGD_8).mode == "dp-sgd"  # more privacy than asked: fine


# --- where the policy comes from ----------------------------------------------------------------------------------


def test_default_site_policy_is_private_and_releases_nothing_extra() -> None:
    p = site_policy({"data-path": "/data/site"})
    assert (p.dp_mode, p.max_epsilon, p.budget, p.release, p.noise_seed) == ("dp-sgd", 8.0, 24.0, (), None)


def test_site_policy_from_a_file_with_inline_node_config_keys_winning(tmp_path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text('[policy]\ndp-mode = "update"\nmax-epsilon = 2.0\nbudget = 6.0\nrelease = ["train-loss"]\n'
                 f'ledger = "{tmp_path / "l.json"}"\n')
    p = site_policy({"data-path": "/d", "policy": str(f), "max-epsilon": 1.0})
    assert (p.dp_mode, p.max_epsilon, p.budget, p.release) == ("update", 1.0, 6.0, ("train-loss",))
    assert ledger_path(p, {"data-path": "/d"}, run_id=7) == tmp_path / "l.json"
    assert str(f) in p.source and "node config" in p.source


@pytest.mark.parametrize(
    ("node_config", "match"),
    [
        ({"dp-mode": "dpsgd"}, "dp-mode"),
        ({"max-epsilon": -1.0}, "max-epsilon"),
        ({"release": "train-loss,secret-sauce"}, "secret-sauce"),
        ({"noise-seed": 3}, "simulation-only"),
        ({"policy": "/no/such/policy.toml"}, "cannot read"),
    ],
)
def test_a_bad_site_policy_fails_naming_the_key(node_config, match) -> None:
    with pytest.raises(PolicyError, match=match):
        site_policy(node_config)


def test_the_ledger_lives_beside_the_data_and_the_run_config_cannot_move_it() -> None:
    assert ledger_path(SitePolicy(), {"data-path": "/srv/org"}, 1).as_posix() == "/srv/org/.fedgt-ledger/ledger.json"
    for key in ("dp.ledger-dir", "dp.budget"):  # the server has no say in where or how much
        with pytest.raises(ConfigError, match="unknown run config"):
            from_run_config({key: "x"})


def test_simulation_policies_come_from_the_scenario_per_organization(tmp_path) -> None:
    f = tmp_path / "sites.toml"
    f.write_text('[default]\nbudget = 10.0\n[org-1]\ndp-mode = "dp-sgd"\nmax-epsilon = 2.0\n')
    sim = SimSitesSection(dp_mode="none", release="", policy_file=str(f))
    p0, p1 = simulated_policy(sim, 0), simulated_policy(sim, 1)
    assert (p0.dp_mode, p0.budget) == ("none", 10.0)
    assert (p1.dp_mode, p1.max_epsilon, p1.budget) == ("dp-sgd", 2.0, 10.0)
    assert simulated_policy(SimSitesSection(noise_seed=4), 0).noise_seed == 4
    # Outside a Ray simulation a node with a partition id is a partner site: the scenario cannot set its policy.
    assert not is_simulated({"partition-id": 0, "num-partitions": 2}) and not is_simulated({"data-path": "/d"})


# --- the release whitelist ----------------------------------------------------------------------------------------

A, B = "model.layers.0.q_proj.lora_A.weight", "model.layers.0.q_proj.lora_B.weight"
SPEC = UpdateSpec.from_parameters({A: torch.zeros(2, 4), B: torch.zeros(4, 2)})
UPDATE = {A: torch.ones(2, 4), B: torch.ones(4, 2)}
ROUND_METRICS = {"num-examples": 128.0, "train-loss": 0.7, "tiny-test-em": 0.3, "tiny-test-loss": 1.2,
                 "dp-epsilon-total": 4.0, "dp-epsilon": 4.0, "dp-sigma": 0.9, "dp-update-norm": 3.1}


def test_by_default_only_the_update_num_examples_and_epsilon_leave() -> None:
    content = release(UPDATE, SPEC, ROUND_METRICS, SitePolicy())
    assert set(content.array_records) == {"arrays"} and set(content.config_records) == set()
    assert {k: tuple(a.shape) for k, a in content["arrays"].items()} == {A: (2, 4), B: (4, 2)}
    assert set(content["metrics"].keys()) == {"num-examples", "dp-epsilon-total"}


def test_a_policy_releases_exactly_the_metrics_it_names() -> None:
    content = release(UPDATE, SPEC, ROUND_METRICS, SitePolicy(release=("train-loss", "tiny-test-em")))
    assert set(content["metrics"].keys()) == {"num-examples", "dp-epsilon-total", "train-loss", "tiny-test-em"}
    assert set(content["metrics"].keys()) <= set(ALWAYS) | {"train-loss", "tiny-test-em"}


def test_a_decline_holds_the_reason_and_no_update() -> None:
    content = release(None, None, ROUND_METRICS, SitePolicy(), decline="privacy request refused: ...")
    assert set(content.array_records) == set() and content["decline"]["reason"].startswith("privacy request")
    assert dict(content["metrics"]) == {"num-examples": 0.0, "declined": 1.0, "dp-epsilon-total": 4.0}


def test_an_update_of_the_wrong_shape_never_leaves() -> None:
    with pytest.raises(ValueError, match="outgoing update"):
        release({**UPDATE, A: torch.ones(3, 4)}, SPEC, ROUND_METRICS, SitePolicy())
