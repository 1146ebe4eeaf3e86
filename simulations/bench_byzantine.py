"""Byzantine benchmark: 10% and 20% of the organizations attack; every aggregator's LGR against its clean run.

    python -m simulations.bench_byzantine            # default pair, 10 organizations, seeds 0,1,2
    python -m simulations.bench_byzantine --quick    # toy pair, 10 organizations, seed 0 (minutes)

Each seed draws the organizations (``data.seed``); every honest organization runs one round through the site code
(``fedgt.org.site.local_round``, no DP, from the shared starting adapter). Attackers are drawn per seed and
fraction; each replaces its honest release with one attack:

- ``sign_flip``: -10 x its honest update;
- ``scaled``: +10 x its honest update (boosting one organization's direction);
- ``random``: Gaussian noise with 10 x the honest median norm;
- ``inflated_weight``: its sign-flipped update (x1) with ``num-examples`` = 1e9.

Updates whose norm would exceed ``strategy.max-update-norm`` are scaled to just below it (the validator rejects
larger ones, so a capable attacker stays inside it). Replies go to the strategy as Flower reply messages through
``aggregate_train`` (validation, weight caps, coverage, aggregation, the GT), built as the ServerApp builds it
(``fedgt.server.server_app.make_strategy``) with only ``strategy.aggregator`` changed. Scored after one round on
every organization's test split (pooled LGR in exact match; the attackers' data counts too: the shared LLM serves
them as well). ``recommended``: of the aggregators whose worst drop from their own clean LGR at the largest fraction
stays within 10 points, the one whose worst LGR under attack is highest (if none stays within, the smallest drop).

    python -m simulations.bench_byzantine --from-json docs/results/byzantine.json   # re-render a saved result
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, RecordDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedgt.core.org_data import simulated_organizations  # noqa: E402
from fedgt.core.run_config import FedConfig  # noqa: E402
from fedgt.core.updates import unflatten  # noqa: E402
from fedgt.org.release import release  # noqa: E402
from fedgt.provider.provision import provide, provider_config_for, resolve_model  # noqa: E402
from fedgt.server.evaluation import run_evaluator  # noqa: E402
from fedgt.server.global_adapter import GlobalAdapter  # noqa: E402
from fedgt.server.server_app import _model_state, consolidator, make_strategy  # noqa: E402
from fedgt.server.translator import Translator  # noqa: E402
from simulations.bench_strategies import BENCH_POLICY, _client, _init, config_for  # noqa: E402

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded_mean", "distill")
ATTACKS = ("sign_flip", "scaled", "random", "inflated_weight")
FRACTIONS = (0.1, 0.2)
BOOST = 10.0  # sign_flip / scaled / random: 10 x an honest update's size
INFLATED = 1e9  # inflated_weight: the num-examples the attacker reports
TARGET_POINTS = 0.10  # the recommended aggregator keeps LGR within 10 points of clean at the largest fraction


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--orgs", type=int, default=10)
    p.add_argument("--seeds", default=None, help="comma-separated data seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--aggregators", default=",".join(AGGREGATORS))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="any run-config key")
    p.add_argument("--metric", default=None, help="lgr-em (default) or lgr (loss; --quick: the toy pair has no EM)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--name", default=None)
    p.add_argument("--from-json", type=Path, default=None, help="re-summarise and re-render a saved result")
    args = p.parse_args(argv)
    args.name = args.name or ("byzantine_quick" if args.quick else "byzantine")
    args.seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if x]
    args.rounds = 1
    args.metric = args.metric or ("lgr" if args.quick else "lgr-em")
    return args


def attack(kind: str, honest: torch.Tensor, weight: float, median_norm: float, max_norm: float,
           gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """(update tokens, reported num-examples) of one attacker whose honest release is ``honest``."""
    if kind == "sign_flip":
        bad = -BOOST * honest
    elif kind == "scaled":
        bad = BOOST * honest
    elif kind == "random":
        noise = torch.randn(honest.shape, generator=gen)
        bad = noise * (BOOST * median_norm / noise.norm())
    elif kind == "inflated_weight":
        return -honest, INFLATED
    else:
        raise ValueError(f"unknown attack {kind!r}; one of {ATTACKS}")
    norm = float(bad.norm())
    return (bad * (0.99 * max_norm / norm) if norm >= max_norm else bad), weight


def replies(updates: list[tuple[torch.Tensor, dict]], spec) -> list[Message]:
    """The organizations' releases as the reply messages a ServerApp receives (node ids 1..n)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # messages outside a Flower run: what a ServerApp process has
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)
    out = []
    for i, (tokens, metrics) in enumerate(updates):
        instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type="train")
        content = release(unflatten(tokens, spec), spec, metrics, BENCH_POLICY)
        out.append(Message(content, reply_to=instruction))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results.update(summarize(results["seeds"], results.get("metric", "lgr-em")))
        args.from_json.write_text(json.dumps(results, indent=1, default=float))
        args.from_json.with_suffix(".md").write_text(render(results))
        return results
    cfg = config_for(args)
    t_start = time.time()
    gt_dir = Path(cfg.gt.checkpoint) if cfg.gt.checkpoint else provide(provider_config_for(cfg))
    seeds = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(os.environ.get("FEDGT_CACHE"),)) as workers:
        for seed in args.seeds:
            print(f"=== seed {seed}", flush=True)
            seeds[str(seed)] = run_seed(args, config_for(args, seed), gt_dir, workers)
    summary = summarize(seeds, args.metric)
    results = {"command": "python -m simulations.bench_byzantine " + " ".join(argv if argv is not None else
                                                                                sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                          f"{args.workers} client workers; nothing else ran",
               "date": time.strftime("%Y-%m-%d"),
               "metric": args.metric,
               "config": {"organizations": args.orgs, "rounds": 1, "seeds": args.seeds, "gt": str(gt_dir),
                          "boost": BOOST, "inflated_num_examples": INFLATED,
                          "strategy": {k: v for k, v in cfg.strategy.__dict__.items() if k != "aggregator"}},
               **summary, "seeds": seeds, "total_wall_s": time.time() - t_start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / f"{args.name}.md").write_text(render(results))
    print(render(results))
    return results


def run_seed(args, cfg: FedConfig, gt_dir: Path, workers) -> dict:
    """Every aggregator, clean and under every attack and fraction, on one seed's organizations."""
    tiny_name, llm_name = (resolve_model(n) for n in cfg.model_names())
    lora = cfg.lora_settings()
    translator = Translator(gt_dir, cfg.gt.device, tiny_model=tiny_name)
    tiny, llm = _model_state(tiny_name, lora), _model_state(llm_name, lora)  # (update spec, seeded LoRA init)
    n = cfg.federation.num_organizations
    orgs = list(simulated_organizations(cfg, n))
    evaluator = run_evaluator(cfg, llm_name, orgs, translator.device)
    print(f"{n} organizations: the LGR ceiling (the LLM fine-tuned on each)", flush=True)
    evaluator.compute_ceiling(orgs, cfg.finetune_config())
    evaluator(GlobalAdapter(llm[0], llm[1], lora, "naive"))  # the untuned LLM's scores: LGR's zero
    start = dict(tiny[1])
    honest = workers.map(_client, [(cfg, org, {}, start, 1) for org in orgs])
    norms = [float(t.norm()) for t, _ in honest]
    median_norm = statistics.median(norms)
    conditions = [("clean", 0.0)] + [(a, f) for a in args.attacks.split(",") if a
                                      for f in (float(x) for x in args.fractions.split(",") if x)]
    rng = random.Random(cfg.data.seed)
    # node ids (1..n) of each fraction's attackers
    attackers = {f"{f:g}": sorted(i + 1 for i in rng.sample(range(n), max(1, round(f * n))))
                 for f in sorted({f for _, f in conditions if f})}
    out: dict = {"organizations": [o.name for o in orgs], "honest_norms": norms, "attackers": attackers,
                 "ceiling": evaluator.ceiling, "runs": {}}
    for aggregator in args.aggregators.split(","):
        acfg = replace(cfg, strategy=replace(cfg.strategy, aggregator=aggregator))
        distill = consolidator(acfg, gt_dir, llm_name, translator.device)
        for kind, fraction in conditions:
            gen = torch.Generator().manual_seed(cfg.data.seed * 1000 + int(100 * fraction))
            updates = []
            for i, (tokens, metrics) in enumerate(honest):
                if fraction and i + 1 in attackers[f"{fraction:g}"]:
                    bad, weight = attack(kind, tokens, metrics["num-examples"], median_norm,
                                         acfg.strategy.max_update_norm, gen)
                    metrics = {**metrics, "num-examples": weight}
                    tokens = bad
                updates.append((tokens, metrics))
            s = make_strategy(acfg, translator, tiny, llm, distill)
            t0 = time.perf_counter()
            s.aggregate_train(1, replies(updates, tiny[0]))
            server_s = time.perf_counter() - t0
            scores = evaluator(s.llm, s.llm_weight_change())
            entry = s.round_log[1]
            row = {"lgr-em": scores.get("lgr-em"), "lgr": scores.get("lgr"), "org-em": scores.get("org-em"),
                   "public-loss": scores["public-loss"], "server_s": server_s,
                   "rejected": [r["node"] for r in entry.get("rejected", [])],
                   "out_of_coverage": entry.get("out-of-coverage", []),
                   "skipped": entry.get("skipped"), "llm_unchanged": bool(entry.get("llm-unchanged"))}
            key = "clean" if kind == "clean" else f"{kind}/{fraction:g}"
            out["runs"].setdefault(aggregator, {})[key] = row
            print(f"{aggregator:<18} {key:<22} LGR EM {_pct(row['lgr-em'])}  loss {_pct(row['lgr'])}  "
                  f"outside coverage {row['out_of_coverage']}  rejected {row['rejected']}  {server_s:.1f} s",
                  flush=True)
    return out


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(seeds: dict, metric: str = "lgr-em") -> dict:
    """``{"clean": {agg: lgr}, "attacks": {attack: {fraction: {agg: lgr}}}, "recommended": agg}`` (seed means)."""
    first = next(iter(seeds.values()))
    clean, attacks, spread = {}, {}, {}
    for aggregator, runs in first["runs"].items():
        for key in runs:
            vals = [s["runs"][aggregator][key][metric] for s in seeds.values()]
            spread.setdefault(aggregator, {})[key] = _std(vals)
            if key == "clean":
                clean[aggregator] = _mean(vals)
            else:
                kind, fraction = key.split("/")
                attacks.setdefault(kind, {}).setdefault(fraction, {})[aggregator] = _mean(vals)
    top = max((f for a in attacks.values() for f in a), key=float, default=None)
    worst, floor = {}, {}
    for aggregator in clean:
        under = [a[top][aggregator] for a in attacks.values() if top in a]
        worst[aggregator] = max((clean[aggregator] - x for x in under), default=0.0)
        floor[aggregator] = min(under, default=clean[aggregator])
    # Among the aggregators that stay within the target of their clean run, the one whose worst LGR under attack
    # is highest; if none does, the one that drops least.
    robust = [a for a in worst if worst[a] <= TARGET_POINTS]
    recommended = (max(robust, key=lambda a: floor[a]) if robust else min(worst, key=lambda a: (worst[a], -clean[a]))) \
        if worst else None
    return {"clean": clean, "attacks": attacks, "recommended": recommended, "worst_drop": worst, "worst_lgr": floor,
            "target_met": bool(recommended is not None and worst[recommended] <= TARGET_POINTS),
            "std_over_seeds": spread}


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def render(results: dict) -> str:
    """Markdown report."""
    c = results["config"]
    aggs = list(results["clean"])
    n_seeds = len(c["seeds"])
    sd = results["std_over_seeds"]

    def cell(agg: str, key: str, value: float) -> str:
        return _pct(value) + (f" ± {100 * sd[agg][key]:.1f}" if n_seeds > 1 else "")

    lines = ["# Byzantine organizations", "", f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
             f"Date: {results['date']}  ",
             f"{c['organizations']} organizations, one round, seeds {c['seeds']}; GT `{c['gt']}`. Attacks: sign_flip "
             f"(-{c['boost']:g} x own update), scaled (+{c['boost']:g} x), random (noise, {c['boost']:g} x the "
             f"honest median norm), inflated_weight (own update sign-flipped, num-examples "
             f"{c['inflated_num_examples']:g})"
             "; each kept inside strategy.max-update-norm. Every other strategy setting is the default "
             f"(max-weight-ratio {c['strategy']['max_weight_ratio']}, trim-beta {c['strategy']['trim_beta']}, "
             f"norm-bound {c['strategy']['norm_bound']} {c['strategy']['norm_bound_mode']}, out-of-coverage "
             f"{c['strategy']['out_of_coverage']}).", "",
             f"Pooled LGR ({'exact match' if results['metric'] == 'lgr-em' else 'loss'}) of the shared LLM on every "
             "organization's test split"
             + (", mean ± standard deviation over seeds" if n_seeds > 1 else "") + ".", "",
             "| attack | fraction | " + " | ".join(aggs) + " |", "|---|---|" + "---|" * len(aggs),
             "| none (clean) | 0 | " + " | ".join(cell(a, "clean", results["clean"][a]) for a in aggs) + " |"]
    for kind, fractions in results["attacks"].items():
        for fraction, row in fractions.items():
            lines.append(f"| {kind} | {fraction} | " + " | ".join(cell(a, f"{kind}/{fraction}", row[a]) for a in aggs)
                         + " |")
    lines += ["", "| aggregator | worst drop from clean at the largest fraction | worst LGR there |", "|---|---|---|"]
    lines += [f"| {a} | {100 * results['worst_drop'][a]:.1f} points | {_pct(results['worst_lgr'][a])} |"
              for a in aggs]
    rec = results["recommended"]
    lines += ["", f"Recommended: **{rec}** (worst drop {100 * results['worst_drop'][rec]:.1f} points; target ≤ "
              f"{100 * TARGET_POINTS:.0f}: {'met' if results['target_met'] else 'missed'}).", "",
              "What the defences did (seed " + str(c["seeds"][0]) + "): organizations outside the GT's coverage "
              "(skipped) and replies rejected, per aggregator and attack.", "",
              "| aggregator | condition | attackers | outside coverage | rejected | LLM unchanged |",
              "|---|---|---|---|---|---|"]
    first = next(iter(results["seeds"].values()))
    for agg, runs in first["runs"].items():
        for key, row in runs.items():
            who = first["attackers"][key.split("/")[1]] if "/" in key else []
            lines.append(f"| {agg} | {key} | {who} | {row['out_of_coverage']} | {row['rejected']} | "
                         f"{row['llm_unchanged']} |")
    lines.append(f"\nTotal wall time {results['total_wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
