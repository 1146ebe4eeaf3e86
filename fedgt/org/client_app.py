"""Flower ClientApp: an organization fine-tunes its TinyLM privately and replies with what its policy releases.

Per ``train`` message: read the site's data and policy from its node config (in simulation: the scenario's
``sim-sites.*``), rebuild the round's start from ``base`` and ``arrays``, run ``fedgt.org.site.local_round`` with a
secret noise source and the site's own ledger, and reply through ``fedgt.org.release`` (the update and the
whitelisted metrics, or a decline with its reason). The coverage score the server sends back for the site's
previous update (``coverage-last-round``) goes to the site's log.

Under secure aggregation (``strategy.secure-aggregation``) the server's SecAgg+ workflow sends the round as a legacy
``FitIns``; ``secaggplus_mod`` runs the protocol's stages and masks the update this handler returns, so the update
leaves the site only masked, together with the metrics the policy releases.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedgt.core.identity import from_config
from fedgt.core.org_data import simulated_data, site_data
from fedgt.core.run_config import COVERAGE_KEY, FedConfig, from_run_config
from fedgt.org.ledger import PrivacyLedger
from fedgt.org.policy import SitePolicy, simulated_policy, site_policy
from fedgt.org.release import describe_release, release, released_metrics
from fedgt.org.site import is_simulated, ledger_path, local_round, round_noise, tiny_model_dir

log = logging.getLogger("fedgt.client")
app = ClientApp()
_ANNOUNCED: set[tuple[int, int]] = set()  # (run, node) pairs whose release was already described


def _tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()} if record is not None else {}


def _policy(context: Context, cfg: FedConfig) -> SitePolicy:
    nc = dict(context.node_config)
    return simulated_policy(cfg.sim_sites, int(nc["partition-id"])) if is_simulated(nc) else site_policy(nc)


SECAGG_KEYS = "fedgt-keys"  # strategies.secagg.KEYS: the order of the factors in a secure-aggregation FitIns


def secagg_when_asked(msg: Message, context: Context, call_next):
    """Flower mod: SecAgg+ (``secaggplus_mod``) for the server's secure-aggregation messages, else pass through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    """One round of local private fine-tuning (Flower plumbing around ``local_round``)."""
    if "fitins.parameters" in msg.content.array_records:
        return _secagg_round(msg, context)
    policy = SitePolicy()  # until the site's own is read: releases nothing beyond the minimum
    try:
        cfg = from_run_config(context.run_config, check_paths=False)  # no probing of the site's disk
        policy = _policy(context, cfg)
        content = _round(msg, context, cfg, policy)
    except Exception as err:  # noqa: BLE001 - details (paths, data) stay in the site's log, never in the reply
        log.exception("organization %s: round failed", context.node_id)
        content = release(None, None, {}, policy, decline=f"site error ({type(err).__name__}); see the site's log")
    return Message(content=content, reply_to=msg)


def _secagg_round(msg: Message, context: Context) -> Message:
    """A secure-aggregation round: the same ``local_round``, its update returned as FitRes for SecAgg+ to mask.

    A site that declines (or fails) cannot send a vector into the secure sum: it raises, Flower replies with an
    error, and SecAgg+ treats the site as dropped out (the others' sum is still unmasked if enough remain).
    """
    cfg = from_run_config(context.run_config, check_paths=False)
    policy = _policy(context, cfg)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config[SECAGG_KEYS]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    start = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, arrays, strict=True)}
    config = {k: v for k, v in fitins.config.items() if k != SECAGG_KEYS}
    content = _round_content(msg, context, cfg, policy, config, {}, start)
    if "decline" in content.config_records:
        raise RuntimeError(f"organization {context.node_id} declines this round: {content['decline']['reason']}")
    update = content.array_records["arrays"]
    metrics = dict(content.metric_records["metrics"])
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([update[k].numpy() for k in keys]),
                    int(metrics.pop("num-examples")), released_metrics(metrics, policy))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _round(msg: Message, context: Context, cfg: FedConfig, policy: SitePolicy) -> RecordDict:
    """The round's reply content (``local_round`` plus Flower plumbing)."""
    return _round_content(msg, context, cfg, policy, msg.content["config"],
                          _tensors(msg.content.array_records.get("base")),
                          _tensors(msg.content.array_records.get("arrays")))


def _round_content(msg: Message, context: Context, cfg: FedConfig, policy: SitePolicy, config, base: dict,
                   start: dict) -> RecordDict:
    """``local_round`` on the site's own data, policy and ledger; the reply content ``release`` builds."""
    nc = dict(context.node_config)
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
    result = local_round(cfg, data, policy, base, start, server_round, ledger,
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
