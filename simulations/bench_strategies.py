"""Aggregation-strategy benchmark: every aggregator x both orders x round schemes, same organizations and seeds.

    python -m simulations.bench_strategies            # full: default pair, 8 organizations, 3 rounds + scale run
    python -m simulations.bench_strategies --quick    # toy pair, 2 organizations, 2 rounds, no scale run (minutes)

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
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedgt.core.data import public_text_domains  # noqa: E402
from fedgt.core.identity import model_identity  # noqa: E402
from fedgt.core.lora import attach_lora, lora_parameters  # noqa: E402
from fedgt.core.metrics import pooled_ratio  # noqa: E402
from fedgt.core.models import load_model, local_model_dir  # noqa: E402
from fedgt.core.noise import SeededNoise  # noqa: E402
from fedgt.core.org_data import simulated_organizations  # noqa: E402
from fedgt.core.run_config import FedConfig, from_run_config, load_toml, pyproject_run_config  # noqa: E402
from fedgt.core.updates import flatten, spec_of, unflatten  # noqa: E402
from fedgt.org.policy import SitePolicy  # noqa: E402
from fedgt.org.site import local_round  # noqa: E402
from fedgt.provider.provision import provide, provider_config_for, resolve_model  # noqa: E402
from fedgt.server.evaluation import LLMEvaluator  # noqa: E402
from fedgt.server.translator import Translator  # noqa: E402
from strategies.grad_transformer import GradTransformerStrategy  # noqa: E402

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded_mean")
MODES = ("transform-then-aggregate", "aggregate-then-transform")
SCHEMES = ("retranslate", "merge", "naive")
REFERENCE_LABELS = (
    ("llm_fedavg_round1", "FedAvg of the organizations' own LLM updates (if they could train the LLM; round 1)"),
    ("llm_deltaw_mean_round1", "exact weight-space mean of those LLM updates (round 1)"),
    ("gt_deltaw_mean_round1", "exact weight-space mean of the GT's LLM updates (round 1)"),
    ("llm_union_ft", "LLM fine-tuned on the union of all organizations' data (centralised, same budget)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--orgs", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--aggregators", default=",".join(AGGREGATORS))
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--spaces", default="weights,factors", help="LLM aggregation spaces (weights: retranslate only)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="any run-config key")
    p.add_argument("--no-scale", action="store_true", help="skip the 10 vs 100 organizations flwr runs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    args.name = args.name or ("strategies_quick" if args.quick else "strategies")
    return args


def config_for(args) -> FedConfig:
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = config_for(args)
    t_start = time.time()
    tiny_name, llm_name = (resolve_model(n) for n in cfg.model_names())
    gt_dir = Path(cfg.gt.checkpoint) if cfg.gt.checkpoint else provide(provider_config_for(cfg))
    translator = Translator(gt_dir, cfg.gt.device)
    lora = cfg.lora_settings()
    tiny_model = attach_lora(load_model(tiny_name)[0], lora)
    llm_model = attach_lora(load_model(llm_name)[0], lora)
    tiny_spec, tiny_init = spec_of(tiny_model), lora_parameters(tiny_model)
    llm_spec, llm_init = spec_of(llm_model), lora_parameters(llm_model)
    del tiny_model, llm_model
    n_orgs, rounds = cfg.federation.num_organizations, cfg.federation.num_server_rounds
    orgs = list(simulated_organizations(cfg, n_orgs))
    public = [ex for d in public_text_domains() for ex in d.test][:cfg.eval.public_examples]
    evaluator = LLMEvaluator(llm_name, lora, orgs, public, cfg.eval.test_examples, translator.device,
                             cfg.train.max_length)
    print(f"{n_orgs} organizations: fine-tuning the LLM on each for the LGR ceiling", flush=True)
    ceiling = evaluator.compute_ceiling(orgs, cfg.finetune_config())
    base_scores = evaluator(_fresh(tiny_spec, tiny_init, llm_spec, llm_init, lora, translator).llm)
    llm_refs, _ = _llm_references(evaluator, cfg, orgs)

    cache: dict = {}
    ctx = mp.get_context("spawn")
    runs = {}
    with ctx.Pool(args.workers, initializer=_init, initargs=(os.environ.get("FEDGT_CACHE"),)) as pool:
        combos = [(space, scheme, aggregator, mode) for space in args.spaces.split(",") if space
                  for scheme in args.schemes.split(",") if scheme and (space == "factors" or scheme == "retranslate")
                  for aggregator in args.aggregators.split(",") if aggregator for mode in MODES]
        for space, scheme, aggregator, mode in combos:
            name = f"{aggregator}/{mode}/{scheme}/{space}"
            s = GradTransformerStrategy(
                translate=translator, tiny_spec=tiny_spec, llm_spec=llm_spec, tiny_init=tiny_init,
                llm_init=llm_init, lora=lora, mode=mode, aggregator=aggregator,
                trim_beta=cfg.strategy.trim_beta, norm_bound=cfg.strategy.norm_bound, rounds=scheme,
                max_update_norm=cfg.strategy.max_update_norm, gt_batch_size=cfg.gt.batch_size, space=space)
            evaluator_run = _evaluator_copy(evaluator, llm_name, lora, orgs, public, cfg, translator)
            rows = []
            for rnd in range(1, rounds + 1):
                base, start = s.tiny.base_factors(), dict(s.tiny.current)
                key = _digest(base, start)
                todo = [i for i in range(n_orgs) if (i, rnd, key) not in cache]
                results = pool.map(_client, [(cfg, orgs[i], base, start, rnd) for i in todo])
                cache.update({(i, rnd, key): r for i, r in zip(todo, results, strict=True)})
                contributions = [(i, cache[(i, rnd, key)][0], cache[(i, rnd, key)][1]["num-examples"],
                                  cache[(i, rnd, key)][1]) for i in range(n_orgs)]
                t0 = time.perf_counter()
                s.apply(rnd, contributions)
                server_s = time.perf_counter() - t0
                scores = evaluator_run(s.llm, s.llm_weight_change())
                rows.append({"round": rnd, "server_s": server_s,
                             **{k: v for k, v in scores.items() if k != "orgs"}})
            runs[name] = {"aggregator": aggregator, "mode": mode, "scheme": scheme, "space": space,
                          "rounds": rows}
            last = rows[-1]
            print(f"{name:<55} LGR EM/loss after round {rounds}: {last.get('lgr-em', float('nan')):.3f} / "
                  f"{last.get('lgr', float('nan')):.3f}  server {sum(r['server_s'] for r in rows):.2f} s",
                  flush=True)
    round1 = [cache[(i, 1, _digest({}, dict(tiny_init)))] for i in range(n_orgs)]
    tiny_round1 = [m for _, m in round1]
    weights = torch.tensor([m["num-examples"] for m in tiny_round1])
    gt_updates = translator(torch.stack([t for t, _ in round1]))
    refs = {
        "llm_base": _pooled(base_scores, evaluator),
        "tiny_ft_round1": {"org-em": _mean([m.get("tiny-test-em") for m in tiny_round1]),
                           "org-loss": _mean([m.get("tiny-test-loss") for m in tiny_round1])},
        "llm_ft_per_org": {"org-em": _mean([c.get("exact_match") for c in ceiling]),
                           "org-loss": _mean([c["loss"] for c in ceiling])},
        **llm_refs,
        "gt_deltaw_mean_round1": _scores_ref(deltaw_mean_scores(evaluator, gt_updates, weights / weights.sum())),
    }
    for key in ("tiny_ft_round1", *llm_refs, "gt_deltaw_mean_round1"):
        refs[key].update(_lgr(refs[key], evaluator))
    results = {"command": "python -m simulations.bench_strategies " + " ".join(argv if argv is not None else
                                                                                 sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                          f"GT device {translator.device}",
               "config": {"organizations": n_orgs, "rounds": rounds, "gt": str(gt_dir),
                          "data": cfg.data.__dict__, "train": cfg.train.__dict__},
               "references": refs, "runs": runs, "client_rounds_computed": len(cache)}
    if not args.no_scale and not args.quick:
        results["scale"] = scale_runs(cfg)
    results["total_wall_s"] = time.time() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / f"{args.name}.md").write_text(render(results))
    plot(results, args.out / f"{args.name}.png")
    print(render(results))
    return results


def _fresh(tiny_spec, tiny_init, llm_spec, llm_init, lora, translator) -> GradTransformerStrategy:
    return GradTransformerStrategy(translate=translator, tiny_spec=tiny_spec, llm_spec=llm_spec,
                                   tiny_init=tiny_init, llm_init=llm_init, lora=lora)


def _evaluator_copy(ev: LLMEvaluator, llm_name, lora, orgs, public, cfg, translator) -> LLMEvaluator:
    """A fresh evaluator (its own base weights for merged rounds) sharing the computed references."""
    new = LLMEvaluator(llm_name, lora, orgs, public, cfg.eval.test_examples, translator.device, cfg.train.max_length)
    new.base_scores, new.ceiling = ev.base_scores, ev.ceiling
    return new


def _scores_ref(scores: list[dict]) -> dict:
    return {"org-em": _mean([s.get("exact_match") for s in scores]), "org-loss": _mean([s["loss"] for s in scores]),
            "_per_org": scores}


def _llm_references(ev: LLMEvaluator, cfg: FedConfig, orgs) -> tuple[dict, torch.Tensor]:
    """References for one shared LLM trained by the organizations themselves (simulation only).

    ``llm_fedavg_round1``: FedAvg of their own LLM LoRA updates (factors averaged, as FedAvg does);
    ``llm_deltaw_mean_round1``: the exact weighted mean of their weight changes (s * B_i @ A_i);
    ``llm_union_ft``: the LLM fine-tuned on the union of their data with the same budget (centralised).
    """
    from fedgt.provider.shadow import LoraTuner

    tuner = LoraTuner(ev.llm_model, ev.lora)
    ups = torch.stack([tuner.tokens(tuner.run(list(o.train), cfg.finetune_config()).update) for o in orgs])
    weights = torch.tensor([len(o.train) for o in orgs], dtype=torch.float32)
    weights = weights / weights.sum()
    mean = (ups * weights.view(-1, 1, 1)).sum(0)
    refs = {"llm_fedavg_round1": _scores_ref(ev.judge.score(mean.unsqueeze(0).expand(len(orgs), -1, -1),
                                                            ev.org_tests)),
            "llm_deltaw_mean_round1": _scores_ref(deltaw_mean_scores(ev, ups, weights))}
    union = [ex for o in orgs for ex in o.train]
    u = tuner.tokens(tuner.run(union, cfg.finetune_config()).update)
    refs["llm_union_ft"] = _scores_ref(ev.judge.score(u.unsqueeze(0).expand(len(orgs), -1, -1), ev.org_tests))
    return refs, ups


def deltaw_mean_scores(ev: LLMEvaluator, updates: torch.Tensor, weights: torch.Tensor) -> list[dict]:
    """Scores of base + sum_i w_i * s * B_i @ A_i (the exact mean in weight space, not of the factors)."""
    from fedgt.core.judge import LLMJudge
    from fedgt.core.lora import merge_into_base
    from fedgt.server.global_adapter import concat_pieces

    judge = LLMJudge(ev.llm_model, ev.lora, device=ev.judge.device)
    init = {k: v.cpu() for k, v in judge.init.items()}
    pieces = []
    for tokens, w in zip(updates, weights.tolist(), strict=True):
        delta = unflatten(tokens, judge.spec)
        piece = {k: init[k] + delta[k] for k in judge.spec.keys}
        pieces.append({k: v * w if "lora_B" in k else v for k, v in piece.items()})
    merge_into_base(judge.model, concat_pieces(pieces, judge.spec), ev.lora.scaling)
    zeros = torch.zeros(len(ev.org_tests), judge.spec.num_layers, judge.spec.token_dim)
    return judge.score(zeros, ev.org_tests)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pooled(scores: dict, ev: LLMEvaluator) -> dict:
    return {k: scores[k] for k in ("org-em", "org-loss") if k in scores}


def _lgr(ref: dict, ev: LLMEvaluator) -> dict:
    base = ev.base_scores
    out = {}
    per = ref.pop("_per_org", None)
    if per is not None:
        for key, name in (("exact_match", "lgr-em"), ("loss", "lgr")):
            if all(key in s for s in per + base + ev.ceiling):
                out[name] = pooled_ratio([s[key] for s in per], [s[key] for s in base], [s[key] for s in ev.ceiling])
    else:
        n = len(base)
        for key, src, name in (("exact_match", "org-em", "lgr-em"), ("loss", "org-loss", "lgr")):
            if ref.get(src) is not None and all(key in s for s in base + ev.ceiling):
                lo = sum(s[key] for s in base) / n
                hi = sum(s[key] for s in ev.ceiling) / n
                out[name] = (ref[src] - lo) / (hi - lo) if hi != lo else float("nan")
    return out


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


def render(results: dict) -> str:
    """Markdown report."""
    c, refs = results["config"], results["references"]
    lines = ["# Aggregation strategies", "", f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}  ",
             f"{c['organizations']} organizations x {c['rounds']} rounds; GT `{c['gt']}`; data {c['data']}", "",
             "LGR = (P - P_untuned_LLM) / (P_LLM_fine-tuned_on_the_org - P_untuned_LLM), pooled over organizations; "
             "EM = exact match. Server time: GT + aggregation per round.", "",
             "| reference | org EM | LGR (EM) | LGR (loss) |", "|---|---|---|---|",
             f"| untuned LLM | {_pct(refs['llm_base'].get('org-em'))} | 0% | 0% |",
             f"| each organization's own fine-tuned TinyLM (round 1) | {_pct(refs['tiny_ft_round1'].get('org-em'))} | "
             f"{_pct(refs['tiny_ft_round1'].get('lgr-em'))} | {_pct(refs['tiny_ft_round1'].get('lgr'))} |",
             *(f"| {label} | {_pct(refs[key].get('org-em'))} | {_pct(refs[key].get('lgr-em'))} | "
               f"{_pct(refs[key].get('lgr'))} |" for key, label in REFERENCE_LABELS if key in refs),
             "| LLM fine-tuned on each organization's own data (ceiling) | "
             f"{_pct(refs['llm_ft_per_org'].get('org-em'))} | 100% | 100% |", ""]
    rounds = c["rounds"]
    head = " | ".join(f"r{r} EM / loss" for r in range(1, rounds + 1))
    lines += [f"| aggregator | order | rounds | space | LGR {head} | server s/round |",
              "|---|---|---|---|" + "---|" * rounds + "---|"]
    for run in results["runs"].values():
        cells = " | ".join(f"{_pct(r.get('lgr-em'))} / {_pct(r.get('lgr'))}" for r in run["rounds"])
        server = sum(r["server_s"] for r in run["rounds"]) / len(run["rounds"])
        lines.append(f"| {run['aggregator']} | {run['mode']} | {run['scheme']} | {run.get('space', 'factors')} | "
                     f"{cells} | {server:.3f} |")
    if "scale" in results:
        lines += ["", "## Scale (`flwr run`, 3 rounds, simulations/scale_100.toml)", "",
                  "| organizations | wall s | ServerApp peak RSS MB | final org EM |", "|---|---|---|---|"]
        for k, v in results["scale"].items():
            lines.append(f"| {k.removeprefix('orgs_')} | {v['wall_s']:.0f} | "
                         f"{v['server_peak_rss_mb'] or float('nan'):.0f} | {_pct(v['final'].get('org-em'))} |")
    lines.append(f"\nTotal wall time {results['total_wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """LGR (EM) per round for every configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("weights", "retranslate"), *(("factors", s) for s in SCHEMES)]
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 3.6), sharey=True)
    for ax, (space, scheme) in zip(axes, panels, strict=True):
        for run in results["runs"].values():
            if run["scheme"] != scheme or run.get("space", "factors") != space:
                continue
            ys = [r.get("lgr-em", float("nan")) for r in run["rounds"]]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ls="-" if run["mode"].startswith("transform") else "--",
                    label=f"{run['aggregator']} {'T→A' if run['mode'].startswith('transform') else 'A→T'}")
        ref = results["references"]["llm_fedavg_round1"].get("lgr-em")
        if ref is not None:
            ax.axhline(ref, color="gray", ls=":", label="FedAvg of LLM updates")
        ax.set_title(f"{space} space, rounds = {scheme}")
        ax.set_xlabel("round")
    axes[0].set_ylabel("LGR (exact match)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
