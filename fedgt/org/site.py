"""One organization's round at its site: check the model and the request, fine-tune privately, account, release.

``local_round`` is the whole of what a site does with a ``train`` message, free of Flower (the ClientApp only
unpacks the message and packs the reply through ``fedgt.org.release``). The site's data, its policy, its ledger
and its noise never depend on anything the server sends; the server's run config only requests.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedgt.core.data import DomainData
from fedgt.core.evaluate import evaluate_split
from fedgt.core.finetune import finetune
from fedgt.core.identity import IdentityMismatch, model_identity, verify_identity
from fedgt.core.lora import attach_lora, merge_into_base, set_lora_parameters
from fedgt.core.models import cache_dir, load_model, local_model_dir
from fedgt.core.noise import NoiseSource, SecretNoise, SeededNoise
from fedgt.core.run_config import FedConfig
from fedgt.core.updates import UpdateSpec, spec_of, validate_update
from fedgt.org.ledger import BudgetExceeded, PrivacyLedger, round_mechanisms
from fedgt.org.policy import RequestRefused, SitePolicy, grant

log = logging.getLogger("fedgt.org")


@dataclass
class RoundResult:
    """What a round produced at the site; ``fedgt.org.release`` decides which part of it leaves."""

    spec: UpdateSpec | None
    update: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    decline: str | None = None


def in_flower_simulation() -> bool:
    """Whether this process is a ClientApp actor of Flower's Ray simulation backend: never a partner site's SuperNode.

    The server cannot fake it (unlike node-config keys such as ``partition-id``, which a site may set by habit).
    """
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """An emulated organization: a partition of a Ray simulation, not a site naming its own data."""
    return "partition-id" in node_config and not node_config.get("data-path") and in_flower_simulation()


def ledger_path(policy: SitePolicy, node_config: Mapping[str, Any], run_id: int) -> Path:
    """Where the ledger lives: the policy's file; beside a site's data; per run and organization in simulation."""
    if policy.ledger:
        return Path(policy.ledger).expanduser()
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])) / ".fedgt-ledger" / "ledger.json"
    return cache_dir() / "ledgers" / f"run-{run_id}" / f"org-{node_config['partition-id']}.json"


def round_noise(policy: SitePolicy, org_key: str, server_round: int) -> NoiseSource:
    """The round's DP randomness: secret, unless a simulation's policy opted into a seed (then a loud warning)."""
    if policy.noise_seed is None:
        return SecretNoise()
    log.warning("SIMULATION ONLY: organization %s draws reproducible DP noise from sim-sites.noise-seed=%d; anyone "
                "with the seed can remove it: this run's updates are NOT private", org_key, policy.noise_seed)
    digest = hashlib.sha256(f"{policy.noise_seed}/{org_key}/{server_round}".encode()).digest()
    return SeededNoise(int.from_bytes(digest[:8], "little") >> 1)


def tiny_model_dir(cfg: FedConfig, policy: SitePolicy) -> Path:
    """The site's local copy of the provider's TinyLM: its policy's directory, else the prepared preset; never built."""
    return Path(policy.tiny_model) if policy.tiny_model else local_model_dir(cfg.model_names()[0])


def check_base(base: Mapping[str, torch.Tensor]) -> None:
    """The folded-in rounds the server sends must be finite: a crafted overflow must not reach training."""
    for key, tensor in base.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"server base factors {key!r} hold NaN or infinite values")


def check_model(model_dir: Path, cfg: FedConfig, published: Mapping[str, str] | None) -> str | None:
    """Why this site's TinyLM is not the one the provider published (None when it is)."""
    if published is None:
        return "model identity: the server sent no TinyLM manifest to verify against; declining"
    try:
        verify_identity(published, model_identity(model_dir, cfg.lora_settings()))
    except IdentityMismatch as err:
        return f"model identity: {err}; declining"
    return None


def local_round(cfg: FedConfig, data: DomainData, policy: SitePolicy, base: Mapping[str, torch.Tensor],
                start: Mapping[str, torch.Tensor], server_round: int, ledger: PrivacyLedger | None,
                noise: NoiseSource, model_dir: Path, published: Mapping[str, str] | None = None) -> RoundResult:
    """One round: verify the TinyLM, grant the request, rebuild the round's start, fine-tune privately, account."""
    reason = check_model(model_dir, cfg, published)
    if reason is not None:
        return RoundResult(None, decline=reason)
    try:
        dp = grant(policy, cfg.dp)
    except RequestRefused as err:
        return RoundResult(None, decline=f"privacy request refused: {err}")
    model, tokenizer = load_model(model_dir)
    lora = cfg.lora_settings()
    model = attach_lora(model, lora)
    spec = spec_of(model)
    check_base(base)
    if base:
        merge_into_base(model, dict(base), lora.scaling)
    validate_update(dict(start), spec, source="server arrays")
    set_lora_parameters(model, dict(start))
    ft = cfg.finetune_config(round_seed=1000 * server_round)
    mechanisms = round_mechanisms(dp, len(data.train), ft.batch_size, ft.steps)
    total = None
    if ledger is not None and mechanisms:  # charged before training: concurrent runs cannot overspend
        try:
            total = ledger.spend(mechanisms, server_round)
        except BudgetExceeded as err:
            return RoundResult(spec, metrics={"dp-epsilon-total": ledger.spent()}, decline=str(err))
    result = finetune(model, tokenizer, data.train, ft, dp, noise)
    metrics = {"num-examples": float(len(data.train)), "train-loss": result.metrics["train-loss"]}
    metrics.update({k: float(v) for k, v in result.metrics.items() if k.startswith("dp-")})
    if total is not None:
        metrics["dp-epsilon-total"] = total
        metrics["dp-budget"] = ledger.budget
    wants_scores = cfg.eval.client_test and {"tiny-test-loss", "tiny-test-em"} & set(policy.release)
    if wants_scores and data.test:  # scored only when the run asks and the policy would release them
        scores = evaluate_split(model, tokenizer, list(data.test[:cfg.eval.test_examples]), ft.max_length)
        metrics["tiny-test-loss"] = scores["loss"]
        if "exact_match" in scores:
            metrics["tiny-test-em"] = scores["exact_match"]
    return RoundResult(spec, result.update, metrics)
