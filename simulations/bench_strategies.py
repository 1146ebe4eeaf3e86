"""Aggregation-strategy benchmark: aggregators, merges and consolidation on the same organizations, several seeds.

    python -m simulations.bench_strategies            # default pair, 8 organizations, 3 rounds, seeds 0,1,2
    python -m simulations.bench_strategies --quick    # toy pair, 2 organizations, 2 rounds, 1 seed (minutes)
    python -m simulations.bench_strategies --scale    # also 10 vs 100 organizations through `flwr run`

Each seed draws other organizations (domains and samples: ``data.seed``). Every figure is reported pooled over
organizations and as the median of the per-organization LGR, so one easy domain cannot carry it. The merge
methods' scale (lambda) is chosen by the provider on public data only (``fedgt.provider.merge_scale``: groups of
its shadow domains play the organizations), never on an organization's data. Per organization: its own
TinyLM (one round's fine-tune from the base, the ceiling's budget), the shared LLM, its own LLM adapter (the GT's
image of its update, alone and on the shared LLM) and the ceiling (the LLM fine-tuned on its data).

Strategy runs reuse the app's own pieces in one process, so every configuration sees the same organizations,
seeds and client code: ``fedgt.org.site.local_round`` for each organization (2 worker processes; a client round
is computed once per distinct TinyLM starting state and shared by every configuration that reaches it),
``GradTransformerStrategy.apply`` on the server, ``evaluation.LLMEvaluator`` after each round. Reported per round:
LGR in exact match and in loss on the organizations' test splits (pooled), and the server's time (validation
excluded: the GT and the aggregation). References: the untuned LLM, each organization's own fine-tuned TinyLM,
the LLM fine-tuned on each organization's data (the LGR ceiling) and, as an upper reference for a federation,
FedAvg of those LLM updates (what the organizations would get if they could train the LLM themselves).

The scale run goes through the real Flower simulation engine (``flwr run``): 10 and 100 organizations x 3
rounds, wall time and the ServerApp's peak RSS (``simulations/scale_100.toml`` settings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedgt.core.identity import model_identity  # noqa: E402
from fedgt.core.judge import LLMJudge  # noqa: E402
from fedgt.core.lora import attach_lora, lora_parameters  # noqa: E402
from fedgt.core.metrics import pooled_ratio  # noqa: E402
from fedgt.core.models import load_model, local_model_dir  # noqa: E402
from fedgt.core.noise import SeededNoise  # noqa: E402
from fedgt.core.org_data import simulated_organizations  # noqa: E402
from fedgt.core.run_config import FedConfig, from_run_config, load_toml, pyproject_run_config  # noqa: E402
from fedgt.core.updates import flatten, spec_of  # noqa: E402
from fedgt.org.policy import SitePolicy  # noqa: E402
from fedgt.org.site import local_round  # noqa: E402
from fedgt.provider.merge_scale import choose_merge_scale, dense_vectors  # noqa: E402
from fedgt.provider.prompt_pool import PromptPool  # noqa: E402
from fedgt.provider.provision import provide, provider_config_for, resolve_model  # noqa: E402
from fedgt.provider.public_data import task_shadow_domains  # noqa: E402
from fedgt.provider.shadow import load_pairs  # noqa: E402
from fedgt.server.compare_report import compare  # noqa: E402
from fedgt.server.consolidate import Consolidator, DistillConfig  # noqa: E402
from fedgt.server.evaluation import LLMEvaluator, run_evaluator  # noqa: E402
from fedgt.server.global_adapter import GlobalAdapter  # noqa: E402
from fedgt.server.translator import Translator  # noqa: E402
from strategies import merging  # noqa: E402
from strategies.grad_transformer import GradTransformerStrategy  # noqa: E402

AGGREGATORS = ("mean", "trimmed_mean", "task_arithmetic", "ties", "dare", "distill")
MERGES = ("task_arithmetic", "ties", "dare")
MODES = ("transform-then-aggregate", "aggregate-then-transform")
SCHEMES = ("retranslate", "merge", "naive")
SCALE_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # TIES averages (disjoint mean): its scale is ~1-3
RECOMMENDED = "distill/transform-then-aggregate/fresh/weights"
REFERENCE_LABELS = (
    ("tiny_ft_round1", "each organization's own fine-tuned TinyLM (one round from the base)"),
    ("llm_fedavg_round1", "FedAvg of the organizations' own LLM updates (if they could train the LLM; round 1)"),
    ("llm_deltaw_mean_round1", "exact weight-space mean of those LLM updates (round 1)"),
    *((f"llm_{m}_round1", f"{m} of those LLM updates (scale chosen on public data)") for m in MERGES),
    ("llm_distill_round1", "consolidation with those LLM updates as teachers (oracle teachers)"),
    ("gt_deltaw_mean_round1", "exact weight-space mean of the GT's LLM updates (round 1)"),
    ("llm_union_ft", "LLM fine-tuned on the union of all organizations' data (centralised, same budget)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--orgs", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma-separated data seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--aggregators", default=",".join(AGGREGATORS))
    p.add_argument("--modes", default="transform-then-aggregate")
    p.add_argument("--schemes", default="fresh,retranslate")
    p.add_argument("--spaces", default="weights", help="LLM aggregation spaces (weights: retranslate only)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="any run-config key")
    p.add_argument("--scale", action="store_true", help="also the 10 vs 100 organizations flwr runs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    args.name = args.name or ("strategies_quick" if args.quick else "strategies")
    args.seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if x]
    return args


def config_for(args, seed: int | None = None) -> FedConfig:
    import tomllib

    base = pyproject_run_config(ROOT / "pyproject.toml")
    if args.quick:
        base.update(load_toml_flat(ROOT / "simulations" / "toy.toml"))
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            base[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            base[key] = value
    if args.orgs:
        base["federation.num-organizations"] = args.orgs
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    if seed is not None:
        base["data.seed"] = seed
    return from_run_config(base)


def load_toml_flat(path: Path) -> dict:
    import tomllib

    from fedgt.core.run_config import _flatten

    load_toml(path)  # validates
    return _flatten(tomllib.loads(path.read_text()))


def _digest(*tensors: dict) -> str:
    h = hashlib.sha256()
    for d in tensors:
        for k in sorted(d):
            h.update(k.encode())
            h.update(d[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _init(cache: str | None) -> None:
    torch.set_num_threads(1)
    if cache:
        os.environ["FEDGT_CACHE"] = cache


# The benchmark's organizations: no DP, scores released, seeded (reproducible) noise source.
BENCH_POLICY = SitePolicy(dp_mode="none", release=("train-loss", "tiny-test-loss", "tiny-test-em"), source="benchmark")


def _client(task):
    cfg, org, base, start, rnd = task
    model_dir = local_model_dir(cfg.model_names()[0])
    result = local_round(cfg, org, BENCH_POLICY, base, start, rnd, None, SeededNoise(rnd), model_dir,
                         model_identity(model_dir, cfg.lora_settings()))
    if result.update is None:
        raise RuntimeError(f"benchmark organization declined: {result.decline}")
    return flatten(result.update, result.spec), result.metrics


def merge_fn(method: str, density: float, seed: int = 0):
    """A merge method of ``strategies.merging`` as ``(stacked dense deltas, scale) -> merged``."""
    if method == "task_arithmetic":
        return lambda v, s: merging.task_arithmetic(v, s)
    if method == "ties":
        return lambda v, s: merging.ties(v, density, s)
    return lambda v, s: merging.dare(v, density, s, torch.Generator().manual_seed(seed))


def provider_scales(cfg: FedConfig, gt_dir: Path, translator: Translator, judge: LLMJudge) -> dict:
    """Each merge method's scale chosen on the provider's shadow domains: for GT images and for true LLM updates."""
    pool_meta = json.loads((gt_dir / "provider.json").read_text())["provider"]
    pairs = load_pairs(gt_dir.parent / "shadow").final()
    order = torch.argsort(pairs.domain)
    domains = {d.name: d for d in task_shadow_domains(pool_meta["n_examples"], pool_meta["shadow_domains"],
                                                      pool_meta["seed"])}
    tests = [list(domains[n].test[:cfg.eval.test_examples]) for n in pairs.names]
    n = min(cfg.federation.num_organizations, len(tests))
    sources = {"gt": translator(pairs.tiny[order]), "oracle": pairs.llm[order]}
    out: dict = {}
    for source, updates in sources.items():
        for method in MERGES:
            best, table = choose_merge_scale(judge, updates, tests, merge_fn(method, cfg.strategy.density),
                                             SCALE_GRID, cfg.lora_settings().scaling, n=n)
            out.setdefault(source, {})[method] = {"scale": best, "em_by_scale": table}
            print(f"provider: {method} on {source} updates -> scale {best} ({table})", flush=True)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = config_for(args)
    t_start = time.time()
    tiny_name, llm_name = (resolve_model(n) for n in cfg.model_names())
    gt_dir = Path(cfg.gt.checkpoint) if cfg.gt.checkpoint else provide(provider_config_for(cfg))
    translator = Translator(gt_dir, cfg.gt.device)
    judge = LLMJudge(llm_name, cfg.lora_settings(), device=translator.device, max_length=cfg.train.max_length)
    scales = provider_scales(cfg, gt_dir, translator, judge)
    pool = PromptPool.from_provider(gt_dir)
    seeds = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(os.environ.get("FEDGT_CACHE"),)) as workers:
        for seed in args.seeds:
            print(f"=== seed {seed}", flush=True)
            seeds[str(seed)] = run_seed(args, config_for(args, seed), translator, gt_dir, scales, pool, workers)
    results = {"command": "python -m simulations.bench_strategies " + " ".join(argv if argv is not None else
                                                                                 sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                          f"GT device {translator.device}; nothing else ran",
               "date": time.strftime("%Y-%m-%d"),
               "config": {"organizations": cfg.federation.num_organizations, "rounds": cfg.federation.num_server_rounds,
                          "seeds": args.seeds, "gt": str(gt_dir), "data": cfg.data.__dict__,
                          "train": cfg.train.__dict__, "distill": cfg.distill.__dict__,
                          "density": cfg.strategy.density},
               "merge_scales": scales, "seeds": seeds}
    results["summary"] = summarize_seeds(seeds)
    results["headline"] = headline(results)
    if args.scale and not args.quick:
        results["scale"] = scale_runs(cfg)
    results["total_wall_s"] = time.time() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / f"{args.name}.md").write_text(render(results))
    plot(results, args.out / f"{args.name}.png")
    compare([args.out / f"{args.name}.json"])  # {name}.html: the strategies on one comparison page
    print(render(results))
    return results


def run_seed(args, cfg: FedConfig, translator: Translator, gt_dir: Path, scales: dict, pool: PromptPool,
             workers) -> dict:
    """Every configuration on one seed's organizations: references, per-round scores, per-organization rows."""
    tiny_name, llm_name = (resolve_model(n) for n in cfg.model_names())
    lora = cfg.lora_settings()
    tiny_model = attach_lora(load_model(tiny_name)[0], lora)
    llm_model = attach_lora(load_model(llm_name)[0], lora)
    tiny_spec, tiny_init = spec_of(tiny_model), lora_parameters(tiny_model)
    llm_spec, llm_init = spec_of(llm_model), lora_parameters(llm_model)
    del tiny_model, llm_model
    n_orgs, rounds = cfg.federation.num_organizations, cfg.federation.num_server_rounds
    orgs = list(simulated_organizations(cfg, n_orgs))
    evaluator = run_evaluator(cfg, llm_name, orgs, translator.device)
    print(f"{n_orgs} organizations: fine-tuning the LLM on each for the LGR ceiling", flush=True)
    evaluator.compute_ceiling(orgs, cfg.finetune_config())
    evaluator(GlobalAdapter(llm_spec, llm_init, lora, "naive"))  # sets the base scores
    d = cfg.distill
    dcfg = DistillConfig(
        prompts_per_teacher=d.prompts_per_teacher, neighbours=d.neighbours, steps=d.steps, lr=d.lr,
        batch_size=d.batch_size, max_length=cfg.train.max_length, warm_start=d.warm_start, seed=cfg.train.seed)
    consolidator = lambda: Consolidator(llm_name, lora, pool, dcfg, translator.device)  # noqa: E731

    cache: dict = {}
    runs = {}
    combos = [(space, scheme, aggregator, mode) for space in args.spaces.split(",") if space
              for scheme in args.schemes.split(",") if scheme and (space == "factors" or scheme in ("retranslate",
                                                                                                          "fresh"))
              for aggregator in args.aggregators.split(",") if aggregator
              for mode in args.modes.split(",") if mode and (aggregator != "distill" or mode == MODES[0])]
    for space, scheme, aggregator, mode in combos:
        name = f"{aggregator}/{mode}/{scheme}/{space}"
        s = GradTransformerStrategy(
            translate=translator, tiny_spec=tiny_spec, llm_spec=llm_spec, tiny_init=tiny_init,
            llm_init=llm_init, lora=lora, mode=mode, aggregator=aggregator,
            trim_beta=cfg.strategy.trim_beta, norm_bound=cfg.strategy.norm_bound, rounds=scheme,
            norm_bound_mode=cfg.strategy.norm_bound_mode, max_weight_ratio=cfg.strategy.max_weight_ratio,
            max_update_norm=cfg.strategy.max_update_norm, gt_batch_size=cfg.gt.batch_size, space=space,
            merge_scale=scales["gt"][aggregator]["scale"] if aggregator in MERGES else 1.0,
            density=cfg.strategy.density, distill=consolidator() if aggregator == "distill" else None)
        rows = []
        for rnd in range(1, rounds + 1):
            base, start = s.tiny.base_factors(), dict(s.tiny.current)
            key = _digest(base, start)
            todo = [i for i in range(n_orgs) if (i, rnd, key) not in cache]
            results = workers.map(_client, [(cfg, orgs[i], base, start, rnd) for i in todo])
            cache.update({(i, rnd, key): r for i, r in zip(todo, results, strict=True)})
            contributions = [(i, cache[(i, rnd, key)][0], cache[(i, rnd, key)][1]["num-examples"],
                              cache[(i, rnd, key)][1]) for i in range(n_orgs)]
            t0 = time.perf_counter()
            s.apply(rnd, contributions)
            server_s = time.perf_counter() - t0
            scores = evaluator(s.llm, s.llm_weight_change())
            row = {"round": rnd, "server_s": server_s, **{k: v for k, v in scores.items() if k != "orgs"},
                   "per_org": _per_org_lgr(list(scores["orgs"].values()), evaluator),
                   "tiny_em": [c[3].get("tiny-test-em") for c in contributions], **s.distill_stats}
            row["lgr-em-median"] = _median(row["per_org"]["lgr-em"])
            row["lgr-median"] = _median(row["per_org"]["lgr"])
            if s.org_llm:
                row["own_adapter"] = _own_adapters(s, evaluator)
            rows.append(row)
        runs[name] = {"aggregator": aggregator, "mode": mode, "scheme": scheme, "space": space, "rounds": rows}
        last = rows[-1]
        print(f"{name:<55} LGR EM pooled/median, loss after round {rounds}: {last.get('lgr-em', math.nan):.3f} / "
              f"{last['lgr-em-median']:.3f}, {last.get('lgr', math.nan):.3f}  server "
              f"{sum(r['server_s'] for r in rows):.1f} s", flush=True)
    round1 = [cache[(i, 1, _digest({}, dict(tiny_init)))] for i in range(n_orgs)]
    refs = references(evaluator, cfg, orgs, round1, translator, scales, consolidator())
    return {"organizations": [o.name for o in orgs], "base": evaluator.base_scores, "ceiling": evaluator.ceiling,
            "references": refs, "runs": runs}


