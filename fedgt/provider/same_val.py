"""Same-distribution validation inputs for Grad-Transformer training.

Held-out shadow *domains* measure whether the GT generalises to skills it never saw; organizations whose data
is like the provider's shadow domains (the paper's setting) need the other thing: a *fresh* fine-tuning run on
a training domain, with other examples, mapped well. For a seeded sample of the GT's training domains the
TinyLM is fine-tuned from the seeded init on the first half of the domain's public test draw (the
organizations' recipe, the curation's DP setting); the LLM with the generated update is scored on the other
half. Neither half is an example the GT was trained on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedgt.core.dp import DPConfig
from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.provider.shadow import LoraTuner


@dataclass
class SameDomainVal:
    """Fresh TinyLM updates on training domains (``probes`` filled by the caller when the GT reads them)."""

    names: list[str]
    tiny: torch.Tensor  # (N, Ls, Ds)
    examples: list[list[Example]]  # what the LLM with each generated update is scored on
    probes: torch.Tensor | None = None


def pick_domains(names: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` domain names (all of them when there are fewer)."""
    order = sorted(names)
    return sorted(random.Random(f"same-val-{seed}").sample(order, min(n, len(order))))


def same_domain_val(tiny_model: str, lora: LoraSettings, finetune: FinetuneConfig,
                    test_examples: Mapping[str, Sequence[Example]], names: Sequence[str], n: int = 16, seed: int = 0,
                    dp: DPConfig = DPConfig()) -> SameDomainVal:
    """Fine-tune the TinyLM on half of each picked domain's test examples; the other half scores."""
    picked = pick_domains(names, n, seed)
    short = [name for name in picked if len(test_examples[name]) < 4]
    if short:
        raise ValueError(f"same-domain validation needs >= 4 test examples per domain; {short[:3]} have fewer")
    tuner = LoraTuner(tiny_model, lora)
    ft = replace(finetune, snapshot_steps=())
    tokens, scored = [], []
    for name in picked:
        examples = list(test_examples[name])
        half = len(examples) // 2
        result = tuner.run(examples[:half], ft, dp)
        tokens.append(tuner.tokens(result.update))
        scored.append(examples[half:])
    return SameDomainVal(names=picked, tiny=torch.stack(tokens), examples=scored)
