"""Proxy-tuning (logit arithmetic) baseline: LLM log-probs + (tuned TinyLM - untuned TinyLM) log-probs.

Needs the two models to share a vocabulary; costs three forwards per token at serving time, and the
organization's TinyLM must run next to the LLM forever (nothing is transferred into the LLM).
"""

from __future__ import annotations

from collections.abc import Sequence

import peft
import torch

from fedgt.core.batching import encode, model_device
from fedgt.core.examples import Example
from fedgt.core.grouped_lora import adapter_disabled


def same_vocabulary(tok_a, tok_b) -> bool:
    """Whether two tokenizers map every token to the same id."""
    return tok_a.get_vocab() == tok_b.get_vocab()


def _log_probs(model: torch.nn.Module, batch) -> torch.Tensor:
    device = model_device(model)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return torch.log_softmax(out.logits[:, :-1].float().cpu(), -1)


@torch.no_grad()
def proxy_tuning_scores(llm: torch.nn.Module, tiny_tuned: peft.PeftModel, tokenizer, examples: Sequence[Example],
                        max_length: int = 96, batch_size: int = 64) -> dict[str, float]:
    """Token-weighted target loss and teacher-forced exact match of the proxy-tuned distribution.

    ``llm`` is the untuned LLM; ``tiny_tuned`` is the TinyLM with the organization's adapter, whose
    ``disable_adapter()`` gives the untuned TinyLM.
    """
    data = encode(tokenizer, examples, max_length)
    total, tokens, exact, tasks = 0.0, 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        batch = data.select(rows)
        tuned = _log_probs(tiny_tuned, batch)
        with adapter_disabled(tiny_tuned):
            base = _log_probs(tiny_tuned, batch)
        combined = torch.log_softmax(_log_probs(llm, batch) + tuned - base, -1)
        target, mask = batch.input_ids[:, 1:], batch.loss_mask[:, 1:].bool()
        nll = -combined.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        total += float((nll * mask).sum())
        tokens += float(mask.sum())
        hit = ((combined.argmax(-1) == target) | ~mask).all(1)
        is_task = torch.tensor([examples[r].is_task for r in rows])
        exact += int((hit & is_task).sum())
        tasks += int(is_task.sum())
    out = {"loss": total / max(tokens, 1.0)}
    if tasks:
        out["exact_match"] = exact / tasks
    return out