def _median(xs: list) -> float:
    xs = sorted(x for x in xs if x is not None and x == x)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _per_org_lgr(scores: list[dict], ev: LLMEvaluator) -> dict:
    """Each organization's EM and its own LGR (EM and loss); None where its ceiling equals the base."""
    out = {"em": [s.get("exact_match") for s in scores], "loss": [s["loss"] for s in scores]}
    for key, name in (("exact_match", "lgr-em"), ("loss", "lgr")):
        vals = []
        for s, b, c in zip(scores, ev.base_scores, ev.ceiling, strict=True):
            den = c.get(key, math.nan) - b.get(key, math.nan)
            vals.append((s.get(key, math.nan) - b[key]) / den if key in s and den not in (0, math.nan) and den == den
                        else None)
        out[name] = vals
    return out


def _own_adapters(s: GradTransformerStrategy, ev: LLMEvaluator) -> dict:
    """Each organization scored with its own LLM adapter: alone, and on top of the shared LLM."""
    nodes = sorted(s.org_llm)
    tokens = torch.stack([s.org_llm[n] for n in nodes])
    tests = [ev.org_tests[n] for n in nodes]
    shared = s.llm_weight_change()
    ev.judge.set_dense(shared if shared is not None else {})
    on_shared = ev.judge.score(tokens, tests)
    ev.judge.set_dense({})
    alone = ev.judge.score(tokens, tests)
    return {"alone": _per_org_lgr(alone, ev), "on_shared": _per_org_lgr(on_shared, ev)}


