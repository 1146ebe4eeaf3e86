"""Quality benchmark of the Grad-Transformer against the baselines a user would pick instead.

    python -m simulations.bench_quality            # full mode, default pair (see docs/results/quality.md)
    python -m simulations.bench_quality --quick    # toy pair, a few domains: minutes (used by a slow test)

Pipeline (everything cached under $FEDGT_CACHE, resumable): prepare the pair -> curate shadow pairs ->
train the GT (functional, parallel decoder), its autoregressive variant and the paper-faithful GT (T5, MSE)
-> fit mean / kNN / ridge on the same pairs -> simulate organizations on private domains of three
settings (same_distribution, held_out_combination, held_out_family; plus user_data with --private-data)
-> score every method's LLM update on each organization's test split -> LGR / PGR, per domain and pooled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fedgt.core.data import DomainData, load_user_domains, task_domain_data
from fedgt.core.dp import DPConfig
from fedgt.core.examples import prompt_of
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.metrics import per_domain, summarize
from fedgt.core.mixture import PretrainData
from fedgt.core.models import PAIRS, cache_dir
from fedgt.core.run_config import DataSection, TrainSection
from fedgt.core.splits import make_domain_splits
from fedgt.core.world import make_world
from fedgt.provider.grad_transformer import best_device, load_gt, predict
from fedgt.provider.pretrain import prepare_model
from fedgt.provider.probes import probe_features, probe_prompts
from fedgt.provider.provision import ProviderConfig, snapshot_steps
from fedgt.provider.public_data import shadow_domains
from fedgt.provider.same_val import SameDomainVal, pick_domains, same_domain_val
from fedgt.provider.shadow import CurationConfig, curate, load_pairs
from fedgt.provider.train_gt import TrainConfig, functional_val_loss, gt_config_for, split_domains, train_gt
from simulations.baselines import MeanUpdate, NearestShadow, RidgeMap, select
from simulations.private_eval import OrgConfig, config_json, run_orgs

SETTINGS = ("same_distribution", "held_out_combination", "held_out_family", "held_out_pretrained")
METHODS = ("gt", "gt_shuffled_input", "gt_ensemble", "gt_residual", "gt_residual_shuffled_input",
           "gt_residual_ensemble", "gt_autoregressive", "gt_weights_only", "paper_gt", "mean_update", "knn", "ridge",
           "proxy_tuning", "tiny_sample_kd", "tiny_ft", "llm_base", "llm_ft")
SEEDED = ("gt", "gt_residual")  # variants trained once per --gt-seeds seed (ensembles: the mean of their outputs)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy pair, few domains and epochs (minutes)")
    p.add_argument("--pair", choices=sorted(PAIRS), default=None)
    p.add_argument("--shadow-domains", type=int, default=None, help="built-in shadow domains to curate (default all)")
    p.add_argument("--per-setting", type=int, default=None, help="private domains per setting")
    p.add_argument("--n-train", type=int, default=DataSection.n_train,
                   help="private training examples per organization")
    p.add_argument("--n-test", type=int, default=DataSection.n_test)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (organizations and curation)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (both models)")
    p.add_argument("--batch-size", type=int, default=TrainSection.batch_size,
                   help="fine-tuning batch (organizations and curation)")
    p.add_argument("--max-length", type=int, default=TrainSection.max_length, help="fine-tuning tokens per example")
    p.add_argument("--examples-per-pair", type=int, default=ProviderConfig.examples_per_pair,
                   help="GT functional loss: shadow examples per pair")
    p.add_argument("--curation-dir", type=Path, default=None,
                   help="curate into (or reuse) this folder, e.g. a provider's shadow/ with the same settings")
    p.add_argument("--gt-epochs", type=int, default=None)
    p.add_argument("--same-val-domains", type=int, default=ProviderConfig.same_val_domains,
                   help="training domains re-tuned on other public examples to validate the GT (0: none)")
    p.add_argument("--probes", type=int, default=ProviderConfig.probes,
                   help="probe prompts the GT reads the update through (0: none)")
    p.add_argument("--variants", default="gt,gt_residual,gt_autoregressive,gt_weights_only,paper_gt",
                   help="GT variants to train and score (gt is always trained)")
    p.add_argument("--gt-seeds", default="0", help="training seeds of gt and gt_residual (comma-separated; the "
                   "first is the headline, all give the spread and the ensembles; the validation split stays --seed's)")
    p.add_argument("--dp-epsilons", default=None, help="DP-SGD ε values for the TinyLM (comma-separated; '' for none)")
    p.add_argument("--update-dp-epsilons", default=None, help="update-level DP ε values (one organization's update)")
    p.add_argument("--private-data", type=Path, help="your private domains: one subfolder of files per organization")
    p.add_argument("--shadow-data", type=Path, help="your shadow domains: one subfolder of files per domain")
    p.add_argument("--no-builtin-shadow", action="store_true", help="curate only --shadow-data")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--multi-org", default=None, help="group sizes for the several-organizations study (e.g. 3,10)")
    p.add_argument("--multi-org-groups", type=int, default=4, help="groups per size (at most domains // size)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default=None, help="output file stem (default quality, or quality_quick)")
    args = p.parse_args(argv)
    quick = args.quick
    args.pair = args.pair or ("toy" if quick else "default")
    args.shadow_domains = args.shadow_domains if args.shadow_domains is not None else (24 if quick else None)
    args.per_setting = args.per_setting or (2 if quick else 16)
    args.steps = args.steps or (30 if quick else 100)
    args.lr = args.lr or (1e-2 if quick else 3e-3)
    args.gt_epochs = args.gt_epochs or (6 if quick else 40)
    args.name = args.name or ("quality_quick" if quick else "quality")
    args.variants = {"gt", *(v for v in args.variants.split(",") if v)}
    args.gt_seeds = tuple(int(x) for x in args.gt_seeds.split(",") if x.strip()) or (0,)
    floats = lambda text: tuple(float(x) for x in text.split(",") if x.strip())  # noqa: E731
    args.dp_epsilons = floats(args.dp_epsilons if args.dp_epsilons is not None else ("8" if quick else "8,1"))
    args.multi_org = tuple(int(x) for x in floats(args.multi_org if args.multi_org is not None else
                                                  ("3" if quick else "3,10")))
    args.update_dp_epsilons = floats(args.update_dp_epsilons if args.update_dp_epsilons is not None else "8")
    return args


def private_domains(args, shadow_train_names: list[str]) -> dict[str, list[DomainData]]:
    """The organizations' private domains of each setting (private people: never in any public data)."""
    world = make_world(PretrainData().num_people, seed=PretrainData().world_seed)
    splits = make_domain_splits(PretrainData().splits_seed)
    rng = random.Random(f"bench-quality-{args.seed}")
    by_name = {d.name: d for d in splits.shadow}
    pools = {"same_distribution": [by_name[n] for n in shadow_train_names if n in by_name],
             "held_out_pretrained": list(splits.pretrain),  # the LLM saw the skill, the provider never curated it
             "held_out_combination": list(splits.held_out_combination),
             "held_out_family": list(splits.held_out_family)}
    out = {}
    for setting in [s for s in args.settings.split(",") if s]:
        if setting not in pools:
            raise ValueError(f"--settings: unknown setting {setting!r}; choose from {SETTINGS}")
        pool = sorted(pools[setting])
        picked = sorted(rng.sample(pool, min(args.per_setting, len(pool))))
        out[setting] = [task_domain_data(world, d, args.n_train, args.n_test, args.seed) for d in picked]
    if args.private_data is not None:
        out["user_data"] = load_user_domains(args.private_data)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    torch.manual_seed(args.seed)
    tiny_name, llm_name = PAIRS[args.pair]
    tiny_path, llm_path = (str(prepare_model(n)) for n in (tiny_name, llm_name))
    lora = LoraSettings()  # the paper's raw factors: LoRA-FA fine-tunes the LLM much worse here (docs/premise.md)
    snaps = snapshot_steps(args.steps)
    ft = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        snapshot_steps=snaps, seed=args.seed)
    timings: dict[str, float] = {}

    # --- provider: curation -----------------------------------------------------------------------------------
    shadow = shadow_domains(128, args.shadow_domains, args.seed, args.shadow_data, builtin=not args.no_builtin_shadow,
                            tiny_model=tiny_name)
    ccfg = CurationConfig(tiny_model=tiny_path, llm_model=llm_path, lora=lora, finetune=ft, n_examples=128)
    cur_dir = args.curation_dir or cache_dir() / "shadow" / f"{args.pair}-{_hash(ccfg.to_json())}"
    print(f"curating {len(shadow)} shadow domains into {cur_dir}", flush=True)
    t0 = time.time()
    manifest = curate([(d.name, list(d.train)) for d in shadow], ccfg, cur_dir, workers=args.workers)
    timings["curation_wall_s_this_call"] = time.time() - t0
    pairs = load_pairs(cur_dir).select_domains([d.name for d in shadow])
    timings["curation_pairs"] = len(pairs.tiny)
    timings["curation_pairs_per_cpu_minute"] = len(pairs.tiny) / (manifest["cpu_seconds"] / 60)
    train_names, val_names = split_domains(pairs.names, 0.1, args.seed)
    train_examples = {d.name: list(d.train) for d in shadow}
    val_examples = {d.name: list(d.test) for d in shadow}

    # --- provider: the Grad-Transformers ----------------------------------------------------------------------
    device = best_device()
    judge = LLMJudge(llm_path, lora, device=device)
    tiny_judge = LLMJudge(tiny_path, lora, device=device)  # rebuilds tuned TinyLMs to read them through probes
    prompts = probe_prompts(shadow, args.probes, args.seed) if args.probes else []
    t0 = time.time()
    pairs.probes = probe_features(tiny_judge, pairs.tiny, prompts) if prompts else None
    timings["probe_features_s"] = time.time() - t0
    small = dict(d_model=128, n_heads=4, ffn=256) if args.quick else {}
    probe = dict(probe_tokens=len(prompts), probe_dim=pairs.probes.shape[-1]) if prompts else {}
    train_cfg = TrainConfig(epochs=args.gt_epochs, seed=args.seed, split_seed=args.seed,
                            examples_per_pair=args.examples_per_pair)
    # --- baselines on the same pairs, hyper-parameters chosen on the same validation domains ---------------------
    val_sets = [val_examples[n][:32] for n in sorted(val_names)]
    crit = lambda pred: functional_val_loss(judge, pred, val_sets)  # noqa: E731
    baseline_choices: dict = {}

    def fit_maps(on_pairs, suffix: str = "") -> dict:
        fit = on_pairs.select_domains(train_names)
        val = on_pairs.select_domains(val_names).final()
        knn, knn_scores = select(lambda k: NearestShadow(fit, int(k)), [1, 3, 5, 10], val.tiny, crit)
        ridge, ridge_scores = select(lambda a: RidgeMap(fit, a), [1.0, 10.0, 100.0, 1e3, 1e4, 1e5], val.tiny, crit)
        baseline_choices[suffix or "non_dp"] = {"knn_k": knn.k, "knn_val": knn_scores, "ridge_alpha": ridge.alpha,
                                                "ridge_val": ridge_scores}
        return {"mean_update" + suffix: MeanUpdate(fit), "knn" + suffix: knn, "ridge" + suffix: ridge}

    maps = fit_maps(pairs)

    variants = {
        "gt": (gt_config_for(pairs, decoder="parallel", **small, **probe), train_cfg),
        "gt_residual": (gt_config_for(pairs, decoder="parallel", anchor_k=maps["knn"].k,
                                      **small, **probe), train_cfg),
        "gt_autoregressive": (gt_config_for(pairs, decoder="autoregressive", **small, **probe), train_cfg),
        "gt_weights_only": (gt_config_for(pairs, decoder="parallel", **small), train_cfg),
        "paper_gt": (gt_config_for(pairs, kind="paper_gt", decoder="autoregressive", **small),
                     TrainConfig(objective="mse", select_on="mse", lr=5e-4, epochs=max(args.gt_epochs, 50) if not
                                 args.quick else args.gt_epochs, patience=15, seed=args.seed)),
    }
    gts, gt_records = {}, {}

    same_names = pick_domains(train_names, args.same_val_domains, args.seed) if args.same_val_domains else []
    same_vals: dict[str, SameDomainVal] = {}

    def same_val_for(dp: DPConfig) -> SameDomainVal | None:
        """Built only when a GT is actually trained (cached GTs need no fresh TinyLM runs), once per DP setting."""
        if not same_names:
            return None
        key = json.dumps(asdict(dp), sort_keys=True)
        if key not in same_vals:
            sv = same_domain_val(tiny_path, lora, ft, val_examples, train_names, len(same_names), args.seed, dp)
            sv.probes = probe_features(tiny_judge, sv.tiny, prompts) if prompts else None
            same_vals[key] = sv
        return same_vals[key]

    def train_variant(name: str, gcfg, tcfg, on_pairs, on_dir, dp: DPConfig = DPConfig()) -> None:
        gt_dir = cache_dir() / "gt" / f"{name}-{_hash([gcfg, tcfg, str(on_dir), on_pairs.names, prompts, same_names])}"
        if not (gt_dir / "history.json").is_file():
            print(f"training {name} -> {gt_dir}", flush=True)
            train_gt(on_pairs, gcfg, tcfg, judge, train_examples, val_examples, gt_dir, same_val=same_val_for(dp))
        gt_records[name] = json.loads((gt_dir / "history.json").read_text())
        gts[name], _ = load_gt(gt_dir, device)

    for name, (gcfg, tcfg) in variants.items():
        if name not in args.variants:
            continue
        for i, gseed in enumerate(args.gt_seeds if name in SEEDED else (args.seed,)):
            train_variant(name if i == 0 else f"{name}_seed{gseed}", gcfg, replace(tcfg, seed=gseed) if name in SEEDED
                          else tcfg, pairs, cur_dir)

    # --- DP-SGD on the TinyLM: re-curate its side under the same DP-SGD settings, train a GT on those pairs -------
    dp_inputs: dict[str, str] = {}  # method -> which org tokens it reads
    for eps in args.dp_epsilons:
        dcfg = replace(ccfg, tiny_dp=DPConfig(mode="dp-sgd", epsilon=eps))
        dp_dir = cache_dir() / "shadow" / f"{args.pair}-{_hash(dcfg.to_json())}"
        print(f"re-curating the TinyLM side under DP-SGD eps={eps:g} into {dp_dir}", flush=True)
        curate([(d.name, list(d.train)) for d in shadow], dcfg, dp_dir, workers=args.workers, reuse_llm=pairs)
        dp_pairs = load_pairs(dp_dir).select_domains(pairs.names)
        dp_pairs.probes = probe_features(tiny_judge, dp_pairs.tiny, prompts) if prompts else None
        tag = f"_dpsgd_eps{eps:g}"
        train_variant("gt" + tag, variants["gt"][0], train_cfg, dp_pairs, dp_dir, DPConfig(mode="dp-sgd", epsilon=eps))
        maps.update({k: v for k, v in fit_maps(dp_pairs, tag).items() if not k.startswith("mean_update")})
        dp_inputs.update({m + tag: "tiny" + tag for m in ("gt", "knn", "ridge")})
        dp_inputs["gt_nondp" + tag] = "tiny" + tag  # the non-DP GT fed DP updates: does DP curation matter?
    for eps in args.update_dp_epsilons:
        dp_inputs[f"gt_update_dp_eps{eps:g}"] = f"tiny_update_dp_eps{eps:g}"

    # --- organizations -------------------------------------------------------------------------------------------
    settings = private_domains(args, train_names)
    rng = random.Random(f"kd-{args.seed}")
    kd_prompts = tuple(prompt_of(ex) for ex in rng.sample([ex for d in shadow for ex in d.train], 256))
    ocfg = OrgConfig(tiny_model=tiny_path, llm_model=llm_path, lora=lora, finetune=replace(ft, snapshot_steps=()),
                     kd_prompts=kd_prompts, dp_sgd_epsilons=tuple(args.dp_epsilons),
                     update_dp_epsilons=tuple(args.update_dp_epsilons))
    all_domains = [d for ds in settings.values() for d in ds]
    print(f"simulating {len(all_domains)} organizations", flush=True)
    t0 = time.time()
    orgs = {r["name"]: r for r in run_orgs(all_domains, ocfg, workers=args.workers)}
    timings["organizations_wall_s"] = time.time() - t0

    # --- score every method --------------------------------------------------------------------------------------
    results: dict = {"settings": {}}
    for setting, domains in settings.items():
        names = [d.name for d in domains]
        def org_tokens(key: str, names=names) -> torch.Tensor:
            return torch.stack([orgs[n]["tokens"][key] for n in names])

        tiny = org_tokens("tiny")
        probes = probe_features(tiny_judge, tiny, prompts) if prompts else None
        # Another organization's update (a derangement when there are >= 2), read through its own probes.
        shuffled, shuffled_probes = tiny.roll(1, dims=0), None if probes is None else probes.roll(1, dims=0)
        tokens = {
            **{v: predict(gts[v], tiny, probes if gts[v].cfg.probe_tokens else None) for v in gts
               if "dpsgd" not in v},
            **{f"{v}_shuffled_input": predict(gts[v], shuffled, shuffled_probes) for v in SEEDED if v in gts},
            **{m: maps[m].predict(tiny) for m in ("mean_update", "knn", "ridge")},
            "llm_base": torch.zeros(len(names), judge.spec.num_layers, judge.spec.token_dim),
            "llm_ft": org_tokens("llm_ft"),
            "tiny_sample_kd": org_tokens("tiny_sample_kd"),
        }
        for method, key in dp_inputs.items():
            inp = org_tokens(key)
            if method.startswith("gt"):
                model = gts["gt"] if method.startswith(("gt_nondp", "gt_update")) else gts[method]
                tokens[method] = predict(model, inp, probe_features(tiny_judge, inp, prompts) if prompts else None)
            else:
                tokens[method] = maps[method].predict(inp)
        for v in SEEDED:  # the mean of the seeds' generated updates
            if len(_seeded(gts, v)) > 1:
                tokens[f"{v}_ensemble"] = torch.stack([tokens[m] for m in _seeded(gts, v)]).mean(0)
        tests = [list(d.test) for d in domains]
        rows = {n: {} for n in names}
        for method, toks in tokens.items():
            for n, score in zip(names, judge.score(toks, tests), strict=True):
                rows[n][method] = score
        for n in names:
            for m, sc in orgs[n]["scores"].items():
                rows[n][m] = {k: v for k, v in sc.items() if k in ("loss", "exact_match")}
        order = [*METHODS, *(m for v in SEEDED for m in _seeded(gts, v)[1:]), *dp_inputs,
                 *(m for m in rows[names[0]] if m.startswith("tiny_ft_dpsgd"))]
        summary = summarize(rows, [m for m in order if any(m in r for r in rows.values())])
        results["settings"][setting] = {
            "summary": summary,
            "seeds": {v: seed_spread(summary, _seeded(gts, v), args.gt_seeds) for v in SEEDED if v in gts},
            "domains": {n: {"scores": rows[n], "ratios": {m: per_domain(rows[n], m) for m in rows[n]}} for n in names},
        }
        eps_spent = [orgs[n]["scores"][k]["epsilon_spent"] for n in names for k in orgs[n]["scores"]
                     if k.startswith("tiny_ft_dpsgd")]
        if eps_spent:
            results["settings"][setting]["dp_epsilon_spent_max"] = max(eps_spent)

    # --- several organizations: one LLM update for a group, scored on every member's own test split ---------------
    if args.multi_org:
        results["multi_org"] = multi_org(args, all_domains, orgs, gts["gt"], tiny_judge, judge, prompts, pairs,
                                         llm_path, lora, replace(ft, snapshot_steps=()))

    # --- costs ---------------------------------------------------------------------------------------------------
    one = torch.stack([next(iter(orgs.values()))["tokens"]["tiny"]])
    one_probes = probe_features(tiny_judge, one, prompts) if prompts else None
    t0 = time.perf_counter()
    for _ in range(5):
        probe_features(tiny_judge, one, prompts) if prompts else None
    timings["probe_features_ms_per_org"] = (time.perf_counter() - t0) / 5 * 1e3
    for name in [v for v in ("gt", "gt_autoregressive", "gt_weights_only", "paper_gt") if v in gts]:
        p_one = one_probes if gts[name].cfg.probe_tokens else None
        predict(gts[name], one, p_one)
        t0 = time.perf_counter()
        for _ in range(20):
            predict(gts[name], one, p_one)
        timings[f"{name}_inference_ms_per_org"] = (time.perf_counter() - t0) / 20 * 1e3
        timings[f"{name}_train_s"] = gt_records[name]["seconds"]
    timings["llm_ft_cpu_s_per_org"] = sum(o["seconds"]["llm_ft"] for o in orgs.values()) / len(orgs)
    kd_seconds = [o["seconds"].get("tiny_sample_kd", 0.0) for o in orgs.values()]
    timings["tiny_sample_kd_cpu_s_per_org"] = sum(kd_seconds) / len(kd_seconds)
    timings["tiny_ft_cpu_s_per_org"] = sum(o["seconds"]["tiny_ft"] for o in orgs.values()) / len(orgs)
    timings["total_wall_s"] = time.time() - t_start
    results.update({
        "command": "python -m simulations.bench_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
                   f"python {platform.python_version()}, torch {torch.__version__}",
        "pair": {"tiny": tiny_path, "llm": llm_path}, "lora": asdict(lora), "finetune": asdict(ft),
        "organizations": config_json(ocfg) | {"n_train": args.n_train, "n_test": args.n_test},
        "curation": {"dir": str(cur_dir), "domains": len(pairs.names), "pairs": len(pairs.tiny),
                     "train_domains": len(train_names), "val_domains": len(val_names)},
        "gt": {k: {kk: v[kk] for kk in ("gt", "config", "best_epoch", "best_val", "seconds", "parameters", "device")}
               | {"same_val_domains": v.get("same_val_domains", 0)}
               for k, v in gt_records.items()},
        "baselines": baseline_choices,
        "timings": timings,
    })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / f"{args.name}.md").write_text(render_markdown(results))
    plot(results, args.out / f"{args.name}.png")
    print(render_markdown(results).split("## Per domain")[0])
    return results


