"""The premise benchmark: after the same private fine-tuning, is the LLM much better than the TinyLM?

For a seeded sample of private task domains (private splits of shadow domains, held-out parameter
combinations, and a held-out family), fine-tune each model's LoRA with the same budget on the
domain's private train split and measure loss and exact match on its test split, before and after.
Also records the pretraining cost and parameter counts of both models, and how many facts each
model recalls (lookup domains), i.e. what the LLM's larger pretraining budget bought.

    python -m simulations.bench_premise                 # default pair, 16 domains per setting (~5 min)
    python -m simulations.bench_premise --per-group 2   # quick look
Writes docs/results/premise.json and docs/premise.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from fedgt.core.data import task_domain_data
from fedgt.core.evaluate import evaluate_split
from fedgt.core.finetune import FinetuneConfig, finetune
from fedgt.core.lora import LoraSettings, attach_lora
from fedgt.core.models import PAIRS, count_parameters, find_prepared, load_model
from fedgt.core.run_config import DataSection, TrainSection
from fedgt.core.splits import make_domain_splits
from fedgt.core.world import make_world
from fedgt.provider.pretrain import prepare_preset

ROOT = Path(__file__).resolve().parents[1]


def pick_domains(per_group: int, seed: int) -> dict[str, list]:
    """A seeded sample of private domains per setting."""
    splits, rng = make_domain_splits(), random.Random(f"premise-{seed}")
    return {"same_distribution": rng.sample(list(splits.shadow), per_group),
            "held_out_combination": rng.sample(list(splits.held_out_combination), per_group),
            "held_out_family": rng.sample(list(splits.held_out_family), per_group)}


def run_model(name: str, domains: dict[str, list], cfg: FinetuneConfig, lora: LoraSettings, n: int) -> dict:
    """Base and fine-tuned test metrics of one model on every domain."""
    model, tok = load_model(name)
    world, out = make_world(), {}
    for group, ds in domains.items():
        for d in ds:
            data = task_domain_data(world, d, n, n)
            base = evaluate_split(model, tok, data.test, cfg.max_length)
            tuned = attach_lora(copy.deepcopy(model), lora)
            t0 = time.perf_counter()
            res = finetune(tuned, tok, data.train, cfg)
            seconds = time.perf_counter() - t0
            ft = evaluate_split(tuned, tok, data.test, cfg.max_length)
            out[d.name] = {"group": group, "base": base, "ft": ft, "ft_seconds": seconds,
                           "train_loss": res.metrics["train-loss"]}
            print(f"{name:>7} {d.name:<32} base {base['loss']:.3f}/{base['exact_match']:.2f} "
                  f"ft {ft['loss']:.3f}/{ft['exact_match']:.2f} ({seconds:.1f} s)", flush=True)
    return out


def fact_recall(name: str, per_attr: int = 128) -> float:
    """Exact match of the untuned model on plain lookups of pretrain domains (memorised facts)."""
    model, tok = load_model(name)
    domains = [d for d in make_domain_splits().pretrain if d.family == "lookup" and d.template == 0]
    world = make_world()
    scores = [evaluate_split(model, tok, task_domain_data(world, d, 1, per_attr).test)["exact_match"] for d in domains]
    return statistics.mean(scores) if scores else float("nan")


def summarize(tiny: dict, llm: dict) -> dict:
    """Mean gaps overall and per group (points of exact match, nats of loss)."""
    def stats(names):
        return {
            "domains": len(names),
            "tiny_ft_em": statistics.mean(tiny[n]["ft"]["exact_match"] for n in names),
            "llm_ft_em": statistics.mean(llm[n]["ft"]["exact_match"] for n in names),
            "tiny_ft_loss": statistics.mean(tiny[n]["ft"]["loss"] for n in names),
            "llm_ft_loss": statistics.mean(llm[n]["ft"]["loss"] for n in names),
            "tiny_base_em": statistics.mean(tiny[n]["base"]["exact_match"] for n in names),
            "llm_base_em": statistics.mean(llm[n]["base"]["exact_match"] for n in names),
            "em_gap_points": 100 * statistics.mean(llm[n]["ft"]["exact_match"] - tiny[n]["ft"]["exact_match"]
                                                   for n in names),
            "llm_wins": sum(llm[n]["ft"]["exact_match"] > tiny[n]["ft"]["exact_match"] for n in names),
        }
    groups = sorted({v["group"] for v in tiny.values()})
    out = {"all": stats(list(tiny))}
    out.update({g: stats([n for n in tiny if tiny[n]["group"] == g]) for g in groups})
    return out


def write_markdown(result: dict, path: Path) -> None:
    """docs/premise.md: the command, the machine, the models and the per-domain table."""
    m, s = result["models"], result["summary"]
    lines = [
        "# The premise: the LLM is much stronger than the TinyLM after the same fine-tuning",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; run took {result['wall_seconds']:.0f} s.",
        "",
        "## Models (`fedgt prepare`)",
        "| model | non-embedding params | total params | pretraining steps × batch | prepare wall time | "
        "fact recall (untuned lookups) |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("tiny", "llm"):
        mm = m[key]
        lines.append(f"| {mm['name']} | {mm['parameters']['non_embedding']:,} | {mm['parameters']['total']:,} | "
                     f"{mm['pretrain_steps']} × {mm['pretrain_batch']} | {mm['pretrain_seconds']:.0f} s | "
                     f"{mm['fact_recall']:.3f} |")
    ratio = m["llm"]["parameters"]["non_embedding"] / m["tiny"]["parameters"]["non_embedding"]
    lines += ["", f"LLM / TinyLM non-embedding parameters: {ratio:.1f}×.", "",
              f"## Summary (fine-tuning: {result['finetune']}; LoRA {result['lora']})",
              "| domains | n | TinyLM base EM | TinyLM ft EM | LLM base EM | LLM ft EM | EM gap (points) | "
              "LLM wins | TinyLM ft loss | LLM ft loss |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for g, v in s.items():
        lines.append(f"| {g} | {v['domains']} | {v['tiny_base_em']:.3f} | {v['tiny_ft_em']:.3f} | "
                     f"{v['llm_base_em']:.3f} | {v['llm_ft_em']:.3f} | **{v['em_gap_points']:.1f}** | "
                     f"{v['llm_wins']}/{v['domains']} | {v['tiny_ft_loss']:.3f} | {v['llm_ft_loss']:.3f} |")
    lines += ["", "## Per domain (test split: loss / exact match)",
              "| domain | group | TinyLM base | TinyLM ft | LLM base | LLM ft |", "|---|---|---|---|---|---|"]
    for name, t in result["tiny"].items():
        llm = result["llm"][name]
        cell = lambda r: f"{r['loss']:.3f} / {r['exact_match']:.2f}"  # noqa: E731
        lines.append(f"| `{name}` | {t['group']} | {cell(t['base'])} | {cell(t['ft'])} | {cell(llm['base'])} | "
                     f"{cell(llm['ft'])} |")
    path.write_text("\n".join(lines) + "\n")


def model_info(name: str) -> dict:
    """Parameter counts and pretraining cost from the prepared model's metadata."""
    meta = json.loads((find_prepared(name) / "fedgt_prepared.json").read_text())
    model, _ = load_model(name)
    return {"name": name, "parameters": count_parameters(model), "pretrain_seconds": meta["pretrain_seconds"],
            "pretrain_steps": meta["preset"]["pretrain_steps"], "pretrain_batch": meta["preset"]["pretrain_batch"],
            "fact_recall": fact_recall(name)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="default")
    p.add_argument("--per-group", type=int, default=16)
    p.add_argument("--n", type=int, default=DataSection.n_train, help="train and test examples per domain")
    p.add_argument("--steps", type=int, default=TrainSection.steps)
    p.add_argument("--lr", type=float, default=TrainSection.lr)
    p.add_argument("--seed", type=int, default=TrainSection.seed)
    p.add_argument("--freeze-a", action="store_true", help="LoRA-FA (B only), as the federation uses")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    t0 = time.time()
    tiny_name, llm_name = PAIRS[args.pair]
    for name in (tiny_name, llm_name):
        prepare_preset(name)
    cfg, lora = FinetuneConfig(steps=args.steps, lr=args.lr, seed=args.seed), LoraSettings(freeze_a=args.freeze_a)
    domains = pick_domains(args.per_group, args.seed)
    tiny = run_model(tiny_name, domains, cfg, lora, args.n)
    llm = run_model(llm_name, domains, cfg, lora, args.n)
    result = {
        "command": "python -m simulations.bench_premise " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
            for k, v in vars(args).items() if k != "out" and v is not False),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
        "models": {"tiny": model_info(tiny_name), "llm": model_info(llm_name)},
        "finetune": f"{cfg.steps} steps, lr {cfg.lr}, batch {cfg.batch_size}, {args.n} train examples",
        "lora": f"r={lora.r}, alpha={lora.alpha}, {','.join(lora.target_modules)}"
                + (", A frozen (LoRA-FA)" if lora.freeze_a else ""),
        "summary": summarize(tiny, llm), "tiny": tiny, "llm": llm, "wall_seconds": time.time() - t0,
    }
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    (args.out / "results" / "premise.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.out / "premise.md")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