def references(ev: LLMEvaluator, cfg: FedConfig, orgs, round1, translator: Translator, scales: dict,
               consolidator: Consolidator) -> dict:
    """What the organizations would get without the GT (simulation only), and the GT's plain mean."""
    from fedgt.provider.shadow import LoraTuner

    tuner = LoraTuner(ev.llm_model, ev.lora)
    ups = torch.stack([tuner.tokens(tuner.run(list(o.train), cfg.finetune_config()).update) for o in orgs])
    weights = torch.tensor([len(o.train) for o in orgs], dtype=torch.float32)
    weights = weights / weights.sum()
    tiny = torch.stack([t for t, _ in round1])
    tiny_scores = [{"exact_match": m.get("tiny-test-em"), "loss": m.get("tiny-test-loss")} for _, m in round1]
    mean = (ups * weights.view(-1, 1, 1)).sum(0)
    refs = {"tiny_ft_round1": tiny_scores,
            "llm_fedavg_round1": ev.judge.score(mean.unsqueeze(0).expand(len(orgs), -1, -1), ev.org_tests),
            "llm_deltaw_mean_round1": _dense_scores(ev, dense_vectors(ev.judge, ups, ev.lora.scaling).T @ weights)}
    for method in MERGES:
        merged = merge_fn(method, cfg.strategy.density)(dense_vectors(ev.judge, ups, ev.lora.scaling),
                                                         scales["oracle"][method]["scale"])
        refs[f"llm_{method}_round1"] = _dense_scores(ev, merged)
    t0 = time.perf_counter()
    joint = consolidator(ups, tiny)
    refs["llm_distill_round1"] = ev.judge.score(joint.unsqueeze(0).expand(len(orgs), -1, -1), ev.org_tests)
    distill_s = time.perf_counter() - t0
    gt = translator(tiny)
    refs["gt_deltaw_mean_round1"] = _dense_scores(ev, dense_vectors(ev.judge, gt, ev.lora.scaling).T @ weights)
    refs["gt_own_round1"] = ev.judge.score(gt, ev.org_tests)
    union = [ex for o in orgs for ex in o.train]
    u = tuner.tokens(tuner.run(union, cfg.finetune_config()).update)
    refs["llm_union_ft"] = ev.judge.score(u.unsqueeze(0).expand(len(orgs), -1, -1), ev.org_tests)
    out = {k: {"per_org": _per_org_lgr(v, ev), **_pooled(v, ev)} for k, v in refs.items()}
    out["llm_distill_round1"]["server_s"] = distill_s
    return out


