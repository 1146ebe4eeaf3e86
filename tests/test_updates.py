"""The update spec: layout into layer tokens, transport round trips, exact re-application, and rejection."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters
from fedgt.core.updates import (
    UpdateError,
    UpdateSpec,
    apply_update,
    extract_update,
    flatten,
    from_array_record,
    from_vector,
    load_update,
    save_update,
    spec_of,
    to_array_record,
    to_vector,
    unflatten,
    update_norm,
    validate_update,
)

HIDDEN = 32
R = 2
Q_A = "model.layers.1.self_attn.q_proj.lora_A.weight"


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


def lora_llama() -> peft.PeftModel:
    return attach_lora(toy_llama(), LoraSettings(r=R))


def random_update(spec: UpdateSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in zip(spec.keys, spec.shapes, strict=True)}


@pytest.fixture(scope="module")
def spec() -> UpdateSpec:
    return spec_of(lora_llama())


def test_spec_of_toy_llama(spec: UpdateSpec) -> None:
    # Assert: 2 layers -> 2 tokens; per layer q and v each carry A (r, hidden) and B (hidden, r):
    # 2 * (2*32 + 32*2) = 256 scalars per token, 512 in all.
    assert spec.num_layers == 2
    assert spec.token_dim == 2 * (R * HIDDEN + HIDDEN * R) == 256
    assert spec.num_params == 512
    assert spec.layer_of == (0, 0, 0, 0, 1, 1, 1, 1)
    assert spec.keys[:4] == (
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        "model.layers.0.self_attn.v_proj.lora_A.weight",
        "model.layers.0.self_attn.v_proj.lora_B.weight",
    )
    assert spec.shapes[:2] == ((R, HIDDEN), (HIDDEN, R))


def test_spec_json_round_trip(spec: UpdateSpec) -> None:
    # Execute
    again = UpdateSpec.from_json(spec.to_json())

    # Assert
    assert again == spec


def test_spec_orders_layers_numerically_not_lexically() -> None:
    # Prepare: layer 10 sorts before layer 2 as a string.
    params = {f"model.layers.{i}.q.lora_A.weight": torch.zeros(1, 2) for i in (10, 2)}

    # Execute
    spec = UpdateSpec.from_parameters(params)

    # Assert
    assert spec.layer_of == (2, 10)


def test_spec_rejects_key_without_layer_and_uneven_layers() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"lm_head\.lora_A\.weight"):
        UpdateSpec.from_parameters({"lm_head.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="same token width"):
        UpdateSpec.from_parameters({"h.0.a": torch.zeros(2, 2), "h.1.a": torch.zeros(2, 3)})


def test_gpt2_spec_finds_layers_under_transformer_h() -> None:
    # Prepare
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    )

    # Execute
    spec = spec_of(attach_lora(gpt2, LoraSettings(r=R)))

    # Assert: c_attn is fused qkv, so per layer A (2, 32) + B (96, 2) = 64 + 192 = 256.
    assert spec.keys[0] == "transformer.h.0.attn.c_attn.lora_A.weight"
    assert spec.layer_of == (0, 0, 1, 1)
    assert spec.token_dim == R * HIDDEN + 3 * HIDDEN * R == 256


def test_flatten_unflatten_round_trip_is_exact(spec: UpdateSpec) -> None:
    # Prepare
    update = random_update(spec)

    # Execute
    tokens = flatten(update, spec)
    back = unflatten(tokens, spec)

    # Assert: token 1 starts with layer 1's q_proj A, flattened row-major.
    assert tokens.shape == (2, 256)
    assert torch.equal(tokens[1, : R * HIDDEN], update[Q_A].reshape(-1))
    assert list(back) == list(spec.keys)
    assert all(torch.equal(back[k], update[k]) for k in spec.keys)
    assert torch.equal(to_vector(update, spec), tokens.reshape(-1))
    assert all(torch.equal(from_vector(to_vector(update, spec), spec)[k], update[k]) for k in spec.keys)


def test_unflatten_checks_token_shape(spec: UpdateSpec) -> None:
    # Execute / Assert
    with pytest.raises(UpdateError, match=r"\(2, 255\) != expected \(2, 256\)"):
        unflatten(torch.zeros(2, 255), spec)


def test_array_record_round_trip(spec: UpdateSpec) -> None:
    # Prepare
    update = random_update(spec)

    # Execute
    record = to_array_record(update, spec)
    back = from_array_record(record, spec)

    # Assert
    assert list(record.keys()) == list(spec.keys)
    assert record[Q_A].numpy().dtype == np.float32
    assert all(torch.equal(back[k], update[k]) for k in spec.keys)


def test_safetensors_round_trip_keeps_spec_and_metadata(spec: UpdateSpec, tmp_path: Path) -> None:
    # Prepare
    update = random_update(spec)
    path = tmp_path / "update.safetensors"

    # Execute
    save_update(path, update, spec, metadata={"client": "7", "round": "3"})
    back, back_spec, metadata = load_update(path)

    # Assert
    assert back_spec == spec
    assert metadata == {"client": "7", "round": "3"}
    assert all(torch.equal(back[k], update[k]) for k in spec.keys)


def test_load_missing_file_names_the_path(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        load_update(tmp_path / "nowhere.safetensors")


def test_applying_extracted_update_to_fresh_seeded_lora_reproduces_logits() -> None:
    # Prepare: keep a copy of the base weights, attach LoRA, fine-tune 5 AdamW steps on random tokens.
    base = toy_llama()
    base_copy = copy.deepcopy(base)
    tuned = attach_lora(base, LoraSettings(r=R))
    before = lora_parameters(tuned)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    tuned.train()
    for _ in range(5):
        loss = tuned(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned.eval()
    after = lora_parameters(tuned)

    # Execute: ship only the update; the receiver rebuilds "before" from the seed.
    update = extract_update(before, after)
    fresh = attach_lora(base_copy, LoraSettings(r=R))
    apply_update(fresh, base=lora_parameters(fresh), update=update)

    # Assert: both factors moved, and the receiver's logits match the tuned model's.
    assert update[Q_A].abs().max() > 0
    assert update[Q_A.replace("lora_A", "lora_B")].abs().max() > 0
    with torch.no_grad():
        assert torch.allclose(fresh(tokens).logits, tuned(tokens).logits, atol=1e-6, rtol=0)


def test_extract_update_rejects_mismatched_keys(spec: UpdateSpec) -> None:
    # Prepare
    before = random_update(spec)
    after = {k: v for k, v in before.items() if k != Q_A}

    # Execute / Assert
    with pytest.raises(UpdateError, match=Q_A):
        extract_update(before, after)


def test_valid_update_passes_including_numpy(spec: UpdateSpec) -> None:
    # Prepare
    update = random_update(spec)
    as_numpy = {k: v.numpy() for k, v in update.items()}

    # Execute / Assert: no exception.
    validate_update(update, spec, max_norm=1e6)
    validate_update(as_numpy, spec, max_norm=1e6)


def _with(update: dict, key: str, value: object) -> dict:
    return {**update, key: value}


def _bad_cases(spec: UpdateSpec) -> dict[str, tuple[dict, str]]:
    """Each rejection case: the bad update and a regex its message must match."""
    good = random_update(spec)
    nan = good[Q_A].clone()
    nan[0, :3] = float("nan")
    inf = good[Q_A].clone()
    inf[1, 0] = float("inf")
    return {
        "missing": ({k: v for k, v in good.items() if k != Q_A}, rf"key '{Q_A}': missing"),
        "extra": (_with(good, "model.layers.1.extra", torch.zeros(1)), r"key 'model.layers.1.extra': unexpected"),
        "shape": (_with(good, Q_A, torch.zeros(2, 31)), rf"key '{Q_A}': shape \(2, 31\) != expected \(2, 32\)"),
        "int dtype": (_with(good, Q_A, torch.zeros(2, 32, dtype=torch.int64)), rf"key '{Q_A}': dtype torch.int64"),
        "complex": (
            _with(good, Q_A, torch.zeros(2, 32, dtype=torch.complex64)),
            rf"key '{Q_A}': dtype torch.complex64",
        ),
        "bool numpy": (_with(good, Q_A, np.zeros((2, 32), dtype=bool)), rf"key '{Q_A}': dtype bool"),
        "str numpy": (_with(good, Q_A, np.full((2, 32), "x")), rf"key '{Q_A}': dtype <U1"),
        "not a tensor": (_with(good, Q_A, [[0.0] * 32] * 2), rf"key '{Q_A}': expected a torch.Tensor"),
        "nan": (_with(good, Q_A, nan), rf"key '{Q_A}': not finite: 3 NaN of 64"),
        "inf": (_with(good, Q_A, inf), rf"key '{Q_A}': not finite: 1 Inf of 64"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "extra", "shape", "int dtype", "complex", "bool numpy", "str numpy", "not a tensor", "nan", "inf"],
)
def test_each_bad_update_is_rejected_naming_the_key(spec: UpdateSpec, case: str) -> None:
    # Prepare
    update, pattern = _bad_cases(spec)[case]

    # Execute / Assert
    with pytest.raises(UpdateError, match=pattern) as info:
        validate_update(update, spec)
    assert info.value.key is not None and info.value.key in str(info.value)


def test_norm_above_bound_is_rejected_naming_the_norm(spec: UpdateSpec) -> None:
    # Prepare: every one of the 512 entries is 0.5, so the L2 norm is sqrt(512 * 0.25) = sqrt(128) ~ 11.31.
    update = {k: torch.full(shape, 0.5) for k, shape in zip(spec.keys, spec.shapes, strict=True)}

    # Execute / Assert
    assert update_norm(update) == pytest.approx(128**0.5)
    validate_update(update, spec, max_norm=12.0)
    with pytest.raises(UpdateError, match=r"global L2 norm 11\.31\d* > max_norm 10") as info:
        validate_update(update, spec, max_norm=10.0)
    assert info.value.key is None


def test_source_prefixes_the_message_and_survives_pickling(spec: UpdateSpec) -> None:
    # Prepare
    update = _with(random_update(spec), Q_A, torch.zeros(2, 31))

    # Execute
    with pytest.raises(UpdateError) as info:
        validate_update(update, spec, source="client 7")
    error = pickle.loads(pickle.dumps(info.value))

    # Assert
    assert str(info.value).startswith("client 7: update rejected: key ")
    assert (error.source, error.key, str(error)) == ("client 7", Q_A, str(info.value))


def test_from_array_record_validates(spec: UpdateSpec) -> None:
    # Prepare: a record built for a one-key-short spec.
    update = random_update(spec)
    short_spec = UpdateSpec.from_parameters({k: v for k, v in update.items() if not k.startswith("model.layers.1.")})
    record = to_array_record({k: update[k] for k in short_spec.keys}, short_spec)

    # Execute / Assert
    with pytest.raises(UpdateError, match=r"client 3: .*missing"):
        from_array_record(record, spec, source="client 3")
