"""The LLM as a judge of generated updates: its loss and exact match with an update applied, many at once.

Used to train the Grad-Transformer through the LLM (a differentiable loss), to select checkpoints and
baseline hyper-parameters on shadow validation domains, and to score every method in the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedgt.core.batching import Encoded, encode, model_device, per_example_loss
from fedgt.core.examples import Example
from fedgt.core.grouped_lora import grouped_lora
from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters
from fedgt.core.models import load_model
from fedgt.core.updates import UpdateSpec, spec_of

LOGIT_BUDGET = 2**26  # logit entries one scoring batch may hold

def unflatten_batch(tokens: torch.Tensor, spec: UpdateSpec) -> dict[str, torch.Tensor]:
    """Batched ``updates.unflatten``: ``(B, layers, token_dim)`` to ``{key: (B, *shape)}`` (differentiable)."""
    if tuple(tokens.shape[1:]) != (spec.num_layers, spec.token_dim):
        raise ValueError(f"update tokens must be (batch, {spec.num_layers}, {spec.token_dim}), "
                         f"got {tuple(tokens.shape)}")
    row_of = {layer: i for i, layer in enumerate(spec.layers)}
    offsets = dict.fromkeys(spec.layers, 0)
    out = {}
    for key, shape, layer in zip(spec.keys, spec.shapes, spec.layer_of, strict=True):
        n = math.prod(shape)
        out[key] = tokens[:, row_of[layer], offsets[layer]:offsets[layer] + n].reshape(-1, *shape)
        offsets[layer] += n
    return out


class LLMJudge:
    """A base LLM with seeded LoRA attached, scoring stacked updates of its own spec."""

    def __init__(self, model_spec: str, lora: LoraSettings, device: str | torch.device = "cpu", max_length: int = 96):
        model, self.tokenizer = load_model(model_spec)
        self.model = attach_lora(model, lora).to(device).eval()
        self.init = {k: v.to(device) for k, v in lora_parameters(self.model).items()}
        self.spec: UpdateSpec = spec_of(self.model)  # the trainable factors: what an update holds
        for p in self.model.parameters():
            p.requires_grad_(False)  # the judge is never trained; gradients flow only into the given factors
        self.max_length = max_length
        self._base_weights: dict[str, torch.Tensor] | None = None  # the untouched base, kept by set_dense

    @torch.no_grad()
    def set_dense(self, change: dict[str, torch.Tensor]) -> None:
        """Base weights + a dense (out, in) change per LoRA module (reset from the untouched base; {} = base)."""
        modules = dict(self.model.named_modules())
        if self._base_weights is None:
            self._base_weights = {n[len("base_model.model."):]: m.base_layer.weight.detach().clone()
                                  for n, m in modules.items() if hasattr(m, "base_layer")
                                  and n.startswith("base_model.model.")}
        unknown = sorted(set(change) - set(self._base_weights))
        if unknown:
            raise KeyError(f"set_dense: {unknown[:3]} are not LoRA-wrapped modules")
        for m, base in self._base_weights.items():
            wrapped = modules["base_model.model." + m]
            # A change is (out, in) as B @ A; GPT-2's Conv1D (peft's fan_in_fan_out) stores its weight (in, out).
            delta = change[m].T if m in change and getattr(wrapped, "fan_in_fan_out", False) else change.get(m)
            wrapped.base_layer.weight.copy_(base + delta.to(base) if delta is not None else base)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def factors(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """LoRA factors ``init + update`` for a batch of update tokens."""
        delta = unflatten_batch(tokens.to(self.device), self.spec)
        return {k: self.init[k].unsqueeze(0) + v for k, v in delta.items()}

    def encode(self, examples: Sequence[Example]) -> Encoded:
        """Examples to tensors with this model's tokenizer."""
        return encode(self.tokenizer, examples, self.max_length)

    def example_losses(self, tokens: torch.Tensor, batch: Encoded, groups: torch.Tensor) -> torch.Tensor:
        """Per-example target loss ``(N,)``; row i runs with update ``tokens[groups[i]]`` (differentiable)."""
        with grouped_lora(self.model, self.factors(tokens), groups.to(self.device)):
            return per_example_loss(self.model, batch)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, examples: Sequence[Sequence[Example]], batch_rows: int = 256
              ) -> list[dict[str, float]]:
        """For each update i: token-weighted loss and teacher-forced exact match on ``examples[i]``."""
        if len(tokens) != len(examples):
            raise ValueError(f"score: {len(tokens)} updates but {len(examples)} example sets")
        flat = [(i, ex) for i, exs in enumerate(examples) for ex in exs]
        data = self.encode([ex for _, ex in flat]).to(self.device)
        groups = torch.tensor([i for i, _ in flat], device=self.device)
        sums = torch.zeros(len(tokens), 4, dtype=torch.float64)  # loss sum, target tokens, exact, tasks
        # Logits are rows x length x vocabulary: bound them (~256 MB) so a 49k-token vocabulary fits like a small one.
        batch_rows = max(1, min(batch_rows, LOGIT_BUDGET // (data.input_ids.shape[1] * self.model.config.vocab_size)))
        for start in range(0, len(flat), batch_rows):
            rows = torch.arange(start, min(start + batch_rows, len(flat)))
            batch, grp = data.select(rows), groups[rows.to(self.device)]
            used = torch.unique(grp)
            local = torch.searchsorted(used, grp)
            with grouped_lora(self.model, self.factors(tokens[used.cpu()]), local):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            target, mask = batch.input_ids[:, 1:], batch.loss_mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
            hit = ((logits.argmax(-1) == target) | ~mask).all(1)
            is_task = torch.tensor([flat[int(r)][1].is_task for r in rows], device=self.device)
            for col, val in enumerate(((nll * mask).sum(1), mask.sum(1), hit & is_task, is_task)):
                sums[:, col].index_add_(0, grp.cpu(), val.double().cpu())
        out = []
        for loss_sum, n_tok, exact, tasks in sums.tolist():
            row = {"loss": loss_sum / max(n_tok, 1.0)}
            if tasks:
                row["exact_match"] = exact / tasks
            out.append(row)
        return out
