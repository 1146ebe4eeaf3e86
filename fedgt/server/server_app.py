"""Flower ServerApp: load the Grad-Transformer and the base models, run the rounds, evaluate and save the LLM.

Everything it writes goes to ``output.dir`` (default ``$FEDGT_CACHE/runs/<time>-run<id>``): ``metrics.jsonl``
(one line per round: LLM scores, the strategy's round log with every rejected or declined reply and why, each
update's coverage score and whether the round was accepted), ``metrics.png``, ``results.md`` (the table the demo
prints), ``report.html`` (the run on one self-contained page), ``tensorboard/`` (with ``output.tracking``),
``checkpoints/round-N.pt`` and the final LLM as a peft adapter in ``llm_adapter/``
(``PeftModel.from_pretrained(base_llm, dir)``; ``merged/`` inside with ``output.merged``). Each organization's own
LLM (transform-then-aggregate) is saved next to it: ``org_adapters/<node>/own`` (the GT's image of its last update
alone) and ``org_adapters/<node>/on_shared`` (on top of the shared LLM), for multi-LoRA serving; both are
post-processing of what the organization released.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgt.core.durable import write_durably
from fedgt.core.identity import MODEL_KEYS, IdentityMismatch, model_identity, verify_identity
from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters
from fedgt.core.models import cache_dir, load_model
from fedgt.core.org_data import simulated_organizations
from fedgt.core.run_config import FedConfig, from_run_config, to_run_config
from fedgt.core.updates import spec_of
from fedgt.provider.prompt_pool import PromptPool
from fedgt.provider.provision import provide, provider_config_for, published_identity, resolve_model
from fedgt.server.checkpoint import (
    check_same_run,
    latest_checkpoint,
    prepare_output,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fedgt.server.consolidate import Consolidator, DistillConfig
from fedgt.server.evaluation import run_evaluator
from fedgt.server.global_adapter import save_dense_peft
from fedgt.server.html_report import write_report
from fedgt.server.report import mean_scores, plot_rounds, results_table
from fedgt.server.tracking import Tracker
from fedgt.server.translator import Translator, finetune_from_json, lora_from_json
from strategies.central_dp import CentralDP
from strategies.grad_transformer import GradTransformerStrategy, QuorumLost
from strategies.secagg import run_secagg_rounds
from strategies.server_opt import ServerOptimizer

log = logging.getLogger("fedgt.server")
app = ServerApp()


def output_dir(cfg: FedConfig, run_id: int) -> Path:
    """Where this run writes (created); a previous run's folder only with output.resume."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
    out = Path(cfg.output.dir) if cfg.output.dir else cache_dir() / "runs" / stamp
    prepare_output(out, cfg.output.resume)
    out.mkdir(parents=True, exist_ok=True)
    return out


def gt_checkpoint(cfg: FedConfig) -> Path:
    """The Grad-Transformer to use: the configured one, or the provider default (built and cached on first use)."""
    return Path(cfg.gt.checkpoint) if cfg.gt.checkpoint else provide(provider_config_for(cfg))


def check_provider_match(cfg: FedConfig, meta: dict) -> list[str]:
    """Where the organizations' settings differ from what the GT was trained on (warnings, not errors)."""
    notes = []
    if lora_from_json(meta["lora"]) != cfg.lora_settings():
        notes.append(f"LoRA {cfg.lora_settings()} differs from the GT's {meta['lora']}")
    ft = finetune_from_json(meta["finetune"])
    ours = cfg.finetune_config()
    if (ft.steps, ft.lr, ft.batch_size) != (ours.steps, ours.lr, ours.batch_size):
        notes.append(f"local fine-tuning (steps {ours.steps}, lr {ours.lr}, batch {ours.batch_size}) differs from the "
                     f"GT's curation (steps {ft.steps}, lr {ft.lr}, batch {ft.batch_size}): updates will be off its "
                     "training distribution")
    return notes


