"""Reading an update through its effect: the rebuilt TinyLM's answers to public probe prompts.

The server already holds an organization's TinyLM update, so it can rebuild the fine-tuned TinyLM and
ask it public questions: post-processing, no new privacy cost. What the tuned TinyLM answers (its answer
format, the operation it applies) names the organization's task far more directly than 2 × 256 raw LoRA
numbers, and in a form that carries over to combinations never curated. A probe feature is the TinyLM's
log-probabilities over its vocabulary at the first ``positions`` steps of its own greedy answer, one
token per probe prompt, for the Grad-Transformer's encoder to read next to the layer tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from fedgt.core.batching import encode
from fedgt.core.data import DomainData
from fedgt.core.examples import Example, prompt_of
from fedgt.core.grouped_lora import grouped_lora
from fedgt.core.judge import LLMJudge


def probe_prompts(public: Sequence[DomainData], n: int = 32, seed: int = 0) -> list[str]:
    """n prompts drawn from different public domains, seeded: the provider's fixed questions (tasks first)."""
    rng = random.Random(f"probes-{seed}")
    domains = [d for d in public if any(ex.is_task for ex in d.train)] or [d for d in public if d.train]
    picked = rng.sample(domains, min(n, len(domains)))
    while len(picked) < n and domains:  # fewer domains than probes: take more than one prompt per domain
        picked.append(rng.choice(domains))
    return [prompt_of(rng.choice([ex for ex in d.train if ex.is_task] or list(d.train))) for d in picked]


@torch.no_grad()
def probe_features(tiny: LLMJudge, tiny_tokens: torch.Tensor, prompts: Sequence[str], positions: int = 3,
                   batch_updates: int = 64) -> torch.Tensor:
    """``(N, len(prompts), positions * vocab)``: log-probs of the tuned TinyLM along its greedy answers."""
    n_prompts, vocab = len(prompts), len(tiny.tokenizer)
    base = encode(tiny.tokenizer, [Example(p, "", True) for p in prompts], tiny.max_length)
    out = []
    for start in range(0, len(tiny_tokens), batch_updates):
        toks = tiny_tokens[start:start + batch_updates]
        g = len(toks)
        ids = base.input_ids.repeat(g, 1).to(tiny.device)
        mask = base.attention_mask.repeat(g, 1).to(tiny.device)
        lengths = mask.sum(1)
        groups = torch.arange(g, device=tiny.device).repeat_interleave(n_prompts)
        feats = []
        factors = tiny.factors(toks)
        for _ in range(positions):
            with grouped_lora(tiny.model, factors, groups):
                logits = tiny.model(input_ids=ids, attention_mask=mask).logits
            last = logits[torch.arange(len(ids), device=ids.device), lengths - 1].float()
            logp = torch.log_softmax(last, -1)
            feats.append(logp[:, :vocab])
            nxt = logp.argmax(-1)
            # Append the greedy token at each row's end (rows are right-padded to a common width).
            ids = torch.cat([ids, torch.zeros_like(ids[:, :1])], 1)
            mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
            ids[torch.arange(len(ids)), lengths] = nxt
            mask[torch.arange(len(ids)), lengths] = 1
            lengths = lengths + 1
        out.append(torch.cat(feats, -1).view(g, n_prompts, -1).cpu())
    return torch.cat(out)
