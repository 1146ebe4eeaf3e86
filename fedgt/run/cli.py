"""The ``fedgt`` command line: thin wrappers that parse flags into typed configs and call the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.models import DERIVED, PAIRS, PRESETS
from fedgt.core.run_config import GTSection, TrainSection
from fedgt.provider.grad_transformer import GTConfig
from fedgt.provider.provision import ProviderConfig
from fedgt.provider.train_gt import TrainConfig
from fedgt.run.args import (
    add_data_args,
    add_finetune_args,
    add_lora_args,
    dp_config,
    finetune_config,
    load_org_data,
    lora_settings,
)


def cmd_prepare(args: argparse.Namespace) -> None:
    from fedgt.provider.pretrain import prepare_model

    names = args.models.split(",") if args.models else list(PAIRS[args.pair])
    torch.set_num_threads(args.threads)
    for name in names:
        t0 = time.time()
        out = prepare_model(name, seed=args.seed, force=args.force or args.rebuild)
        meta = json.loads((out / "fedgt_prepared.json").read_text())
        print(f"{name}: {out}  ({meta['parameters']['non_embedding']:,} non-embedding params, "
              f"built in {meta['pretrain_seconds']:.0f} s; this call {time.time() - t0:.0f} s)")
        if (args.rebuild or args.ship) and name not in DERIVED:
            from fedgt.provider.shipped import ARTIFACTS, ship

            recipe = {k: meta[k] for k in ("preset", "data", "seed")}
            ship(out, f"models/{out.name}", f"fedgt prepare --models {name} --rebuild", recipe)
            print(f"  shipped into {ARTIFACTS / 'models' / out.name} (artifacts/MANIFEST.json)")


def cmd_domains(args: argparse.Namespace) -> None:
    from fedgt.core.splits import make_domain_splits

    splits = make_domain_splits(args.seed)
    groups = {"pretrain": splits.pretrain, "shadow": splits.shadow,
              "held_out_combination": splits.held_out_combination, "held_out_family": splits.held_out_family}
    for group, domains in groups.items():
        if args.group in (None, group):
            print(f"# {group}: {len(domains)} domains")
            if args.group:
                print("\n".join(d.name for d in domains))



def cmd_finetune(args: argparse.Namespace) -> None:
    from fedgt.org.private_finetune import describe_release, run_private_finetune

    data = load_org_data(args)
    report = run_private_finetune(args.model, data, lora_settings(args), finetune_config(args), dp_config(args),
                                  out_dir=args.out)
    print(describe_release(report))
    print(json.dumps(report.summary(), indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from fedgt.org.private_finetune import evaluate_model

    data = load_org_data(args)
    print(json.dumps(evaluate_model(args.model, data, adapter=args.adapter, max_length=args.max_length), indent=2))


def cmd_org_demo(args: argparse.Namespace) -> None:
    from fedgt.run.demo import run_org_demo

    run_org_demo(args, lora_settings(args), finetune_config(args), dp_config(args))


def _layers(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """Run-config overrides by source: --scenario FILE, --orgs, --rounds, --set k=v (later wins)."""
    import tomllib

    from fedgt.core.run_config import _flatten

    layers: list[tuple[str, dict]] = []
    if args.scenario is not None:
        if not args.scenario.is_file():
            raise FileNotFoundError(f"--scenario {args.scenario} not found")
        layers.append((f"scenario {args.scenario}", _flatten(tomllib.loads(args.scenario.read_text()))))
    if args.orgs is not None:
        layers.append(("--orgs", {"federation.num-organizations": args.orgs}))
    if args.rounds is not None:
        layers.append(("--rounds", {"num-server-rounds": args.rounds}))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            layers.append(("--set", {key: tomllib.loads(f"v = {value}")["v"]}))
        except tomllib.TOMLDecodeError:
            layers.append(("--set", {key: value}))  # a bare string
    return layers


def _overrides(args: argparse.Namespace) -> dict:
    """Run-config overrides from --scenario FILE, --orgs, --rounds and --set k=v (later wins)."""
    out: dict = {}
    for _, values in _layers(args):
        out.update(values)
    return out


def cmd_report(args: argparse.Namespace) -> None:
    from fedgt.server.compare_report import compare
    from fedgt.server.html_report import write_report

    if len(args.runs) == 1 and args.runs[0].suffix != ".json":
        print(write_report(args.runs[0]))
    else:
        print(compare(args.runs, args.out))


def cmd_config_show(args: argparse.Namespace) -> None:
    from fedgt.run.config_show import effective_config, recorded_config, render

    rows = recorded_config(args.app, args.run) if args.run else effective_config(args.app, _layers(args))
    print(render(rows))


def run_dir(out: Path | None, name: str, resume: bool = False) -> Path:
    """``--out``, else a fresh ``runs/<name>/<time>`` linked as ``runs/<name>/latest`` (resume: ``latest``)."""
    if out is not None:
        return out
    root = Path("runs") / name
    if resume:
        if not (root / "latest").exists():
            raise SystemExit(f"fedgt {name} --resume: no {root / 'latest'} to resume; give --out FOLDER")
        return (root / "latest").resolve()
    path = root / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest").unlink(missing_ok=True)
    (root / "latest").symlink_to(path.name)
    return path


def cmd_demo(args: argparse.Namespace) -> None:
    from fedgt.core.models import cache_dir
    from fedgt.run.demo import run_demo

    args.out = run_dir(args.out, "demo")
    rc = run_demo(args.app.resolve(), _overrides(args), args.out, args.flwr_home or cache_dir() / "flwr-home")
    if rc:
        raise SystemExit(rc)


def cmd_federate(args: argparse.Namespace) -> None:
    from fedgt.core.models import cache_dir
    from fedgt.run.flwr_runner import run_federation
    from fedgt.server.checkpoint import ResumeError, prepare_output

    args.out = run_dir(args.out, "federate", args.resume)
    try:
        prepare_output(args.out, args.resume)  # the ServerApp checks again; failing here costs no startup
    except ResumeError as err:
        raise SystemExit(f"fedgt federate: {err}") from err
    overrides = {**_overrides(args), "output.dir": str(args.out.resolve()), "output.resume": bool(args.resume)}
    rc = run_federation(args.app.resolve(), overrides, args.flwr_home or cache_dir() / "flwr-home",
                        ray_address=args.ray_address)
    results, error = args.out / "results.md", args.out / "error.txt"
    if rc or not results.is_file() or error.is_file():
        cause = error.read_text().splitlines()[0] if error.is_file() else "no cause recorded: see the flwr log above"
        raise SystemExit(f"fedgt federate: the federation failed (flwr exit code {rc}): {cause}")
    print(results.read_text())
    summary = args.out / "summary.json"
    stopped = json.loads(summary.read_text()).get("stopped") if summary.is_file() else None
    if stopped:
        print(f"fedgt federate: the federation stopped early: {stopped}", file=sys.stderr)


def cmd_export_orgs(args: argparse.Namespace) -> None:
    from fedgt.core.org_data import simulated_organizations, write_jsonl
    from fedgt.core.run_config import from_run_config, pyproject_run_config

    cfg = from_run_config({**pyproject_run_config(args.app / "pyproject.toml"), **_overrides(args)})
    n = cfg.federation.num_organizations
    for i, org in enumerate(simulated_organizations(cfg, n)):
        print(f"{write_jsonl(org, args.out / f'org-{i}')}  ({org.name})")


def cmd_provide(args: argparse.Namespace) -> None:
    from fedgt.core.run_config import from_run_config, pyproject_run_config
    from fedgt.provider.provision import provide, provider_config_for

    cfg = from_run_config({**pyproject_run_config(args.app / "pyproject.toml"), **_overrides(args)})
    pcfg = provider_config_for(cfg)
    if args.rebuild:
        import shutil

        from fedgt.core.models import cache_dir

        shutil.rmtree(cache_dir() / "provider" / pcfg.key(), ignore_errors=True)  # curate and train again
    gt_dir = provide(pcfg)
    print(gt_dir)
    if args.rebuild or args.ship:
        from dataclasses import asdict

        from fedgt.provider.shipped import ARTIFACTS, ship

        key = f"provider/{pcfg.key()}/gt"
        ship(gt_dir, key, "fedgt provide --rebuild" + "".join(f" --set {s}" for s in args.set or []),
             json.loads(json.dumps(asdict(pcfg), default=str)))
        print(f"shipped into {ARTIFACTS / key} (artifacts/MANIFEST.json)")


def _curation_config(args: argparse.Namespace):
    from fedgt.core.dp import DPConfig
    from fedgt.provider.shadow import DEFAULT_SNAPSHOTS, CurationConfig

    snapshots = tuple(int(s) for s in args.snapshots.split(",")) if args.snapshots else DEFAULT_SNAPSHOTS
    ft = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        seed=args.seed, snapshot_steps=snapshots)
    tiny_dp = DPConfig(mode="dp-sgd", epsilon=args.tiny_dp_epsilon) if args.tiny_dp_epsilon else DPConfig()
    return CurationConfig(tiny_model=args.tiny, llm_model=args.llm, lora=lora_settings(args), finetune=ft,
                          tiny_dp=tiny_dp, n_examples=args.n_examples)


def _resolve_model(spec: str) -> str:
    """A preset or derived model name becomes its prepared directory (so stored configs name the exact model)."""
    from fedgt.core.models import find_prepared, preparable
    from fedgt.provider.pretrain import prepare_model

    if preparable(spec):
        return str(find_prepared(spec) or prepare_model(spec))
    return spec


def cmd_curate(args: argparse.Namespace) -> None:
    from fedgt.provider.public_data import shadow_domains
    from fedgt.provider.shadow import curate, load_pairs

    args.tiny, args.llm = _resolve_model(args.tiny), _resolve_model(args.llm)
    cfg = _curation_config(args)
    domains = shadow_domains(args.n_examples, args.domains, args.seed, args.shadow_data,
                             builtin=not args.no_builtin_shadow, tiny_model=args.tiny)
    manifest = curate([(d.name, list(d.train)) for d in domains], cfg, args.out, workers=args.workers)
    pairs = load_pairs(args.out)
    print(f"{len(pairs.names)} domains, {len(pairs.tiny)} pairs in {args.out}; "
          f"{len(pairs.tiny) / max(manifest['cpu_seconds'] / 60, 1e-9):.1f} pairs per CPU-minute, "
          f"{manifest['wall_seconds']:.0f} s wall in total")


def train_gt_anchor_k(args: argparse.Namespace) -> int:
    """--anchor-k, or gt.anchor-k's default where the GT can be residual (kind gt, parallel decoder), else 0."""
    if args.anchor_k is not None:
        return args.anchor_k
    return GTSection.anchor_k if args.kind == "gt" and args.decoder == "parallel" else 0


