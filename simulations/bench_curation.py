"""Curation throughput: shadow pairs per CPU-minute, one adapter at a time vs many in one forward/backward.

The same shadow domains are curated from scratch once per group size (``curate(group_domains=g)``) into fresh
folders; the script reports pairs per CPU-minute (the workers' process time, from the manifest) and per wall-minute,
and the largest difference between any pair and the one-at-a-time result, which must be float noise.

    python -m simulations.bench_curation                              # default pair -> docs/results/performance.*
    python -m simulations.bench_curation --pair smollm2 --domains 8 --steps 4 --name performance_smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.models import PAIRS
from fedgt.provider.provision import resolve_model, snapshot_steps
from fedgt.provider.shadow import CurationConfig, curate, load_pairs


def shadow_for(pair: str, n_domains: int, n_examples: int) -> list[tuple[str, list]]:
    """The provider's built-in shadow domains of a pair (task domains, or public text for a real pair)."""
    from fedgt.provider.public_data import shadow_domains

    return [(d.name, list(d.train)) for d in shadow_domains(n_examples, n_domains, seed=0, tiny_model=PAIRS[pair][0])]


def ceiling(pair: str, batch: int, max_length: int, groups: list[int]) -> list[dict]:
    """The most grouping can gain: one plain forward/backward of each model at batch B vs G·B rows, on 1 thread."""
    from fedgt.core.lora import attach_lora
    from fedgt.core.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a curation worker runs
    rows = []
    try:
        for role, spec in zip(("tiny", "llm"), PAIRS[pair], strict=True):
            model = attach_lora(load_model(resolve_model(spec))[0], LoraSettings()).train()
            ids = torch.randint(3, model.config.vocab_size, (batch * max(groups), max_length),
                                generator=torch.Generator().manual_seed(0))
            for g in groups:
                x = ids[: batch * g]
                model(input_ids=x, labels=x).loss.backward()  # warm-up
                repeats = max(2, 16 // g)
                t0 = time.process_time()
                for _ in range(repeats):
                    model(input_ids=x, labels=x).loss.backward()
                seconds = (time.process_time() - t0) / repeats
                rows.append({"model": role, "rows": len(x), "ms_per_step": round(1000 * seconds, 1),
                             "rows_per_cpu_second": round(len(x) / seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def run(args: argparse.Namespace) -> dict:
    """Curate the same domains once per group size; throughput and agreement with one-at-a-time."""
    tiny, llm = (resolve_model(m) for m in PAIRS[args.pair])
    ft = FinetuneConfig(steps=args.steps, batch_size=args.batch, max_length=args.max_length)
    ft = replace(ft, snapshot_steps=snapshot_steps(ft.steps))
    cfg = CurationConfig(tiny_model=tiny, llm_model=llm, lora=LoraSettings(), finetune=ft, n_examples=args.n_examples)
    domains = shadow_for(args.pair, args.domains, args.n_examples)
    rows, reference = [], None
    for g in [int(x) for x in args.groups.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            manifest = curate(domains, cfg, Path(tmp), workers=args.workers, group_domains=g, progress=False)
            wall = time.time() - t0
            pairs = load_pairs(Path(tmp))
        order = torch.tensor([pairs.names.index(n) for n, _ in domains])
        tokens = torch.cat([torch.cat([pairs.tiny[pairs.domain == i].flatten(), pairs.llm[pairs.domain == i].flatten()])
                            for i in order])
        reference = tokens if reference is None else reference
        n = len(pairs.tiny)
        cpu = manifest["cpu_seconds"]
        rows.append({"group_domains": g, "pairs": n, "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1),
                     "pairs_per_cpu_minute": round(n / (cpu / 60), 1),
                     "pairs_per_wall_minute": round(n / (wall / 60), 1),
                     "max_abs_diff_vs_first": float((tokens - reference).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    bound = ceiling(args.pair, args.batch, args.max_length, [int(x) for x in args.groups.split(",")])
    base = rows[0]["pairs_per_cpu_minute"]
    for r in rows:
        r["speedup_cpu"] = round(r["pairs_per_cpu_minute"] / base, 2)
    return {"pair": args.pair, "domains": len(domains), "workers": args.workers,
            "finetune": {"steps": args.steps, "batch_size": args.batch, "max_length": args.max_length,
                         "snapshots": list(ft.snapshot_steps)},
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, workers {args.workers} "
                       "(1 thread each)", "date": time.strftime("%Y-%m-%d"), "rows": rows, "ceiling": bound}


def markdown(result: dict, command: str) -> str:
    """The results table with its command, machine and date."""
    lines = [f"# Curation throughput: {result['pair']} pair", "",
             f"`{command}` — {result['machine']}, {result['date']}; nothing else ran.", "",
             f"{result['domains']} shadow domains, {result['finetune']['steps']} steps of batch "
             f"{result['finetune']['batch_size']} (max {result['finetune']['max_length']} tokens) per model and "
             "domain, "
             f"snapshots {result['finetune']['snapshots']}.", "",
             "| domains per forward/backward | pairs | CPU s | wall s | pairs / CPU-minute | speed-up "
             "| max diff vs first |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['group_domains']} | {r['pairs']} | {r['cpu_seconds']} | {r['wall_seconds']} | "
              f"{r['pairs_per_cpu_minute']} | {r['speedup_cpu']}x | {r['max_abs_diff_vs_first']:.1e} |"
              for r in result["rows"]]
    lines += ["", "The ceiling: one plain forward/backward of each model (LoRA attached, 1 thread, as in a worker) at "
              "the batch of one domain and of a group. Grouping G domains can only gain what G·B rows per step gain "
              "over B rows per step in rows per CPU-second.", "",
              "| model | rows per step | ms per step | rows / CPU-second |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['rows']} | {r['ms_per_step']} | {r['rows_per_cpu_second']} |"
              for r in result.get("ceiling", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="default")
    p.add_argument("--domains", type=int, default=32)
    p.add_argument("--groups", default="1,8,16", help="domains per forward/backward to compare; the first is the base")
    p.add_argument("--steps", type=int, default=FinetuneConfig().steps)
    p.add_argument("--batch", type=int, default=FinetuneConfig().batch_size)
    p.add_argument("--max-length", type=int, default=FinetuneConfig().max_length)
    p.add_argument("--n-examples", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default="performance")
    args = p.parse_args()
    import sys

    result = run(args)
    command = "python -m simulations.bench_curation " + " ".join(sys.argv[1:])
    result["command"] = command.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(result, command.strip()))
    print(markdown(result, command.strip()))


if __name__ == "__main__":
    main()