def tiny_identity(meta: dict, tiny_model: str, lora: LoraSettings) -> dict[str, str] | None:
    """The server's TinyLM identity, checked against the one the provider published; fails fast on another TinyLM."""
    path = Path(tiny_model)
    if not path.is_dir():
        log.warning("TinyLM %s is no model directory: no identity to send, organizations' TinyLMs go unchecked",
                    tiny_model)
        return None
    ours = model_identity(path, lora)
    published = published_identity(meta)
    if published is None:
        log.warning("the Grad-Transformer's provider.json publishes no TinyLM identity (written before manifests): "
                    "organizations are checked against the server's own TinyLM %s, which nothing verifies", path)
        return ours
    # LoRA settings that differ from the GT's are check_provider_match's warning; the same settings must give the
    # same seeded init, else this peft/torch builds other initial factors than the ones the GT was trained from.
    keys = MODEL_KEYS + (("lora-init",) if published.get("lora") == ours["lora"] else ())
    try:
        verify_identity(published, ours, keys)
    except IdentityMismatch as err:
        raise IdentityMismatch(f"the server's TinyLM {path} is not the one the Grad-Transformer was trained on "
                               f"(model.tiny must name the provider's published TinyLM): {err}", err.fields) from err
    return ours


def wait_for_organizations(grid: Grid, cfg: FedConfig) -> int:
    """Wait up to federation.wait-s for federation.num-organizations nodes; start with at least min-organizations."""
    want, deadline = cfg.federation.num_organizations, time.monotonic() + cfg.federation.wait_s
    need = cfg.quorum()[0]
    while (have := len(list(grid.get_node_ids()))) < want:
        if time.monotonic() > deadline:
            if have >= need:
                log.warning("%d of federation.num-organizations=%d organizations connected within %g s; starting "
                            "with them (federation.min-organizations=%d)", have, want, cfg.federation.wait_s, need)
                return have
            raise QuorumLost(
                f"only {have} of federation.num-organizations={want} organizations connected within "
                f"{cfg.federation.wait_s:g} s (a round needs federation.min-organizations={need}). In simulation run "
                f"`flwr run . --federation-config \"num-supernodes={want}\"` (or `fedgt federate`, which sets it); "
                f"at partner sites start {want} SuperNodes or lower federation.num-organizations")
        time.sleep(0.5)
    return have


def consolidator(cfg: FedConfig, gt_dir: Path, llm_name: str, device: str | torch.device) -> Consolidator | None:
    """strategy.aggregator = "distill": the joint-adapter trainer on the provider's public prompts, else None."""
    if cfg.strategy.aggregator != "distill":
        return None
    d = cfg.distill
    dcfg = DistillConfig(prompts_per_teacher=d.prompts_per_teacher, neighbours=d.neighbours, steps=d.steps,
                         lr=d.lr, batch_size=d.batch_size, max_length=cfg.train.max_length, warm_start=d.warm_start,
                         seed=cfg.train.seed)
    return Consolidator(llm_name, cfg.lora_settings(), PromptPool.from_provider(gt_dir), dcfg, device)


def make_strategy(cfg: FedConfig, translator: Translator, tiny: tuple, llm: tuple, distill: Consolidator | None,
                  public_loss=None, identity: dict[str, str] | None = None) -> GradTransformerStrategy:
    """The strategy every ``strategy.*`` / ``federation.*`` setting describes (``tiny``, ``llm``: (spec, init))."""
    s = cfg.strategy
    n_orgs = cfg.federation.num_organizations
    min_orgs, min_replies = cfg.quorum()
    central = CentralDP(s.central_dp_clip, s.central_dp_noise_multiplier, cfg.dp.delta) if s.central_dp else None
    return GradTransformerStrategy(
        translate=translator, tiny_spec=tiny[0], llm_spec=llm[0], tiny_init=tiny[1], llm_init=llm[1],
        lora=cfg.lora_settings(), mode=s.mode, aggregator=s.aggregator, trim_beta=s.trim_beta,
        norm_bound=s.norm_bound, rounds=s.rounds, server_opt=ServerOptimizer(s.server_opt, lr=s.server_lr),
        central_dp=central, max_update_norm=s.max_update_norm, gt_batch_size=cfg.gt.batch_size, space=s.space,
        max_num_examples=float(s.max_num_examples), max_weight_ratio=s.max_weight_ratio,
        norm_bound_mode=s.norm_bound_mode, merge_scale=s.merge_scale, density=s.density, distill=distill,
        coverage=translator.coverage, out_of_coverage=s.out_of_coverage, coverage_threshold=s.coverage_threshold,
        public_loss=public_loss, accept_tolerance=s.accept_tolerance,
        fraction_train=s.fraction_train, fraction_evaluate=0.0, min_available_nodes=min_orgs,
        min_train_nodes=max(1, min(min_orgs, int(n_orgs * s.fraction_train))), min_replies=min_replies,
        wait_s=cfg.federation.wait_s, tiny_identity=identity)