def cmd_train_gt(args: argparse.Namespace) -> None:
    from fedgt.core.judge import LLMJudge
    from fedgt.provider.grad_transformer import best_device
    from fedgt.provider.public_data import shadow_domains
    from fedgt.provider.shadow import load_pairs
    from fedgt.provider.train_gt import gt_config_for, train_gt

    pairs = load_pairs(args.pairs)
    cfg = pairs.manifest["config"]
    lora = LoraSettings(**{**cfg["lora"], "target_modules": tuple(cfg["lora"]["target_modules"])})
    gcfg = gt_config_for(pairs, kind=args.kind, decoder="autoregressive" if args.kind == "paper_gt" else args.decoder,
                         d_model=args.d_model, enc_layers=args.layers, dec_layers=args.layers, ffn=2 * args.d_model,
                         anchor_k=train_gt_anchor_k(args))
    tcfg = TrainConfig(objective=args.objective, select_on=args.select_on, epochs=args.epochs, lr=args.gt_lr,
                       batch_size=args.gt_batch_size, patience=args.patience, seed=args.seed)
    device = args.device or str(best_device())
    needs_llm = tcfg.objective != "mse" or tcfg.select_on == "functional"
    judge = LLMJudge(cfg["llm_model"], lora, device=device) if needs_llm else None
    domains = {d.name: d for d in shadow_domains(cfg["n_examples"], None, cfg["finetune"]["seed"], args.shadow_data,
                                                 builtin=not args.no_builtin_shadow, tiny_model=cfg["tiny_model"])}
    missing = [n for n in pairs.names if n not in domains]
    if missing:
        raise ValueError(f"curated domains {missing[:3]} are not in the shadow data given here (same --shadow-data?)")
    test_examples = {n: list(domains[n].test) for n in pairs.names}
    same_val = None
    if args.same_val_domains and judge is not None:
        from fedgt.core.dp import DPConfig
        from fedgt.core.finetune import FinetuneConfig
        from fedgt.provider.same_val import same_domain_val
        from fedgt.provider.train_gt import split_domains

        train_names, _ = split_domains(pairs.names, tcfg.val_fraction, tcfg.seed)
        ft = FinetuneConfig(**{**cfg["finetune"], "snapshot_steps": ()})
        same_val = same_domain_val(cfg["tiny_model"], lora, ft, test_examples, train_names, args.same_val_domains,
                                   args.seed, DPConfig(**cfg.get("tiny_dp") or {}))
    record = train_gt(pairs, gcfg, tcfg, judge, {n: list(domains[n].train) for n in pairs.names}, test_examples,
                      args.out, same_val=same_val)
    # What the federation's server needs to use this GT (`gt.checkpoint`): the models and settings it maps between.
    from fedgt.core.models import local_model_dir
    from fedgt.provider.provision import model_manifest, model_name

    def manifest(spec: str) -> dict:
        try:
            return model_manifest(spec, local_model_dir(spec), lora)
        except FileNotFoundError:  # a .gguf file: no directory to fingerprint
            return model_manifest(spec, spec, lora)

    tiny, llm = cfg["tiny_model"], cfg["llm_model"]
    (args.out / "provider.json").write_text(json.dumps({
        "tiny": model_name(tiny), "llm": model_name(llm), "models": {"tiny": manifest(tiny), "llm": manifest(llm)},
        "lora": cfg["lora"], "finetune": cfg["finetune"], "tiny_dp": cfg.get("tiny_dp"), "probe_prompts": [],
        "shadow_domains": pairs.names}, indent=1))
    from fedgt.core.manifest import write_manifest

    write_manifest(args.out)  # every file's sha256, verified when a server loads the GT
    print(f"best epoch {record['best_epoch']} (val {tcfg.select_on} {record['best_val']:.4f}), "
          f"{record['seconds']:.0f} s on {record['device']}; checkpoint in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedgt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the model pair: pretrain a preset pair, or convert SmolLM2 and derive "
                                       "its TinyLM (cached)")
    p.add_argument("--pair", choices=sorted(PAIRS), default="default")
    p.add_argument("--models", help=f"comma-separated models instead of a pair: {sorted(PRESETS) + list(DERIVED)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--force", action="store_true", help="pretrain again even if cached")
    p.add_argument("--rebuild", action="store_true", help="pretrain again and ship the result in artifacts/")
    p.add_argument("--ship", action="store_true", help="ship the prepared models in artifacts/ (no pretraining if "
                                                       "cached)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("domains", help="list the task domains and how they are split")
    p.add_argument("--group", choices=["pretrain", "shadow", "held_out_combination", "held_out_family"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_domains)

    p = sub.add_parser("finetune", help="one organization's private LoRA fine-tune; saves the update")
    p.add_argument("--model", default="tinylm", help="a prepared preset, a local HF model dir, or a .gguf file")
    p.add_argument("--out", type=Path, default=Path("runs/finetune"))
    add_data_args(p)
    add_lora_args(p)
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="loss, perplexity and exact match of a model (optionally with an adapter)")
    p.add_argument("--model", default="tinylm")
    p.add_argument("--adapter", type=Path, help="a peft adapter directory saved by `fedgt finetune`")
    p.add_argument("--max-length", type=int, default=TrainSection.max_length)
    p.add_argument("--seed", type=int, default=TrainSection.seed)
    add_data_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("curate", help="provider: fine-tune TinyLM and LLM on shadow domains, store update pairs")
    p.add_argument("--tiny", default="tinylm", help="TinyLM: a preset or a local model dir")
    p.add_argument("--llm", default="llm", help="LLM: a preset or a local model dir")
    p.add_argument("--out", type=Path, default=Path("runs/shadow"))
    p.add_argument("--domains", type=int, default=None, help="how many built-in shadow domains (default all)")
    p.add_argument("--shadow-data", type=Path, help="your shadow domains: one subfolder of files per domain")
    p.add_argument("--no-builtin-shadow", action="store_true", help="use only --shadow-data")
    p.add_argument("--n-examples", type=int, default=ProviderConfig.n_examples, help="examples per shadow subset")
    p.add_argument("--snapshots", default=None, help="comma-separated snapshot steps (default 60,70,80,90,100)")
    p.add_argument("--tiny-dp-epsilon", type=float, default=None, help="curate the TinyLM side under DP-SGD at this ε")
    p.add_argument("--workers", type=int, default=ProviderConfig.workers)
    add_lora_args(p)
    add_finetune_args(p)
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("train-gt", help="provider: train the Grad-Transformer on curated pairs")
    p.add_argument("--pairs", type=Path, default=Path("runs/shadow"), help="a `fedgt curate` output folder")
    p.add_argument("--out", type=Path, default=Path("runs/gt"))
    p.add_argument("--kind", choices=["gt", "paper_gt"], default="gt")
    p.add_argument("--decoder", choices=["parallel", "autoregressive"], default="parallel")
    p.add_argument("--objective", choices=["functional", "mse", "mix"], default=TrainConfig.objective)
    p.add_argument("--select-on", choices=["functional", "mse"], default=TrainConfig.select_on)
    p.add_argument("--d-model", type=int, default=ProviderConfig.d_model)
    p.add_argument("--layers", type=int, default=GTConfig.enc_layers, help="encoder and decoder layers each")
    p.add_argument("--anchor-k", type=int, default=None,
                   help="> 0: predict a correction to the mean of the k nearest shadow updates (default gt.anchor-k "
                        f"= {GTSection.anchor_k} for the parallel decoder, else 0)")
    p.add_argument("--epochs", type=int, default=GTSection.epochs, help="default: gt.epochs")
    p.add_argument("--gt-lr", type=float, default=TrainConfig.lr)
    p.add_argument("--gt-batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--patience", type=int, default=TrainConfig.patience)
    p.add_argument("--same-val-domains", type=int, default=ProviderConfig.same_val_domains,
                   help="training domains re-tuned on other public examples to validate on (0: held-out domains only)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.add_argument("--shadow-data", type=Path, help="the same --shadow-data given to `fedgt curate`")
    p.add_argument("--no-builtin-shadow", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_gt)

    p = sub.add_parser("org-demo", help="one organization: private TinyLM fine-tune vs the LLM fine-tuned directly")
    p.add_argument("--pair", choices=sorted(PAIRS), default="default")
    p.add_argument("--out", type=Path, default=Path("runs/org-demo"))
    add_data_args(p)
    add_lora_args(p)
    add_finetune_args(p)
    p.set_defaults(func=cmd_org_demo)

    for name, func, text in (
        ("demo", cmd_demo, "the main job: prepare the pair, curate + train the GT (cached), run the simulated "
                           "federation (flwr run), print the results"),
        ("federate", cmd_federate, "run the Flower app on a local Ray simulation (flwr run) and print the results"),
        ("provide", cmd_provide, "provider: prepare the pair, curate shadow pairs and train the GT for the app's "
                                 "settings (cached); prints the GT directory"),
        ("export-orgs", cmd_export_orgs, "write the simulated organizations' data as site folders (JSONL), e.g. "
                                         "for a loopback deployment"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--app", type=Path, default=Path("."), help="the Flower app directory (its pyproject.toml)")
        p.add_argument("--scenario", type=Path, help="a run-config TOML file, e.g. simulations/dp_sgd.toml")
        p.add_argument("--orgs", type=int, help="federation.num-organizations (simulation: num-supernodes)")
        p.add_argument("--rounds", type=int, help="num-server-rounds")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
        if name == "provide":
            p.add_argument("--rebuild", action="store_true", help="curate and train again, ship the GT in artifacts/")
            p.add_argument("--ship", action="store_true", help="ship the (cached) GT in artifacts/")
        if name == "export-orgs":
            p.add_argument("--out", type=Path, default=Path("runs/sites"), help="one subfolder per organization")
        elif name != "provide":
            p.add_argument("--out", type=Path, help=f"output.dir of the run (default: runs/{name}/<time>, linked as "
                                                    f"runs/{name}/latest); a folder holding a run needs --resume")
            p.add_argument("--flwr-home", type=Path, help="FLWR_HOME for the local SuperLink "
                                                          "(default $FEDGT_CACHE/flwr-home)")
        if name == "federate":
            p.add_argument("--resume", action="store_true",
                           help="continue the run in --out (default runs/federate/latest) after its last good round")
            p.add_argument("--ray-address", help="run the organizations on an existing Ray cluster (host:port)")
        p.set_defaults(func=func)

    p = sub.add_parser("config", help="the run config: `fedgt config show` prints every key's effective value and "
                                      "where it came from (default, scenario, flag, or a finished run)")
    p.add_argument("action", choices=["show"])
    p.add_argument("--app", type=Path, default=Path("."), help="the Flower app directory (its pyproject.toml)")
    p.add_argument("--scenario", type=Path, help="a run-config TOML file, e.g. simulations/dp_sgd.toml")
    p.add_argument("--orgs", type=int, help="federation.num-organizations (simulation: num-supernodes)")
    p.add_argument("--rounds", type=int, help="num-server-rounds")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
    p.add_argument("--run", type=Path, help="instead: the config a finished run recorded (its output folder)")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("report", help="one run folder: write RUN/report.html (every run writes it at its end); "
                                      "several, or a bench_strategies .json: a comparison page")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="output folders of fedgt runs, or one "
                                                                     "bench_strategies result .json")
    p.add_argument("--out", type=Path, help="where the comparison page goes (default comparison.html; for a .json: "
                                                "next to it)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedgt`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fedgt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
