"""finetune_grouped: G adapters trained in one forward/backward per step equal G separate fine-tunes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig, finetune
from fedgt.core.grouped_finetune import finetune_grouped, supports_grouped
from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters, set_lora_parameters
from fedgt.core.models import load_model


def _domains() -> list[list[Example]]:
    # Different lengths per domain, so the stacked batch pads rows of one domain to another's width.
    return [[Example(f"Q: {w} {i}?\nA:", f" {w[::-1]}{i}\n", True) for i in range(12)]
            for w in ("ab", "hello", "xyz12345")]


@pytest.mark.parametrize("freeze_a", [False, True])
def test_grouped_equals_one_finetune_per_domain(toy_pair, freeze_a: bool) -> None:
    model, tok = load_model(toy_pair[0])
    model = attach_lora(model, LoraSettings(freeze_a=freeze_a))
    init = lora_parameters(model)
    cfg = FinetuneConfig(steps=12, lr=1e-2, batch_size=4, snapshot_steps=(6, 12), seed=3)
    expected = []
    for examples in _domains():
        set_lora_parameters(model, init)
        expected.append(finetune(model, tok, examples, cfg))
    set_lora_parameters(model, init)
    got = finetune_grouped(model, tok, _domains(), cfg)
    assert len(got) == 3
    for e, g in zip(expected, got, strict=True):
        assert set(g.update) == set(e.update)
        for k in e.update:
            assert e.update[k].abs().sum() > 0
            torch.testing.assert_close(g.update[k], e.update[k], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(g.snapshots[6][k], e.snapshots[6][k], atol=2e-5, rtol=1e-4)
        assert g.metrics["train-loss"] == pytest.approx(e.metrics["train-loss"], rel=1e-4)
    # The model keeps its own LoRA values: grouped training never writes into it.
    for k, v in lora_parameters(model).items():
        torch.testing.assert_close(v, init[k])


def test_gpt2_conv1d_targets_group_like_linear_ones(tmp_path) -> None:
    from tests.test_cross_family import save_gpt2_tiny

    texts = [ex.context + ex.target for d in _domains() for ex in d]
    model, tok = load_model(save_gpt2_tiny(tmp_path / "gpt2", texts))
    for module in model.modules():  # GPT-2's own dropout draws differ between one batch of 3 domains and 3 batches
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = attach_lora(model, LoraSettings(target_modules=("c_attn",)))
    assert supports_grouped(model)
    init = lora_parameters(model)
    cfg = FinetuneConfig(steps=6, lr=1e-2, batch_size=4, snapshot_steps=(6,), seed=3)
    expected = []
    for examples in _domains():
        set_lora_parameters(model, init)
        expected.append(finetune(model, tok, examples, cfg))
    set_lora_parameters(model, init)
    for e, g in zip(expected, finetune_grouped(model, tok, _domains(), cfg), strict=True):
        for k in e.update:
            torch.testing.assert_close(g.update[k], e.update[k], atol=2e-5, rtol=1e-4)


def test_lora_dropout_is_refused_with_a_clear_error() -> None:
    model = attach_lora(GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2)),
                        LoraSettings(dropout=0.1))
    assert not supports_grouped(model)
    with pytest.raises(ValueError, match="dropout"):
        finetune_grouped(model, None, [[Example("a", "b", True)]], FinetuneConfig(steps=1))
