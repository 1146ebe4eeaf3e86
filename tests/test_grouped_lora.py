"""grouped_lora: one forward with per-row adapters equals one forward per adapter through peft."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedgt.core.grouped_lora import _equal_blocks, grouped_lora
from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters, set_lora_parameters


def _model(freeze_a: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2)
    return attach_lora(LlamaForCausalLM(config).eval(), LoraSettings(freeze_a=freeze_a))


@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("order", [[2, 0, 1, 2, 0, 1], [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1], [2, 2, 0, 0, 2, 2]],
                         ids=["mixed-rows", "equal-blocks", "blocks-of-some-groups", "blocks-in-any-order"])
def test_grouped_forward_equals_one_peft_forward_per_adapter(freeze_a: bool, order: list[int]) -> None:
    model = _model(freeze_a)
    init = lora_parameters(model)
    g = torch.Generator().manual_seed(1)
    adapters = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(3)]
    ids = torch.randint(3, 40, (6, 7), generator=g)
    groups = torch.tensor(order)
    expected = []
    for row, grp in zip(ids, groups.tolist(), strict=True):
        set_lora_parameters(model, adapters[grp])
        expected.append(model(input_ids=row[None]).logits[0])
    set_lora_parameters(model, init)
    stacked = {k: torch.stack([a[k] for a in adapters]).requires_grad_() for k in init}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    with grouped_lora(model, stacked, groups):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    got.sum().backward()  # gradients reach the stacked factors: the generator can be trained through the LLM
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in stacked.values())
    # Outside the block the model is its own adapter again.
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any(m._forward_hooks for m in model.modules())
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable  # flags survive the block


def test_unknown_factor_names_are_rejected() -> None:
    model = _model(True)
    with pytest.raises(KeyError, match="not LoRA parameters"), grouped_lora(model, {"nope": torch.zeros(1)},
                                                                             torch.zeros(1, dtype=torch.long)):
        pass


def test_equal_blocks_detects_contiguous_equal_groups_only() -> None:
    def blocks(groups: list[int]):
        found = _equal_blocks(torch.tensor(groups))
        return None if found is None else found.tolist()

    assert blocks([0, 0, 1, 1, 2, 2]) == [0, 1, 2]
    assert blocks([0, 1, 1]) is None  # unequal
    assert blocks([1, 1, 0, 0]) == [1, 0]  # any order: each block reads its own group's factors
    assert blocks([0, 0, 2, 2]) == [0, 2]  # a batch holding only some of the groups (a slice of a longer list)
    assert blocks([3, 3, 3]) == [3]


def test_conv1d_targets_group_like_linear_ones() -> None:
    # GPT-2's Conv1D stores its weight transposed, but peft's LoRA factors on it are plain Linear maps of x.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=16)).eval()
    model = attach_lora(model, LoraSettings(target_modules=("c_attn",)))
    init = lora_parameters(model)
    g = torch.Generator().manual_seed(1)
    adapters = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(2)]
    ids = torch.randint(3, 40, (4, 7), generator=g)
    groups = torch.tensor([1, 0, 0, 1])
    expected = []
    for row, grp in zip(ids, groups.tolist(), strict=True):
        set_lora_parameters(model, adapters[grp])
        expected.append(model(input_ids=row[None]).logits[0])
    set_lora_parameters(model, init)
    stacked = {k: torch.stack([a[k] for a in adapters]) for k in init}
    with grouped_lora(model, stacked, groups):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
