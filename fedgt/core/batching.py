"""Examples to tensors: token ids, attention mask and a loss mask that covers only the target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedgt.core.examples import Example


@dataclass
class Encoded:
    """Right-padded token tensors of a set of examples, all (N, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor  # 1 where the token is part of the target (its prediction is trained)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Encoded:
        """The same rows on another device."""
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

    def select(self, index: torch.Tensor | Sequence[int]) -> Encoded:
        """Rows by index, trimmed to the longest selected row (saves compute on short batches)."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.attention_mask[index]
        width = max(int(mask.sum(1).max()), 1) if len(index) else 1
        return Encoded(self.input_ids[index, :width], mask[:, :width], self.loss_mask[index, :width])


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> Encoded:
    """Tokenize context and target separately (as SFT does) and concatenate; truncate to max_length."""
    if not examples:
        raise ValueError("encode: no examples")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # One batched call per side: the fast tokenizer does the loop in Rust.
    contexts = tokenizer([ex.context for ex in examples], add_special_tokens=False).input_ids
    targets = tokenizer([ex.target for ex in examples], add_special_tokens=False).input_ids
    rows = [(bos + ctx + tgt)[:max_length] for ctx, tgt in zip(contexts, targets, strict=True)]
    lengths = np.array([len(r) for r in rows])
    n_ctx = np.minimum([len(bos) + len(ctx) for ctx in contexts], lengths)
    width = int(lengths.max())
    # Fill all rows at once: positions below a row's length are real tokens, those past its context are target.
    positions = np.arange(width)[None, :]
    real = positions < lengths[:, None]
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    ids[real] = flat  # boolean assignment fills row by row, left to right: the order ``flat`` was built in
    input_ids = torch.from_numpy(ids)
    attention = torch.from_numpy(real.astype(np.int64))
    loss_mask = torch.from_numpy((real & (positions >= n_ctx[:, None])).astype(np.int64))
    return Encoded(input_ids, attention, loss_mask)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def per_example_loss(model: torch.nn.Module, batch: Encoded) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's target tokens, shape (B,).

    Per-example (not per-batch) means keep each example's gradient independent of the others, which
    DP-SGD's per-sample clipping needs, and weight short and long answers equally.
    """
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    logits = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:]
    mask = batch.loss_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)
