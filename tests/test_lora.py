"""Seeded LoRA: identical init across attaches, family discovery, canonical names, and the B @ A delta."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from fedgt.core.lora import (
    LoraSettings,
    attach_lora,
    discover_target_modules,
    lora_parameters,
    merge_into_base,
    set_lora_parameters,
)

HIDDEN = 32
TOKENS = torch.tensor([[1, 5, 7, 3, 9, 2]])  # (batch 1, seq 6)


def toy_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def toy_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def toy_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config).eval()


def test_two_attaches_on_fresh_models_give_identical_factors() -> None:
    # Prepare: two Llama models with *different* base weights; only the architecture is shared.
    settings = LoraSettings()

    # Execute
    first = lora_parameters(attach_lora(toy_llama(seed=1), settings))
    second = lora_parameters(attach_lora(toy_llama(seed=2), settings))

    # Assert: same keys, bit-identical values; A is random (nonzero), B starts at zero.
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert first["model.layers.0.self_attn.q_proj.lora_A.weight"].abs().sum() > 0
    assert torch.count_nonzero(first["model.layers.0.self_attn.q_proj.lora_B.weight"]) == 0


def test_different_init_seed_gives_different_a() -> None:
    # Execute
    a42 = lora_parameters(attach_lora(toy_llama(), LoraSettings(init_seed=42)))
    a43 = lora_parameters(attach_lora(toy_llama(), LoraSettings(init_seed=43)))

    # Assert
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(a42[key], a43[key])


def test_attach_leaves_global_rng_unaffected() -> None:
    # Prepare: what the global generator would produce next without the attach.
    model = toy_llama()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)

    # Execute
    attach_lora(model, LoraSettings())
    after_attach = torch.rand(4)

    # Assert
    assert torch.equal(after_attach, expected)


def test_canonical_names_match_peft_state_dict_and_shapes() -> None:
    # Prepare
    model = attach_lora(toy_llama(), LoraSettings(r=2))

    # Execute
    params = lora_parameters(model)
    peft_keys = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(model)}

    # Assert: 2 layers x {q, v} x {A, B} = 8 tensors; A is (r, in) = (2, 32), B is (out, r) = (32, 2).
    assert set(params) == peft_keys
    assert len(params) == 8
    assert params["model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, HIDDEN)
    assert params["model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (HIDDEN, 2)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in params.values())


def test_freeze_a_leaves_only_b_trainable() -> None:
    # Execute
    model = attach_lora(toy_llama(), LoraSettings(freeze_a=True))

    # Assert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".lora_B." in n for n in trainable)
    assert all(k.endswith("lora_B.weight") for k in lora_parameters(model))


def test_discovery_maps_llama_names_to_gpt2_c_attn() -> None:
    # Execute
    found = discover_target_modules(toy_gpt2(), ["q_proj", "v_proj"])

    # Assert: GPT-2's fused qkv Conv1D stands in for both.
    assert found == ["c_attn"]


def test_discovery_maps_llama_names_to_neox_query_key_value() -> None:
    # Execute
    found = discover_target_modules(toy_neox(), ["q_proj", "v_proj"])

    # Assert
    assert found == ["query_key_value"]


def test_discovery_keeps_requested_names_that_exist() -> None:
    # Execute
    found = discover_target_modules(toy_llama(), ["v_proj", "nope", "o_proj"])

    # Assert: present names kept in request order, absent ones dropped.
    assert found == ["v_proj", "o_proj"]


def test_unknown_targets_raise_with_the_models_linear_names() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no_such_proj") as info:
        discover_target_modules(toy_llama(), ["no_such_proj"])
    assert "gate_proj" in str(info.value) and "q_proj" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": ()}, "target_modules"),
    ],
)
def test_lora_settings_validation_names_the_field(kwargs: dict, field: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"LoraSettings\.{field} .*got"):
        LoraSettings(**kwargs)


def test_set_lora_parameters_rejects_unknown_key() -> None:
    # Prepare
    model = attach_lora(toy_llama(), LoraSettings())

    # Execute / Assert
    with pytest.raises(KeyError, match=r"model\.layers\.9"):
        set_lora_parameters(model, {"model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, HIDDEN)})


def test_llama_lora_delta_equals_scaled_b_at_a() -> None:
    # Prepare: a reference copy of the base model, then LoRA with a nonzero B.
    base = toy_llama()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        base_logits = reference(TOKENS).logits
    settings = LoraSettings(r=2, alpha=32)  # scaling alpha / r = 16
    model = attach_lora(base, settings)
    torch.manual_seed(7)
    params = lora_parameters(model)
    new_b = {k: 0.01 * torch.randn_like(v) for k, v in params.items() if k.endswith("lora_B.weight")}
    set_lora_parameters(model, new_b)
    # Substitute W + (alpha / r) * B @ A into the reference; Linear weight is (out, in) = B (out, r) @ A (r, in).
    with torch.no_grad():
        for layer in range(2):
            for proj in ("q_proj", "v_proj"):
                stem = f"model.layers.{layer}.self_attn.{proj}"
                delta = settings.scaling * new_b[f"{stem}.lora_B.weight"] @ params[f"{stem}.lora_A.weight"]
                reference.get_submodule(stem).weight += delta

    # Execute
    with torch.no_grad():
        got = model(TOKENS).logits
        want = reference(TOKENS).logits

    # Assert: the delta is real (logits moved off the base) and equals the merged weight's effect.
    assert not torch.allclose(got, base_logits, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-5)


def test_gpt2_conv1d_lora_delta_uses_transposed_weight() -> None:
    # Prepare: Conv1D stores its weight as (in, out) = (32, 96), so the delta is (B @ A).T.
    base = toy_gpt2()
    reference = copy.deepcopy(base)
    settings = LoraSettings()
    model = attach_lora(base, settings)
    torch.manual_seed(7)
    params = lora_parameters(model)
    new_b = {k: 0.01 * torch.randn_like(v) for k, v in params.items() if k.endswith("lora_B.weight")}
    set_lora_parameters(model, new_b)
    with torch.no_grad():
        for layer in range(2):
            stem = f"transformer.h.{layer}.attn.c_attn"
            delta = settings.scaling * new_b[f"{stem}.lora_B.weight"] @ params[f"{stem}.lora_A.weight"]  # (96, 32)
            reference.get_submodule(stem).weight += delta.T

    # Execute
    with torch.no_grad():
        got = model(TOKENS).logits
        want = reference(TOKENS).logits

    # Assert
    assert params["transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * HIDDEN, 2)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("build", [toy_llama, toy_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_merging_factors_into_the_base_equals_running_them_as_lora(build) -> None:
    # Prepare: factors away from the init; one model runs them as LoRA, the other folds them into its base weights
    # (GPT-2's Conv1D stores (in, out), so the fold must transpose B @ A).
    settings = LoraSettings()
    as_lora, merged = attach_lora(build(), settings), attach_lora(build(), settings)
    g = torch.Generator().manual_seed(3)
    factors = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_parameters(as_lora).items()}
    set_lora_parameters(as_lora, factors)

    # Execute: fold into the base, and leave the seeded LoRA of the merged model at B = 0 (no contribution).
    merge_into_base(merged, factors, settings.scaling)

    # Assert
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS).logits, as_lora(TOKENS).logits, atol=1e-5, rtol=1e-5)
