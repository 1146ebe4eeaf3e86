"""Flower ClientApp: an organization fine-tunes its TinyLM privately and replies with what its policy releases.

Per ``train`` message: read the site's data and policy from its node config (in simulation: the scenario's
``sim-sites.*``), rebuild the round's start from ``base`` and ``arrays``, run ``fedgt.org.site.local_round`` with a
secret noise source and the site's own ledger, and reply through ``fedgt.org.release`` (the update and the
whitelisted metrics, or a decline with its reason). The coverage score the server sends back for the site's
previous update (``coverage-last-round``) goes to the site's log.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedgt.core.identity import from_config
from fedgt.core.org_data import simulated_data, site_data
from fedgt.core.run_config import COVERAGE_KEY, FedConfig, from_run_config
from fedgt.org.ledger import PrivacyLedger
from fedgt.org.policy import SitePolicy, simulated_policy, site_policy
from fedgt.org.release import describe_release, release
from fedgt.org.site import is_simulated, ledger_path, local_round, round_noise, tiny_model_dir

log = logging.getLogger("fedgt.client")
app = ClientApp()
_ANNOUNCED: set[tuple[int, int]] = set()  # (run, node) pairs whose release was already described


def _tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()} if record is not None else {}


def _policy(context: Context, cfg: FedConfig) -> SitePolicy:
    nc = dict(context.node_config)
    return simulated_policy(cfg.sim_sites, int(nc["partition-id"])) if is_simulated(nc) else site_policy(nc)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local private fine-tuning (Flower plumbing around ``local_round``)."""
    policy = SitePolicy()  # until the site's own is read: releases nothing beyond the minimum
    try:
        cfg = from_run_config(context.run_config, check_paths=False)  # no probing of the site's disk
        policy = _policy(context, cfg)
        content = _round(msg, context, cfg, policy)
    except Exception as err:  # noqa: BLE001 - details (paths, data) stay in the site's log, never in the reply
        log.exception("organization %s: round failed", context.node_id)
        content = release(None, None, {}, policy, decline=f"site error ({type(err).__name__}); see the site's log")
    return Message(content=content, reply_to=msg)


def _round(msg: Message, context: Context, cfg: FedConfig, policy: SitePolicy) -> RecordDict:
    """The round's reply content (``local_round`` plus Flower plumbing)."""
    nc = dict(context.node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if COVERAGE_KEY in config:  # how far the GT trusted this site's previous update (docs/federation.md)
        score, limit = float(config[COVERAGE_KEY]), cfg.strategy.coverage_threshold
        log.info("organization %s: coverage score of its previous update %.3f (%s the Grad-Transformer's coverage, "
                 "threshold %g)", context.node_id, score, "inside" if score <= limit else "OUTSIDE", limit)
    # A site reads only the folder its node config names, split with its own seed; a partition of the scenario's
    # data exists only inside a Ray simulation.
    data = simulated_data(cfg, nc) if is_simulated(nc) else site_data(nc, policy.split_seed)
    needs_ledger = policy.dp_mode != "none" or cfg.dp.mode != "none"
    ledger = PrivacyLedger(ledger_path(policy, nc, context.run_id), policy.budget, policy.max_delta) \
        if needs_ledger else None
    org_key = str(nc.get("partition-id", context.node_id))
    try:
        model_dir = tiny_model_dir(cfg, policy)
    except FileNotFoundError as err:  # a site never builds a TinyLM of its own: its weights would differ
        log.error("organization %s: %s", context.node_id, err)
        return release(None, None, {}, policy, decline="model identity: the provider's TinyLM is not installed at "
                       "this site (node config tiny-model=DIR); declining")
    result = local_round(cfg, data, policy, _tensors(msg.content.array_records.get("base")),
                         _tensors(msg.content.array_records.get("arrays")), server_round, ledger,
                         round_noise(policy, org_key, server_round), model_dir,
                         from_config(dict(config)))
    if result.spec is not None and (context.run_id, context.node_id) not in _ANNOUNCED:
        _ANNOUNCED.add((context.run_id, context.node_id))
        log.info("organization %s (%s):\n%s", context.node_id, data.name,
                 describe_release(result.spec, policy, f"run requests dp.mode={cfg.dp.mode} at ε={cfg.dp.epsilon:g}; "
                                  f"policy requires {policy.dp_mode} at ε <= {policy.max_epsilon:g}, budget "
                                  f"{policy.budget:g}"))
    if result.decline is not None:
        log.warning("organization %s declines round %d: %s", context.node_id, server_round, result.decline)
    metrics = {**result.metrics, **({"sim-partition-id": float(nc["partition-id"])} if is_simulated(nc) else {})}
    return release(result.update, result.spec, metrics, policy, result.decline)