def save_org_adapters(strategy: GradTransformerStrategy, llm_name: str, lora: LoraSettings, out: Path) -> list[Path]:
    """Each organization's own LLM adapter, alone and on top of the shared LLM (peft directories)."""
    saved = []
    for node in sorted(strategy.org_llm):
        for name, on_shared in (("own", False), ("on_shared", True)):
            path = out / "org_adapters" / str(node) / name
            saved.append(save_dense_peft(strategy.org_weight_change(node, on_shared), llm_name, lora, path))
    return saved


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line torn by a crash (the last one) is dropped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("resume: dropping a torn line of %s", path)
    return rows


def _model_state(name: str, lora) -> tuple:
    model = attach_lora(load_model(name)[0], lora)
    return spec_of(model), lora_parameters(model)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the whole federation; a failure's cause is also written to ``output.dir/error.txt`` for ``fedgt``."""
    cfg = from_run_config(context.run_config)
    out = output_dir(cfg, context.run_id)  # before anything is written: a used folder needs output.resume
    (out / "error.txt").unlink(missing_ok=True)
    try:
        run(grid, context, cfg, out)
    except Exception as err:
        (out / "error.txt").write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise


def run(grid: Grid, context: Context, cfg: FedConfig, out: Path) -> None:
    """The federation: models, GT, strategy, rounds, then every output."""
    run_config = to_run_config(cfg)
    if cfg.output.resume:
        check_same_run(out, run_config)
    else:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        (out / "run_config.json").write_text(json.dumps(run_config, indent=1))
    resumed = latest_checkpoint(out / "checkpoints") if cfg.output.resume else None
    tiny_name, llm_name = (resolve_model(n) for n in cfg.model_names())
    lora = cfg.lora_settings()
    gt_dir = gt_checkpoint(cfg)
    translator = Translator(gt_dir, cfg.gt.device, tiny_model=tiny_name)
    for note in check_provider_match(cfg, translator.meta):
        log.warning("Grad-Transformer %s: %s", gt_dir, note)
    identity = tiny_identity(translator.meta, tiny_name, lora)  # sent with every train message for sites to check
    tiny_spec, tiny_init = _model_state(tiny_name, lora)
    llm_spec, llm_init = _model_state(llm_name, lora)
    translator.check_specs(tiny_spec, llm_spec)
    if translator.coverage is None:
        log.warning("Grad-Transformer %s holds no curated TinyLM updates: coverage unknown, every update is applied",
                    gt_dir)

    # Evaluation: organizations' test splits exist on the server only in simulation.
    n_orgs = cfg.federation.num_organizations
    orgs = list(simulated_organizations(cfg, n_orgs)) if cfg.eval.org_tests else []
    evaluator = run_evaluator(cfg, llm_name, orgs, translator.device)
    if resumed is not None:
        evaluator.base_scores, evaluator.ceiling = resumed["evaluator"]["base"], resumed["evaluator"]["ceiling"]
    elif orgs and cfg.eval.ceiling:
        log.info("simulation only: fine-tuning the LLM on each organization's data for the LGR ceiling")
        evaluator.compute_ceiling(orgs, cfg.finetune_config())

    strategy = make_strategy(cfg, translator, (tiny_spec, tiny_init), (llm_spec, llm_init),
                             consolidator(cfg, gt_dir, llm_name, translator.device),
                             evaluator.public_loss if cfg.strategy.accept_rounds else None, identity)

    rows: list[dict] = []
    first_round = 1
    if resumed is not None:
        strategy.load_state_dict(resumed["strategy"])
        first_round = resumed["round"] + 1
        rows = [r for r in _read_rows(out / "metrics.jsonl") if r["round"] < first_round]
        write_durably(out / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in rows).encode())
        log.info("resuming %s after round %d of %d", out, resumed["round"], cfg.federation.num_server_rounds)
    elif cfg.output.resume:
        log.warning("output.resume: no usable checkpoint in %s; starting from round 1", out / "checkpoints")
        (out / "metrics.jsonl").unlink(missing_ok=True)

    tracker = Tracker(cfg.output.tracking, out, run_config, first_round if resumed is not None else 0)

    def evaluate(server_round: int) -> None:
        t0 = time.perf_counter()
        scores = evaluator(strategy.llm, strategy.llm_weight_change())
        row = {"round": server_round, "eval": scores, "eval_s": time.perf_counter() - t0,
               "log": strategy.round_log.get(server_round, {})}
        change = strategy.llm_weight_change()
        nodes = [n for n in sorted(strategy.org_llm) if n in strategy.org_partition]
        if orgs and nodes and change is not None:  # simulation: each organization's own adapter on its test split
            row["own"] = evaluator.own_adapters(torch.stack([strategy.org_llm[n] for n in nodes]),
                                                [strategy.org_partition[n] for n in nodes], change)
        rows.append(row)
        tracker.log_round(row)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if server_round > 0:  # after the row: a checkpoint of round N means metrics.jsonl holds round N
            save_checkpoint(out / "checkpoints", server_round, {
                "strategy": strategy.state_dict(), "rng": rng_state(),
                "evaluator": {"base": evaluator.base_scores, "ceiling": evaluator.ceiling}})
        log.info("round %d: %s", server_round, {k: v for k, v in scores.items() if k != "orgs"})

    t0 = time.time()
    stopped = None
    try:
        wait_for_organizations(grid, cfg)
        if resumed is None:
            evaluate(0)
        else:
            set_rng_state(resumed["rng"])  # as it was right after the checkpointed round
        if cfg.strategy.secure_aggregation:
            run_secagg_rounds(strategy, grid, context, first_round, cfg.federation.num_server_rounds, evaluate,
                              clip=cfg.strategy.secagg_clip, max_weight=float(cfg.strategy.max_num_examples),
                              timeout=cfg.federation.round_timeout_s)
        else:
            strategy.run_rounds(grid, first_round, cfg.federation.num_server_rounds, cfg.federation.round_timeout_s,
                                evaluate)
    except QuorumLost as err:  # the run ends cleanly: what the finished rounds built is saved below
        stopped = str(err)
        log.error("stopping the federation: %s", stopped)
    wall = time.time() - t0
    tracker.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    (out / "summary.json").write_text(json.dumps({
        "wall_s": wall, "server_peak_rss_mb": peak_mb, "rounds": cfg.federation.num_server_rounds,
        "organizations": n_orgs, "final": rows[-1]["eval"] if rows else {}, "stopped": stopped,
        "rounds_completed": max((r["round"] for r in rows), default=0),
        "server_s_per_round": {r["round"]: r["log"].get("server_s") for r in rows if r["round"] > 0},
        "ceiling": mean_scores(evaluator.ceiling)}, indent=1, default=float))
    change = strategy.llm_weight_change()
    adapter = strategy.llm.save_peft(llm_name, out / "llm_adapter", merged_copy=cfg.output.merged) if change is None \
        else save_dense_peft(change, llm_name, lora, out / "llm_adapter", merged_copy=cfg.output.merged)
    org_adapters = save_org_adapters(strategy, llm_name, lora, out) if cfg.output.org_adapters else []
    ceiling = evaluator.ceiling
    table = results_table(rows, evaluator.base_scores, ceiling, wall, cfg)
    if stopped:
        table += f"\nStopped early: {stopped}\n"
    (out / "results.md").write_text(table + f"\nLLM adapter: {adapter}\n"
                                    + (f"Per-organization adapters: {out / 'org_adapters'}\n" if org_adapters else ""))
    if rows:
        plot_rounds(rows, ceiling, out / "metrics.png")
    write_report(out)
    print(table, flush=True)
    print(f"outputs: {out} (open report.html)", flush=True)
