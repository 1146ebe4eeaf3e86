"""Many independent LoRA fine-tunes in one forward/backward per step: the provider's batched curation.

G domains fine-tune G adapters of one model from the same seeded init. Each step every domain draws its own
batch exactly as ``fedgt.core.finetune.finetune`` would (same loader, same generator seed); the batches are
stacked into one (rows of domain g run with adapter g through ``grouped_lora``) and the loss is the *sum* of the
per-domain mean losses, so each adapter's gradient is its own domain's gradient alone. AdamW is elementwise, so
one AdamW over the stacked factors is G independent AdamWs. The results equal G calls of ``finetune`` up to float
summation order when the base model has no dropout of its own (the presets; tested); the base model runs once per
step over every row instead of once per domain.

Plain (non-DP) training without LoRA dropout only: DP-SGD's per-sample clipping and LoRA dropout go through
``finetune`` one domain at a time (``supports_grouped`` says which). GPT-2's Conv1D targets group like Linear ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import peft
import torch
from torch.utils.data import DataLoader

from fedgt.core.batching import Encoded, encode, per_example_loss
from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig, FinetuneResult, _batches, _Indices
from fedgt.core.grouped_lora import grouped_lora, lora_modules
from fedgt.core.lora import lora_parameters


def supports_grouped(peft_model: peft.PeftModel) -> bool:
    """Whether the model's LoRA layers can train grouped: no LoRA dropout (it would draw one mask per group)."""
    for module in lora_modules(peft_model).values():
        if any(not isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()):
            return False
    return True


def _stack_rows(parts: Sequence[Encoded], pad_id: int) -> Encoded:
    """Right-pad every part to the widest and stack the rows."""
    width = max(p.input_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Encoded(torch.cat([pad(p.input_ids, pad_id) for p in parts]),
                   torch.cat([pad(p.attention_mask, 0) for p in parts]),
                   torch.cat([pad(p.loss_mask, 0) for p in parts]))


def finetune_grouped(peft_model: peft.PeftModel, tokenizer, domains: Sequence[Sequence[Example]],
                     cfg: FinetuneConfig) -> list[FinetuneResult]:
    """Fine-tune one adapter per domain from the model's current (seeded) LoRA values; the model is left as it was."""
    if not domains or any(len(d) == 0 for d in domains):
        raise ValueError("finetune_grouped: every domain needs training examples")
    if not supports_grouped(peft_model):
        raise ValueError("finetune_grouped: the model has LoRA dropout; use finetune()")
    n = len(domains)
    init = lora_parameters(peft_model)
    factors = {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())).requires_grad_(True) for k, v in init.items()}
    optimizer = torch.optim.AdamW(list(factors.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = [encode(tokenizer, d, cfg.max_length) for d in domains]
    streams = []
    for d in data:
        loader = DataLoader(_Indices(len(d)), batch_size=min(cfg.batch_size, len(d)), shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed))
        streams.append(idx for (idx,) in _batches(loader, cfg.steps))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    snapshots: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(n)]
    losses: list[list[float]] = [[] for _ in range(n)]
    t0 = time.perf_counter()
    was_training = peft_model.training
    peft_model.train()
    try:
        for step in range(1, cfg.steps + 1):
            parts = [d.select(next(s)) for d, s in zip(data, streams, strict=True)]
            groups = torch.cat([torch.full((len(p),), g) for g, p in enumerate(parts)])
            optimizer.zero_grad(set_to_none=True)
            with grouped_lora(peft_model, factors, groups):
                rows = per_example_loss(peft_model, _stack_rows(parts, pad_id))
            per_domain = torch.zeros(n).index_add(0, groups, rows) / torch.bincount(groups, minlength=n)
            per_domain.sum().backward()
            optimizer.step()
            for g, value in enumerate(per_domain.tolist()):
                losses[g].append(value)
            if step in cfg.snapshot_steps:
                for g in range(n):
                    snapshots[g][step] = {k: (v[g] - init[k]).detach().clone() for k, v in factors.items()}
    finally:
        peft_model.train(was_training)
    seconds = (time.perf_counter() - t0) / n
    return [
        FinetuneResult(update={k: (v[g] - init[k]).detach().clone() for k, v in factors.items()},
                       snapshots=snapshots[g],
                       metrics={"train-loss": sum(losses[g][-10:]) / len(losses[g][-10:]), "steps": float(cfg.steps),
                                "num-examples": float(len(domains[g])), "train-seconds": seconds})
        for g in range(n)
    ]