def _dense_scores(ev: LLMEvaluator, vector: torch.Tensor) -> list[dict]:
    """Scores of base + one dense weight change (flattened in spec order) on every organization's test split."""
    from fedgt.core.dense import vector_to_dense

    ev.judge.set_dense(vector_to_dense(vector, ev.judge.spec))
    zeros = torch.zeros(len(ev.org_tests), ev.judge.spec.num_layers, ev.judge.spec.token_dim)
    try:
        return ev.judge.score(zeros, ev.org_tests)
    finally:
        ev.judge.set_dense({})


def _pooled(scores: list[dict], ev: LLMEvaluator) -> dict:
    """Mean EM / loss over organizations, pooled LGR and the median of per-organization LGR."""
    out = {}
    per = _per_org_lgr(scores, ev)
    for key, src, lgr in (("org-em", "exact_match", "lgr-em"), ("org-loss", "loss", "lgr")):
        vals = [s.get(src) for s in scores]
        if all(v is not None for v in vals):
            out[key] = sum(vals) / len(vals)
            out[lgr] = pooled_ratio(vals, [b[src] for b in ev.base_scores], [c[src] for c in ev.ceiling])
            out[lgr + "-median"] = _median(per[lgr])
    return out


def _stat(xs: list) -> dict:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    m = sum(xs) / len(xs)
    return {"mean": m, "std": (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5, "n": len(xs)}


def summarize_seeds(seeds: dict) -> dict:
    """Mean and spread over seeds of every reference and of every run's per-round scores."""
    first = next(iter(seeds.values()))
    keys = ("org-em", "lgr-em", "lgr-em-median", "lgr", "lgr-median", "public-loss", "server_s")
    refs = {r: {k: _stat([s["references"][r].get(k) for s in seeds.values()]) for k in keys[:5]}
            for r in first["references"]}
    runs = {}
    for name, run in first["runs"].items():
        rows = []
        for i, _ in enumerate(run["rounds"]):
            got = [s["runs"][name]["rounds"][i] for s in seeds.values()]
            row = {k: _stat([g.get(k) for g in got]) for k in keys}
            if "own_adapter" in got[0]:
                for kind in ("alone", "on_shared"):
                    row[f"own-{kind}-lgr-em"] = _stat([_pool_list(g["own_adapter"][kind]["lgr-em"]) for g in got])
                    row[f"own-{kind}-lgr-em-median"] = _stat([_median(g["own_adapter"][kind]["lgr-em"])
                                                                for g in got])
                    row[f"own-{kind}-em"] = _stat([_mean(g["own_adapter"][kind]["em"]) for g in got])
            rows.append(row)
        runs[name] = rows
    return {"references": refs, "runs": runs}


def _pool_list(xs: list) -> float:
    return _mean(xs)


def _mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else None


def beats_tiny(seed: dict, run: str) -> int:
    """How many organizations score a higher EM with their own LLM adapter (last round) than with their own TinyLM."""
    own = seed["runs"][run]["rounds"][-1]["own_adapter"]["alone"]["em"]
    tiny = seed["references"]["tiny_ft_round1"]["per_org"]["em"]
    return sum(1 for a, t in zip(own, tiny, strict=True) if a is not None and t is not None and a > t)


def headline(results: dict) -> dict:
    """The recommended configuration's figures (means over seeds; fractions in [0, 1])."""
    summary, seeds = results["summary"], results["seeds"]
    name = RECOMMENDED if RECOMMENDED in summary["runs"] else \
        next((n for n in summary["runs"] if n.startswith("distill/")), None)
    if name is None:
        return {}
    last = summary["runs"][name][-1]
    refs = summary["references"]
    merges = {n: rows[-1]["lgr-em"]["mean"] for n, rows in summary["runs"].items() if n.split("/")[0] in MERGES}
    best_merge = max(merges, key=merges.get) if merges else None
    counts = [beats_tiny(s, name) for s in seeds.values()]
    return {"orgs": results["config"]["organizations"], "seeds": len(seeds), "configuration": name,
            "own_tiny_em": refs["tiny_ft_round1"]["org-em"]["mean"], "shared_llm_em": last["org-em"]["mean"],
            "shared_llm_lgr_em": last["lgr-em"]["mean"], "shared_llm_lgr_em_median": last["lgr-em-median"]["mean"],
            "shared_llm_lgr_loss": last["lgr"]["mean"],
            "best_weight_merge": best_merge.split("/")[0] if best_merge else None,
            "best_weight_merge_lgr_em": merges.get(best_merge),
            "oracle_consolidation_lgr_em": refs["llm_distill_round1"]["lgr-em"]["mean"],
            "own_adapter_beats_tiny": int(statistics.median(counts)), "own_adapter_beats_tiny_per_seed": counts}


def scale_runs(cfg: FedConfig) -> dict:
    """10 vs 100 organizations x 3 rounds through `flwr run`: wall time and the ServerApp's peak RSS."""
    import tempfile

    from fedgt.run.flwr_runner import run_federation

    out = {}
    scale = load_toml_flat(ROOT / "simulations" / "scale_100.toml")
    for n in (10, 100):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            overrides = {**scale, "federation.num-organizations": n, "output.dir": str(run_dir)}
            t0 = time.time()
            rc = run_federation(ROOT, overrides, Path(tmp) / "flwr-home", timeout=3600)
            wall = time.time() - t0
            summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() \
                else {}
            out[f"orgs_{n}"] = {"wall_s": wall, "server_peak_rss_mb": summary.get("server_peak_rss_mb"),
                                "strategy_wall_s": summary.get("wall_s"), "exit_code": rc,
                                "server_s_per_round": summary.get("server_s_per_round"),
                                "final": {k: v for k, v in summary.get("final", {}).items() if k != "orgs"}}
            print(f"scale: {n} organizations -> {out[f'orgs_{n}']}", flush=True)
    return out


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _ms(stat: dict) -> str:
    """mean ± std (over seeds) as percentages."""
    if stat["n"] == 0:
        return "-"
    return _pct(stat["mean"]) + (f" ± {100 * stat['std']:.1f}" if stat["n"] > 1 else "")


def render(results: dict) -> str:
    """Markdown report."""
    c, summary = results["config"], results["summary"]
    refs = summary["references"]
    lines = ["# Aggregation strategies", "", f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}  ", f"Date: {results.get('date', '-')}  ",
             f"{c['organizations']} organizations x {c['rounds']} rounds, seeds {c['seeds']} (each seed draws other "
             f"domains and samples); GT `{c['gt']}`; distill {c['distill']}", "",
             "LGR = (P - P_untuned_LLM) / (P_LLM_fine-tuned_on_the_org - P_untuned_LLM). *pooled*: sums over "
             "organizations; *median*: the median of each organization's own LGR (one easy domain cannot carry it). "
             "EM = exact match. Mean ± standard deviation over seeds.", "",
             "## References (round 1)", "",
             "| reference | org EM | LGR (EM) pooled | LGR (EM) median | LGR (loss) pooled |", "|---|---|---|---|---|",
             "| untuned LLM | " + _pct(_mean([_mean([b.get("exact_match") for b in s["base"]])
                                           for s in results["seeds"].values()])) + " | 0% | 0% | 0% |"]
    labels = dict(REFERENCE_LABELS)
    labels["gt_own_round1"] = "each organization's own LLM adapter (the GT's image of its update)"
    for key, label in labels.items():
        if key in refs:
            r = refs[key]
            lines.append(f"| {label} | {_ms(r['org-em'])} | {_ms(r['lgr-em'])} | {_ms(r['lgr-em-median'])} | "
                         f"{_ms(r['lgr'])} |")
    lines += ["| LLM fine-tuned on each organization's own data (ceiling) | " + _pct(_mean(
        [_mean([x.get("exact_match") for x in s["ceiling"]]) for s in results["seeds"].values()])) +
        " | 100% | 100% | 100% |", ""]
    rounds = c["rounds"]
    head = " | ".join(f"r{r} LGR EM pooled / median / loss" for r in range(1, rounds + 1))
    lines += ["## The shared LLM", "", f"| aggregator | order | rounds | space | {head} | org EM (last) | "
              "server s/round |", "|---|---|---|---|" + "---|" * rounds + "---|---|"]
    first = next(iter(results["seeds"].values()))
    for name, rows in summary["runs"].items():
        run = first["runs"][name]
        cells = " | ".join(f"{_ms(r['lgr-em'])} / {_ms(r['lgr-em-median'])} / {_ms(r['lgr'])}" for r in rows)
        server = _mean([r["server_s"]["mean"] for r in rows])
        lines.append(f"| {run['aggregator']} | {run['mode']} | {run['scheme']} | {run['space']} | {cells} | "
                     f"{_ms(rows[-1]['org-em'])} | {server:.2f} |")
    lines += ["", "## Each organization's own LLM adapter (last round)", "",
              "| aggregator | rounds | own alone: EM / LGR EM pooled / median | own on the shared LLM: EM / pooled / "
              "median | organizations whose own adapter beats their own TinyLM (per seed) |", "|---|---|---|---|---|"]
    for name, rows in summary["runs"].items():
        r = rows[-1]
        if "own-alone-em" not in r:
            continue
        counts = [beats_tiny(s, name) for s in results["seeds"].values()]
        lines.append(f"| {name.split('/')[0]} | {name.split('/')[2]} | {_ms(r['own-alone-em'])} / "
                     f"{_ms(r['own-alone-lgr-em'])} / "
                     f"{_ms(r['own-alone-lgr-em-median'])} | {_ms(r['own-on_shared-em'])} / "
                     f"{_ms(r['own-on_shared-lgr-em'])} / {_ms(r['own-on_shared-lgr-em-median'])} | "
                     f"{counts} of {c['organizations']} |")
    rec = RECOMMENDED if RECOMMENDED in summary["runs"] else \
        next((n for n in summary["runs"] if n.startswith("distill/")), None)
    if rec is not None:
        seed0 = first
        last = seed0["runs"][rec]["rounds"][-1]
        lines += ["", f"## Per organization (seed {c['seeds'][0]}, `{rec}`, last round; exact match)", "",
                  "| organization | own TinyLM | shared LLM | own LLM adapter | own adapter on the shared LLM | "
                  "ceiling |", "|---|---|---|---|---|---|"]
        tiny = seed0["references"]["tiny_ft_round1"]["per_org"]["em"]
        for i, org in enumerate(seed0["organizations"]):
            lines.append(f"| {org} | {_pct(tiny[i])} | {_pct(last['per_org']['em'][i])} | "
                         f"{_pct(last['own_adapter']['alone']['em'][i])} | "
                         f"{_pct(last['own_adapter']['on_shared']['em'][i])} | "
                         f"{_pct(seed0['ceiling'][i].get('exact_match'))} |")
    lines += ["", "## Merge scales chosen by the provider on public data", "",
              "Groups of shadow domains play the organizations; the mean EM of each scale on their public test "
              "examples.", "", "| method | updates | chosen scale | EM by scale |", "|---|---|---|---|"]
    for source, methods in results["merge_scales"].items():
        for method, v in methods.items():
            table = ", ".join(f"{k}: {_pct(e)}" for k, e in v["em_by_scale"].items())
            lines.append(f"| {method} | {'GT images' if source == 'gt' else 'true LLM updates'} | {v['scale']} | "
                         f"{table} |")
    if results.get("headline"):
        lines += ["", "## Headline (recommended configuration)", "", "```json",
                  json.dumps(results["headline"], indent=1, default=float), "```"]
    if "scale" in results:
        lines += ["", "## Scale (`flwr run`, 3 rounds, simulations/scale_100.toml)", "",
                  "| organizations | wall s | ServerApp peak RSS MB | final org EM |", "|---|---|---|---|"]
        for k, v in results["scale"].items():
            lines.append(f"| {k.removeprefix('orgs_')} | {v['wall_s']:.0f} | "
                         f"{v['server_peak_rss_mb'] or float('nan'):.0f} | {_pct(v['final'].get('org-em'))} |")
    lines.append(f"\nTotal wall time {results['total_wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """LGR (EM) of the shared LLM per round, pooled and median, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    refs = results["summary"]["references"]
    for ax, key, title in ((axes[0], "lgr-em", "pooled"), (axes[1], "lgr-em-median", "median over organizations")):
        aggregators = sorted({n.split("/")[0] for n in results["summary"]["runs"]})
        colors = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(aggregators)}  # one colour per aggregator
        styles = {s: ls for s, ls in zip((*SCHEMES, "fresh"), ("-", "--", ":", "-."), strict=False)}
        styles["fresh"], styles["retranslate"] = "-", "--"
        for name, rows in results["summary"]["runs"].items():
            ys = [r[key]["mean"] for r in rows]
            err = [r[key]["std"] if r[key]["n"] > 1 else 0 for r in rows]
            aggregator, scheme = name.split("/")[0], name.split("/")[2]
            ax.errorbar(range(1, len(ys) + 1), ys, yerr=err, marker="o", capsize=3, color=colors[aggregator],
                        ls=styles.get(scheme, "-"), label=f"{aggregator} ({scheme})")
        ax.set_xticks(range(1, len(next(iter(results["summary"]["runs"].values()))) + 1))
        for ref, style, label in (("tiny_ft_round1", ":", "own TinyLM"), ("llm_union_ft", "--", "union fine-tune"),
                                  ("llm_distill_round1", "-.", "consolidation, oracle teachers")):
            if ref in refs:
                ax.axhline(refs[ref][key]["mean"], color="gray", ls=style, label=label)
        ax.set_title(f"shared LLM, LGR (EM), {title}")
        ax.set_xlabel("round")
    axes[0].set_ylabel("LGR (exact match)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
