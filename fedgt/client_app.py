"""Flower ClientApp: an organization fine-tunes its TinyLM privately and replies with the update only.

Per ``train`` message: read this organization's data from the node config, check the privacy ledger, rebuild
the round's starting TinyLM (the base with the folded-in rounds from ``base``, LoRA factors from ``arrays``),
fine-tune with the configured DP mode, and reply with ``arrays`` = the TinyLM update (after minus start) and
``metrics`` (``num-examples``, train loss, ε spent, clip, σ). Over budget: reply with ``decline`` = the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgt.data import DomainData
from fedgt.evaluate import evaluate_split
from fedgt.fed_config import FedConfig, from_run_config
from fedgt.fed_data import organization_data
from fedgt.finetune import finetune
from fedgt.global_adapter import merge_into_base
from fedgt.ledger import BudgetExceeded, PrivacyLedger, round_mechanisms
from fedgt.lora import attach_lora, set_lora_parameters
from fedgt.models import cache_dir, load_model
from fedgt.provision import resolve_model
from fedgt.updates import UpdateSpec, spec_of, to_array_record, validate_update

log = logging.getLogger("fedgt.client")
app = ClientApp()
_ANNOUNCED: set[tuple[int, int]] = set()  # (run, node) pairs whose release was already described


def ledger_path(cfg: FedConfig, context: Context) -> Path:
    """Where this organization's privacy ledger lives (a site: beside its data; simulation: per run)."""
    nc = context.node_config
    if cfg.dp.ledger_dir:
        name = f"org-{nc['partition-id']}.json" if "partition-id" in nc else "ledger.json"
        return Path(cfg.dp.ledger_dir) / name
    if nc.get("data-path"):
        return Path(str(nc["data-path"])) / ".fedgt-ledger" / "ledger.json"
    return cache_dir() / "ledgers" / f"run-{context.run_id}" / f"org-{nc['partition-id']}.json"


def describe_release(spec: UpdateSpec, cfg: FedConfig) -> str:
    """Exactly what leaves the organization each round: keys, shapes, bytes, DP parameters."""
    lines = [f"each round this organization sends {len(spec.keys)} tensors, {spec.num_params:,} float32 values "
             f"({4 * spec.num_params:,} bytes): its TinyLM LoRA update"]
    lines += [f"  {k} {tuple(s)}" for k, s in zip(spec.keys, spec.shapes, strict=True)]
    d = cfg.dp
    if d.mode == "none":
        lines.append("  privacy: dp.mode=none — the update is NOT differentially private")
    elif d.mode == "dp-sgd":
        lines.append(f"  privacy: Opacus DP-SGD, ε={d.epsilon:g} per round at δ={d.delta:g}, per-sample clip "
                     f"{d.max_grad_norm:g}; budget ε={d.budget:g} over all rounds (RDP)")
    else:
        lines.append(f"  privacy: update clipped to L2 {d.update_clip:g} + Gaussian noise, ε={d.epsilon:g} per "
                     f"release at δ={d.delta:g}; budget ε={d.budget:g} over all rounds (RDP)")
    lines.append("  plus metrics: num-examples, train-loss, dp-* (ε spent, clip, σ)"
                 + (", tiny-test-loss/em (its own test split)" if cfg.eval.client_test else ""))
    return "\n".join(lines)


def local_round(cfg: FedConfig, data: DomainData, base: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                server_round: int, ledger: PrivacyLedger | None = None
                ) -> tuple[dict[str, torch.Tensor] | None, dict[str, float], UpdateSpec]:
    """One organization's round: rebuild the starting TinyLM, fine-tune privately; (update, metrics, spec).

    The update is None when the round would exceed the ledger's budget (metrics then say why: ``decline``).
    """
    tiny_name, _ = cfg.model_names()
    model, tokenizer = load_model(resolve_model(tiny_name))
    lora = cfg.lora_settings()
    model = attach_lora(model, lora)
    spec = spec_of(model)
    if base:
        merge_into_base(model, base, lora.scaling)
    validate_update(start, spec, source="server arrays")
    set_lora_parameters(model, start)
    dp = cfg.dp_config()
    ft = cfg.finetune_config(round_seed=1000 * server_round)
    mechanisms = round_mechanisms(dp, len(data.train), ft.batch_size, ft.steps)
    if ledger is not None and dp.mode != "none":
        try:
            ledger.check(mechanisms)
        except BudgetExceeded as err:
            return None, {"decline": f"organization {data.name}: {err}", "dp-epsilon-total": ledger.spent()}, spec
    result = finetune(model, tokenizer, data.train, ft, dp)
    metrics = {"num-examples": float(len(data.train)), "train-loss": result.metrics["train-loss"]}
    metrics.update({k: float(v) for k, v in result.metrics.items() if k.startswith("dp-")})
    if ledger is not None and dp.mode != "none":
        metrics["dp-epsilon-total"] = ledger.record(mechanisms, server_round, {"examples": len(data.train)})
        metrics["dp-budget"] = cfg.dp.budget
    if cfg.eval.client_test and data.test:
        scores = evaluate_split(model, tokenizer, list(data.test[:cfg.eval.test_examples]), ft.max_length)
        metrics["tiny-test-loss"] = scores["loss"]
        if "exact_match" in scores:
            metrics["tiny-test-em"] = scores["exact_match"]
    return result.update, metrics, spec


def _tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()} if record is not None else {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local private fine-tuning (Flower plumbing around ``local_round``)."""
    cfg = from_run_config(context.run_config)
    server_round = int(msg.content["config"]["server-round"])
    data = organization_data(cfg, dict(context.node_config))
    ledger = PrivacyLedger(ledger_path(cfg, context), cfg.dp.budget, cfg.dp.delta) if cfg.dp.mode != "none" else None
    update, metrics, spec = local_round(cfg, data, _tensors(msg.content.array_records.get("base")),
                                        _tensors(msg.content.array_records.get("arrays")), server_round, ledger)
    if (context.run_id, context.node_id) not in _ANNOUNCED:
        _ANNOUNCED.add((context.run_id, context.node_id))
        log.info("organization %s (%s):\n%s", context.node_id, data.name, describe_release(spec, cfg))
    if update is None:
        reason = str(metrics.pop("decline"))
        log.warning(reason)
        content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1, **metrics}),
                              "decline": ConfigRecord({"reason": reason})})
        return Message(content=content, reply_to=msg)
    content = RecordDict({"arrays": to_array_record(update, spec), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
