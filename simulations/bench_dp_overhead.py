"""Opacus DP-SGD step-time overhead vs plain LoRA fine-tuning, for each model of the pair.

    python -m simulations.bench_dp_overhead
Writes docs/results/dp_overhead.json and a table in docs/dp_overhead.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fedgt.core.data import task_domain_data
from fedgt.core.dp import DPConfig
from fedgt.core.finetune import FinetuneConfig, finetune
from fedgt.core.lora import LoraSettings, attach_lora
from fedgt.core.models import PAIRS, load_model
from fedgt.core.noise import SecretNoise
from fedgt.core.splits import make_domain_splits
from fedgt.core.world import make_world
from fedgt.provider.pretrain import prepare_preset

ROOT = Path(__file__).resolve().parents[1]
# (DP settings, secret noise?): a site draws from the OS CSPRNG; seeded noise is what reproducible runs use.
MODES = {
    "none": (DPConfig(), False),
    "dp-sgd (eps=8, poisson, secret noise)": (DPConfig(mode="dp-sgd", epsilon=8.0), True),
    "dp-sgd (eps=8, poisson, seeded noise)": (DPConfig(mode="dp-sgd", epsilon=8.0), False),
    "dp-sgd (sigma=1, fixed batches)": (DPConfig(mode="dp-sgd", noise_multiplier=1.0, poisson_sampling=False), False),
}


def time_mode(model, tok, examples, cfg: FinetuneConfig, dp: DPConfig, repeats: int, secret: bool = False) -> float:
    """Median seconds per optimizer step over ``repeats`` fine-tunes from the same init."""
    times = []
    for r in range(repeats):
        res = finetune(copy.deepcopy(model), tok, examples, FinetuneConfig(**{**cfg.__dict__, "seed": r}), dp,
                       SecretNoise() if secret else None)
        times.append(res.metrics["train-seconds"] / cfg.steps)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="default")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    domain = make_domain_splits().held_out_combination[0]
    examples = task_domain_data(make_world(), domain, 128, 1).train
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size)
    rows = {}
    for name in PAIRS[args.pair]:
        prepare_preset(name)
        base, tok = load_model(name)
        model = attach_lora(base, LoraSettings())
        time_mode(model, tok, examples, FinetuneConfig(steps=3, batch_size=args.batch_size), DPConfig(), 1)  # warm-up
        rows[name] = {mode: time_mode(model, tok, examples, cfg, dp, args.repeats, secret)
                      for mode, (dp, secret) in MODES.items()}
        print(name, {k: f"{v * 1e3:.1f} ms" for k, v in rows[name].items()}, flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    command = f"python -m simulations.bench_dp_overhead --steps {args.steps} --batch-size {args.batch_size} " \
              f"--repeats {args.repeats}"
    result = {"command": command, "machine": machine, "domain": domain.name, "ms_per_step": {
        m: {k: v * 1e3 for k, v in r.items()} for m, r in rows.items()}}
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    (args.out / "results" / "dp_overhead.json").write_text(json.dumps(result, indent=2))
    lines = ["# Opacus DP-SGD step-time overhead", "", f"Command: `{command}`  ", f"Machine: {machine}; "
             f"LoRA r=2 on q/v; batch {args.batch_size}; median of {args.repeats} runs of {args.steps} steps.  ",
             f"Date: {time.strftime('%Y-%m-%d')}; run it on an otherwise idle machine.", "",
             "| model | " + " | ".join(MODES) + " | overhead (eps=8, secret) |", "|---" * (len(MODES) + 2) + "|"]
    for name, r in rows.items():
        cells = " | ".join(f"{v * 1e3:.1f} ms" for v in r.values())
        lines.append(f"| {name} | {cells} | {r['dp-sgd (eps=8, poisson, secret noise)'] / r['none']:.2f}× |")
    (args.out / "dp_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