def _seeded(gts: dict, variant: str) -> list[str]:
    """The trained seeds of a variant, headline first: ``gt``, ``gt_seed1``, ..."""
    return [m for m in gts if m == variant or (m.startswith(variant + "_seed") and m[len(variant) + 5:].isdigit())]


def seed_spread(summary: dict, methods: list[str], seeds: tuple[int, ...]) -> dict:
    """Mean and sample standard deviation over training seeds of each pooled ratio."""
    out = {"seeds": list(seeds[:len(methods)])}
    for key in ("lgr", "lgr_acc", "pgr", "pgr_acc"):
        vals = [summary[m][key] for m in methods]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out[key] = {"values": vals, "mean": mean, "sd": sd}
    return out


def _clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    norms = x.flatten(1).norm(dim=1).clamp(min=1e-12)
    return x * (clip / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))


def multi_org(args, domains: list[DomainData], orgs: dict, gt, tiny_judge: LLMJudge, judge: LLMJudge, prompts,
              pairs, llm_path: str, lora: LoraSettings, ft: FinetuneConfig) -> dict:
    """Groups of M organizations (different private domains) combined into one LLM update.

    ``aggregate_then_transform`` (the paper's; compatible with secure aggregation): GT(mean TinyLM update).
    ``transform_then_aggregate``: mean of GT(each update). ``central_dp_eps*``: each TinyLM update clipped to
    C (the median norm of the public shadow TinyLM updates, a data-free choice), the mean noised once with the
    RDP-calibrated Gaussian mechanism for sensitivity C/M, one GT pass. Ceiling ``llm_ft``: the LLM tuned on the union
    of the group's private data (simulation only). PGR's ``tiny_ft``: each organization's own tuned TinyLM.
    """
    from fedgt.core.dp import gaussian_noise_multiplier
    from fedgt.provider.shadow import LoraTuner

    rng = random.Random(f"multi-org-{args.seed}")
    clip = float(pairs.final().tiny.flatten(1).norm(dim=1).median())
    llm = LoraTuner(llm_path, lora)
    out = {"clip": clip}
    for m in args.multi_org:
        if m > len(domains):
            print(f"multi-org: skipping {m} organizations (only {len(domains)} private domains)")
            continue
        n_groups = max(1, min(args.multi_org_groups, len(domains) // m))
        pool = list(domains)
        rng.shuffle(pool)
        rows: dict[str, dict] = {}
        for g in range(n_groups):
            members = pool[g * m:(g + 1) * m]
            tiny = torch.stack([orgs[d.name]["tokens"]["tiny"] for d in members])
            probes = lambda t: probe_features(tiny_judge, t, prompts) if prompts else None  # noqa: E731
            att_in = tiny.mean(0, keepdim=True)
            candidates = {
                "aggregate_then_transform": predict(gt, att_in, probes(att_in)),
                "transform_then_aggregate": predict(gt, tiny, probes(tiny)).mean(0, keepdim=True),
                "llm_ft_mean": torch.stack([orgs[d.name]["tokens"]["llm_ft"] for d in members]).mean(0, keepdim=True),
                "llm_base": torch.zeros(1, judge.spec.num_layers, judge.spec.token_dim),
            }
            for eps in args.update_dp_epsilons:
                sigma = gaussian_noise_multiplier(eps, 1e-5) * clip / m  # add/remove one: sensitivity C/M
                noise_gen = torch.Generator().manual_seed(args.seed * 1000 + g)
                noisy = _clip_rows(tiny, clip).mean(0, keepdim=True)
                noisy = noisy + sigma * torch.randn(noisy.shape, generator=noise_gen)
                candidates[f"central_dp_eps{eps:g}"] = predict(gt, noisy, probes(noisy))
            union = [ex for d in members for ex in d.train]
            candidates["llm_ft"] = llm.tokens(llm.run(union, ft).update).unsqueeze(0)
            for method, toks in candidates.items():
                scores = judge.score(toks.expand(m, -1, -1), [list(d.test) for d in members])
                for d, sc in zip(members, scores, strict=True):
                    rows.setdefault(f"g{g}:{d.name}", {})[method] = sc
            for d in members:
                rows[f"g{g}:{d.name}"]["tiny_ft"] = orgs[d.name]["scores"]["tiny_ft"]
        methods = ["aggregate_then_transform", "transform_then_aggregate",
                   *[f"central_dp_eps{e:g}" for e in args.update_dp_epsilons], "llm_ft_mean", "tiny_ft", "llm_base",
                   "llm_ft"]
        out[f"orgs_{m}"] = {"groups": n_groups, "summary": summarize(rows, methods), "rows": rows}
    return out


def _fmt(x: float, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def render_markdown(r: dict) -> str:
    lines = [f"# Quality benchmark: {r['pair']['llm'].split('/')[-1]} updated from {r['pair']['tiny'].split('/')[-1]}",
             "", f"Command: `{r['command']}`  ", f"Machine: {r['machine']}", "",
             "LGR = (P − P_llm_base)/(P_llm_ft − P_llm_base); PGR = (P − P_tiny_ft)/(P_llm_ft − P_tiny_ft); pooled "
             "over the setting's domains (sums of gains); P = test loss (columns without _acc) or exact match (_acc).",
             ""]
    for setting, block in r["settings"].items():
        lines += [f"## {setting} ({len(block['domains'])} private domains)", "",
                  "| method | LGR | LGR_acc | PGR | PGR_acc | mean loss | mean EM |", "|---|---|---|---|---|---|---|"]
        for m, s in block["summary"].items():
            lines.append(f"| {m} | {_fmt(s['lgr'])} | {_fmt(s['lgr_acc'])} | {_fmt(s['pgr'])} | {_fmt(s['pgr_acc'])} "
                         f"| {_fmt(s['loss'], False)} | {_fmt(s['acc'], False)} |")
        lines.append("")
        if any(len(v["seeds"]) > 1 for v in block.get("seeds", {}).values()):
            lines += ["Over training seeds (mean ± sd; per seed LGR_acc):", "",
                      "| variant | seeds | LGR_acc | LGR | per seed |", "|---|---|---|---|---|"]
            for v, sp in block["seeds"].items():
                per = ", ".join(_fmt(x) for x in sp["lgr_acc"]["values"])
                acc, loss = sp["lgr_acc"], sp["lgr"]
                lines.append(f"| {v} | {len(sp['seeds'])} | {_fmt(acc['mean'])} ± {_fmt(acc['sd'])} "
                             f"| {_fmt(loss['mean'])} ± {_fmt(loss['sd'])} | {per} |")
            lines.append("")
    for key, block in r.get("multi_org", {}).items():
        if not key.startswith("orgs_"):
            continue
        lines += [f"## Several organizations: {key.split('_')[1]} per group ({block['groups']} groups, one LLM update "
                  "per group, scored on each member's test split)", "",
                  "| method | LGR | LGR_acc | PGR | PGR_acc | mean loss | mean EM |", "|---|---|---|---|---|---|---|"]
        for m, s in block["summary"].items():
            lines.append(f"| {m} | {_fmt(s['lgr'])} | {_fmt(s['lgr_acc'])} | {_fmt(s['pgr'])} | {_fmt(s['pgr_acc'])} "
                         f"| {_fmt(s['loss'], False)} | {_fmt(s['acc'], False)} |")
        lines.append("")
    lines += ["## Costs", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in r["timings"].items()]
    lines += ["", "## Per domain (test loss / exact match)", ""]
    for setting, block in r["settings"].items():
        methods = list(block["summary"])
        lines += [f"### {setting}", "", "| domain | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for name, d in block["domains"].items():
            cells = [f"{d['scores'][m]['loss']:.2f} / {d['scores'][m].get('exact_match', float('nan')):.2f}"
                     if m in d["scores"] else "—" for m in methods]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Pooled LGR in accuracy per method and setting, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(r["settings"])
    methods = [m for m in METHODS if all(m in r["settings"][s]["summary"] for s in settings)]
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 0.9), 4))
    width = 0.8 / max(1, len(settings))
    for i, s in enumerate(settings):
        vals = [r["settings"][s]["summary"][m]["lgr_acc"] for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], [0 if math.isnan(v) else v for v in vals], width, label=s)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("LLM gain recovered (exact match)")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
