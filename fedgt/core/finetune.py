"""Local LoRA fine-tuning of any causal LM: one explicit loop, returning the update vector.

The model comes in with LoRA attached at its seeded init (``fedgt.core.lora.attach_lora``); what leaves is
the update (LoRA parameters after minus before), optionally DP-protected (``fedgt.core.dp``), plus
snapshots of the update at chosen steps (shadow curation pairs snapshots by step).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from fedgt.core.batching import encode, per_example_loss
from fedgt.core.dp import DPSGD, DPConfig, privatize_update
from fedgt.core.examples import Example
from fedgt.core.lora import lora_parameters
from fedgt.core.noise import NoiseSource, SeededNoise
from fedgt.core.updates import extract_update


@dataclass(frozen=True)
class FinetuneConfig:
    """Budget and optimiser of one local fine-tune."""

    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 96
    weight_decay: float = 0.0
    seed: int = 0
    snapshot_steps: tuple[int, ...] = ()  # 1-based steps after which the update is also recorded

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"finetune: steps, batch_size must be >= 1 and max_length >= 2, got {self}")
        if self.lr <= 0:
            raise ValueError(f"finetune.lr must be > 0, got {self.lr}")
        bad = [s for s in self.snapshot_steps if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"finetune.snapshot_steps {bad} outside 1..{self.steps}")


@dataclass
class FinetuneResult:
    """The update that leaves the organization, with its snapshots and metrics."""

    update: dict[str, torch.Tensor]
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class _Indices(Dataset):
    """Yields example indices; batches are cut from the pre-encoded tensors (no re-tokenising)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)  # a tuple of tensors: the item layout Opacus' Poisson loader expects


def _batches(loader: DataLoader, steps: int):
    """Endless epochs over the loader, stopping after ``steps`` batches."""
    done = 0
    while True:
        for idx in loader:
            yield idx
            done += 1
            if done == steps:
                return


def finetune(model: torch.nn.Module, tokenizer, examples: Sequence[Example], cfg: FinetuneConfig,
             dp: DPConfig = DPConfig(), noise: NoiseSource | None = None) -> FinetuneResult:
    """Train the LoRA parameters of ``model`` on ``examples``; the model is left fine-tuned.

    ``noise`` feeds every DP draw (DP-SGD noise and Poisson batches, update noise). A site passes its secret
    source; the default is seeded from ``cfg.seed``: reproducible, so private only against those without the seed.
    """
    if not examples:
        raise ValueError("finetune: no training examples")
    data = encode(tokenizer, examples, cfg.max_length)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, len(data))
    loader = DataLoader(_Indices(len(data)), batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    before = lora_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()  # Opacus validates the module in training mode
    noise = noise if noise is not None else SeededNoise(cfg.seed + 1)
    private = DPSGD(model, optimizer, len(data), batch_size, dp, cfg.steps, noise) if dp.mode == "dp-sgd" else None
    train_model, batches = model, (idx for (idx,) in _batches(loader, cfg.steps))
    if private:
        train_model, optimizer = private.model, private.optimizer
        if dp.poisson_sampling:
            batches = private.batches()

    t0 = time.perf_counter()
    losses, snapshots = [], {}
    train_model.train()
    try:
        for step, idx in zip(range(1, cfg.steps + 1), batches, strict=False):
            optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:  # Poisson sampling drew nobody: the DP step is pure noise, as the accountant assumes
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
                optimizer.step()
                continue
            loss = per_example_loss(train_model, data.select(idx)).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step in cfg.snapshot_steps:
                snapshots[step] = extract_update(before, lora_parameters(model))
    finally:
        train_model.eval()
        if private:
            dp_metrics = private.metrics()
            private.close()
    update = extract_update(before, lora_parameters(model))

    metrics = {"train-loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "steps": float(cfg.steps),
               "num-examples": float(len(examples)), "train-seconds": time.perf_counter() - t0}
    if private:
        metrics.update(dp_metrics)
    if dp.mode == "update":
        update, dp_metrics = privatize_update(update, dp, noise)
        metrics.update(dp_metrics)
    return FinetuneResult(update=update, snapshots=snapshots, metrics=metrics)
