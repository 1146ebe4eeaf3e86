"""Command-line flags shared by ``fedgt`` subcommands and the demo, parsed into typed configs.

Every default is the run config's (``fedgt.core.run_config``): a flag and the run-config key it mirrors never
disagree (``--steps`` is ``train.steps``, ``--lora-r`` is ``lora.r``, ``--n-train`` is ``data.n-train``, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedgt.core.dp import DP_MODES, DPConfig
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.run_config import DataSection, DPSection, LoraSection, TrainSection


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=LoraSection.r)
    g.add_argument("--lora-alpha", type=int, default=LoraSection.alpha)
    g.add_argument("--lora-targets", default=LoraSection.targets, help="comma-separated module names")
    g.add_argument("--lora-init-seed", type=int, default=LoraSection.init_seed)
    g.add_argument("--lora-freeze-a", action="store_true", help="LoRA-FA: train B only, A stays at its seeded init")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--steps", type=int, default=TrainSection.steps)
    g.add_argument("--lr", type=float, default=TrainSection.lr)
    g.add_argument("--batch-size", type=int, default=TrainSection.batch_size)
    g.add_argument("--max-length", type=int, default=TrainSection.max_length)
    g.add_argument("--seed", type=int, default=TrainSection.seed)
    d = p.add_argument_group("differential privacy")
    d.add_argument("--dp-mode", choices=DP_MODES, default=DPSection.mode)
    d.add_argument("--epsilon", type=float, default=None, help="dp-sgd: target ε of the run; update: ε of the release "
                   f"(default dp.epsilon = {DPSection.epsilon:g} unless --noise-multiplier is given)")
    d.add_argument("--delta", type=float, default=DPSection.delta)
    d.add_argument("--noise-multiplier", type=float, default=None, help="dp-sgd: σ instead of --epsilon")
    d.add_argument("--max-grad-norm", type=float, default=DPSection.max_grad_norm, help="dp-sgd per-sample clip")
    d.add_argument("--update-clip", type=float, default=DPSection.update_clip,
                   help="update mode: L2 clip of the update")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--domain", help="a task domain name (see `fedgt domains`)")
    g.add_argument("--data", type=Path, help="a folder of .txt / .jsonl files (your own data)")
    p.add_argument("--n-train", type=int, default=DataSection.n_train)
    p.add_argument("--n-test", type=int, default=DataSection.n_test)


def lora_settings(args: argparse.Namespace) -> LoraSettings:
    """LoRA flags to a typed config."""
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets, init_seed=args.lora_init_seed,
                        freeze_a=args.lora_freeze_a)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """Fine-tuning flags to a typed config."""
    return FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                          seed=args.seed)


def dp_config(args: argparse.Namespace) -> DPConfig:
    """DP flags to a typed config (validated there)."""
    epsilon = args.epsilon
    if epsilon is None and args.noise_multiplier is None and args.dp_mode != "none":
        epsilon = DPSection.epsilon
    return DPConfig(mode=args.dp_mode, epsilon=epsilon, delta=args.delta, noise_multiplier=args.noise_multiplier,
                    max_grad_norm=args.max_grad_norm, update_clip=args.update_clip)


def load_org_data(args: argparse.Namespace):
    """The organization's data: a user folder, or a private task domain of the generator."""
    from fedgt.core.data import load_user_domain, task_domain_data
    from fedgt.core.splits import make_domain_splits
    from fedgt.core.tasks import parse_domain
    from fedgt.core.world import make_world

    if args.data is not None:
        return load_user_domain(args.data)
    name = args.domain or make_domain_splits().held_out_combination[0].name
    return task_domain_data(make_world(), parse_domain(name), args.n_train, args.n_test, seed=args.seed)
