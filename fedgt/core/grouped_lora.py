"""Many LoRA adapters in one forward pass: row i of a batch runs with adapter ``groups[i]``.

Evaluating an LLM under dozens of candidate updates, and training the Grad-Transformer *through* the
LLM (its generated update applied, the LLM's loss back-propagated into the generator), both need one
model with a different adapter per example. Looping over adapters costs one forward per adapter; here
the peft adapter is switched off and forward hooks add ``scaling * (x @ A_g^T) @ B_g^T`` per row, so a
batch mixing G adapters costs one forward, and gradients flow into the stacked factors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import peft
import torch

from fedgt.core.lora import LORA_FACTORS, canonical_name


def lora_modules(peft_model: peft.PeftModel) -> dict[str, torch.nn.Module]:
    """peft LoRA layers by canonical module name (e.g. ``model.layers.0.self_attn.q_proj``)."""
    adapters = list(peft_model.peft_config)
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and hasattr(module, "lora_A"):
            out[canonical_name(name, adapters)] = module
    return out


def all_lora_factors(peft_model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """Every LoRA factor (trainable or frozen) by canonical name, detached."""
    adapters = list(peft_model.peft_config)
    return {
        canonical_name(n, adapters): p.detach()
        for n, p in peft_model.named_parameters()
        if any(f in n.split(".") for f in LORA_FACTORS)
    }


@contextmanager
def adapter_disabled(peft_model: peft.PeftModel) -> Iterator[None]:
    """peft's ``disable_adapter()``, but leaving every ``requires_grad`` flag as it was.

    On exit peft re-enables the adapter by marking all its factors trainable, which would silently turn a
    frozen A (LoRA-FA) or a frozen judge trainable.
    """
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def grouped_lora(peft_model: peft.PeftModel, factors: Mapping[str, torch.Tensor], groups: torch.Tensor
                 ) -> Iterator[None]:
    """Inside the block, row i of any batch uses LoRA factors ``factors[key][groups[i]]``.

    ``factors`` maps canonical LoRA parameter names to stacked values ``(G, *shape)``; a factor left out
    (e.g. the frozen A of LoRA-FA) keeps the model's own value for every group. ``groups`` is ``(N,)``
    with values in ``[0, G)`` for a batch of N rows.
    """
    current = all_lora_factors(peft_model)
    unknown = sorted(set(factors) - set(current))
    if unknown:
        raise KeyError(f"grouped_lora: {unknown[:3]} are not LoRA parameters of the model (e.g. {sorted(current)[:2]})")
    adapter = peft_model.active_adapter
    blocks = _equal_blocks(groups)
    handles = []
    for module_name, module in lora_modules(peft_model).items():
        a_key, b_key = f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"
        scale = module.scaling[adapter]
        if blocks is not None:  # the factors of each block's group, (K, r, in) and (K, out, r)
            k = len(blocks)
            a = factors[a_key][blocks] if a_key in factors else current[a_key].unsqueeze(0).expand(k, -1, -1)
            b = factors[b_key][blocks] if b_key in factors else current[b_key].unsqueeze(0).expand(k, -1, -1)
            hook = _block_hook(a, b, scale, k)
        else:
            a = factors[a_key][groups] if a_key in factors else current[a_key].unsqueeze(0)  # (N|1, r, in)
            b = factors[b_key][groups] if b_key in factors else current[b_key].unsqueeze(0)  # (N|1, out, r)
            hook = _row_hook(a, b, scale)
        handles.append(module.register_forward_hook(hook))
    try:
        with adapter_disabled(peft_model):
            yield
    finally:
        for h in handles:
            h.remove()


def _equal_blocks(groups: torch.Tensor) -> torch.Tensor | None:
    """Each block's group when ``groups`` is K equal contiguous blocks (one bmm per layer), else None."""
    n = groups.numel()
    if n == 0:
        return None
    k = int((groups[1:] != groups[:-1]).sum()) + 1
    if n % k:
        return None
    ids = groups[:: n // k]
    return ids if torch.equal(groups, ids.repeat_interleave(n // k)) else None


def _block_hook(a: torch.Tensor, b: torch.Tensor, scale: float, blocks: int):
    """Rows in G equal contiguous blocks: view them as (G, rows·T, in) and run two batched GEMMs."""

    def hook(_mod, args, output):
        x = args[0]
        xs = x.reshape(blocks, -1, x.shape[-1])  # (G, M·T, in)
        low = torch.bmm(xs, a.to(x.dtype).transpose(1, 2))  # (G, M·T, r)
        return output + scale * torch.bmm(low, b.to(x.dtype).transpose(1, 2)).reshape(output.shape)

    return hook


def _row_hook(a: torch.Tensor, b: torch.Tensor, scale: float):
    """Any row-to-adapter assignment: each row gathers its own factors (N copies of A and B)."""

    def hook(_mod, args, output):
        x = args[0]
        low = torch.einsum("nti,nri->ntr", x, a.expand(x.shape[0], -1, -1).to(x.dtype))
        return output + scale * torch.einsum("ntr,nor->nto", low, b.expand(x.shape[0], -1, -1).to(x.dtype))

    return hook
