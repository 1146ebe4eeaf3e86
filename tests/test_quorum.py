"""Quorum and timeouts: a round never waits forever for organizations, and too few replies change nothing."""

from __future__ import annotations

import threading
import time

import pytest
from flwr.app import ConfigRecord

from fedgt.core.run_config import ConfigError, FedConfig, from_run_config
from strategies.grad_transformer import QuorumLost
from tests.test_strategy import INIT, KEYS, _flower_task_identity, good, strategy, update  # noqa: F401


class Grid:
    """The part of Flower's Grid the strategy uses to sample: which nodes are connected now."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def configure_in_thread(s, grid: Grid, limit_s: float = 20.0):
    """configure_train in a thread: (result or exception, seconds); fails the test instead of hanging."""
    out: dict = {}

    def target() -> None:
        t0 = time.monotonic()
        try:
            out["value"] = s.configure_train(2, s.current_arrays(), ConfigRecord({}), grid)
        except Exception as err:  # noqa: BLE001 - handed to the test
            out["value"] = err
        out["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), "configure_train hung waiting for organizations"
    return out["value"], out["seconds"]


def test_a_round_without_quorum_stops_after_wait_s_instead_of_hanging() -> None:
    # One of two organizations is gone: Flower's own sampling would log "Waiting for nodes" forever.
    s = strategy(min_available_nodes=2, min_train_nodes=2, wait_s=1.0)
    err, seconds = configure_in_thread(s, Grid([11]))
    assert isinstance(err, QuorumLost)
    assert "1 organization(s) connected" in str(err) and "federation.min-organizations" in str(err)
    assert 1.0 <= seconds < 5.0


def test_a_round_with_quorum_samples_the_connected_organizations() -> None:
    s = strategy(min_available_nodes=2, min_train_nodes=2, wait_s=1.0)
    messages, seconds = configure_in_thread(s, Grid([11, 12, 13]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13] and seconds < 1.0


def test_an_organization_that_reconnects_in_time_lets_the_round_start() -> None:
    grid = Grid([11])
    s = strategy(min_available_nodes=2, min_train_nodes=2, wait_s=10.0)
    threading.Timer(1.5, lambda: grid.nodes.append(12)).start()
    messages, seconds = configure_in_thread(s, grid)
    assert len(messages) == 2 and 1.0 < seconds < 5.0


def test_too_few_accepted_replies_skip_the_round_and_leave_the_models_unchanged() -> None:
    s = strategy(rounds="naive", min_replies=2)
    _, metrics = s.aggregate_train(1, [good(1, update(1), 10)])
    assert metrics["round-skipped"] == 1.0 and metrics["llm-unchanged"] == 1.0
    assert "fewer than federation.min-replies = 2" in s.round_log[1]["skipped"]
    for k in KEYS:
        assert (s.llm.current[k] == INIT[k]).all() and (s.tiny.current[k] == INIT[k]).all()
    _, metrics = s.aggregate_train(2, [good(1, update(1), 10), good(2, update(2), 10)])
    assert metrics["round-skipped"] == 0.0 and any((s.llm.current[k] != INIT[k]).any() for k in KEYS)


def test_quorum_settings_from_the_run_config() -> None:
    cfg = from_run_config({"federation.num-organizations": 4, "federation.min-organizations": 3})
    assert cfg.quorum() == (3, 2)
    assert FedConfig().quorum() == (8, 2)  # 0: every organization
    assert from_run_config({"federation.num-organizations": 1}).quorum() == (1, 1)  # min-replies within the run
    with pytest.raises(ConfigError, match="federation.min-organizations"):
        from_run_config({"federation.num-organizations": 2, "federation.min-organizations": 3})
    with pytest.raises(ConfigError, match="federation.round-timeout-s"):
        from_run_config({"federation.round-timeout-s": 0.0})


def test_the_server_starts_with_min_organizations_after_waiting_for_all() -> None:
    from fedgt.server.server_app import wait_for_organizations

    cfg = from_run_config({"federation.num-organizations": 3, "federation.min-organizations": 2,
                           "federation.wait-s": 0.5})
    assert wait_for_organizations(Grid([1, 2, 3]), cfg) == 3
    assert wait_for_organizations(Grid([1, 2]), cfg) == 2  # after 0.5 s, with a warning
    with pytest.raises(QuorumLost, match=r"only 1 of federation.num-organizations=3 .*federation.min-organizations=2"):
        wait_for_organizations(Grid([1]), cfg)
