"""The server's shared-model state: folding rounds into the base, and saving as a standard peft adapter."""

from __future__ import annotations

import torch
from peft import PeftModel

from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters, merge_into_base, set_lora_parameters
from fedgt.core.models import load_model
from fedgt.core.updates import spec_of
from fedgt.server.global_adapter import GlobalAdapter


def _random_update(spec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in zip(spec.keys, spec.shapes, strict=True)}


def test_saved_adapter_of_merged_rounds_loads_with_peft_and_equals_the_server_model(toy_pair, tmp_path) -> None:
    lora = LoraSettings()
    llm = str(toy_pair[1])
    model = attach_lora(load_model(llm)[0], lora)
    spec, init = spec_of(model), lora_parameters(model)
    state = GlobalAdapter(spec, init, lora, scheme="merge")
    for seed in (1, 2):
        state.add(_random_update(spec, seed))
        state.end_round()
    state.add(_random_update(spec, 3))  # the current, not yet folded, round

    # What the server evaluates: base weights with the folded rounds, plus the current LoRA factors.
    for piece in state.merged:
        merge_into_base(model, piece, lora.scaling)
    set_lora_parameters(model, state.current)
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    expected = model(input_ids=ids).logits

    out = state.save_peft(llm, tmp_path / "adapter", merged_copy=True)
    base = load_model(llm)[0]
    untouched = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, str(out))
    assert loaded.peft_config["default"].r == lora.r * 3
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(untouched, expected, atol=1e-3)
    merged = load_model(str(out / "merged"))[0]
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_state_round_trips() -> None:
    from fedgt.core.updates import UpdateSpec

    spec = UpdateSpec.from_parameters({"model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 3),
                                       "model.layers.0.q_proj.lora_B.weight": torch.zeros(3, 2)})
    init = {k: torch.ones(s) for k, s in zip(spec.keys, spec.shapes, strict=True)}
    a = GlobalAdapter(spec, init, LoraSettings(), "merge")
    a.add({k: torch.full(s, 2.0) for k, s in zip(spec.keys, spec.shapes, strict=True)})
    a.end_round()
    b = GlobalAdapter(spec, init, LoraSettings(), "merge")
    b.load_state_dict(a.state_dict())
    assert len(b.merged) == 1 and torch.equal(b.merged[0][spec.keys[0]], torch.full((2, 3), 3.0))


def test_dense_changes_save_as_an_exact_peft_adapter(toy_pair, tmp_path) -> None:
    from fedgt.server.global_adapter import dense_as_lora, dense_change, save_dense_peft

    lora = LoraSettings()
    llm = str(toy_pair[1])
    model = attach_lora(load_model(llm)[0], lora)
    spec, init = spec_of(model), lora_parameters(model)
    pieces = [{k: init[k] + v for k, v in _random_update(spec, s).items()} for s in (1, 2)]
    change = {m: 0.3 * a + 0.7 * b for (m, a), b in zip(dense_change(pieces[0], spec, lora.scaling).items(),
                                                          dense_change(pieces[1], spec, lora.scaling).values(),
                                                          strict=True)}
    factors, rank = dense_as_lora(change)
    assert rank <= 2 * lora.r  # a mean of two rank-2 changes
    for m, w in change.items():
        torch.testing.assert_close(factors[m + ".lora_B.weight"] @ factors[m + ".lora_A.weight"], w, atol=1e-5,
                                   rtol=0)
    out = save_dense_peft(change, llm, lora, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    reference = load_model(llm)[0]
    with torch.no_grad():
        for m, w in change.items():
            reference.get_submodule(m).weight += w
    loaded = PeftModel.from_pretrained(load_model(llm)[0], str(out))
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_a_dense_change_of_a_gpt2_llm_saves_as_a_peft_adapter(tmp_path) -> None:
    # GPT-2's Conv1D stores (in, out) while a dense change is (out, in), as B @ A: the adapter must apply it right.
    from fedgt.server.global_adapter import save_dense_peft
    from tests.test_cross_family import save_gpt2_tiny

    llm = save_gpt2_tiny(tmp_path / "gpt2", ["the quick brown fox jumps over the lazy dog"] * 4)
    lora = LoraSettings(target_modules=("c_attn",))
    g = torch.Generator().manual_seed(0)
    change = {f"transformer.h.{i}.attn.c_attn": 0.05 * torch.randn(48, 16, generator=g) for i in range(2)}  # (out, in)
    out = save_dense_peft(change, str(llm), lora, tmp_path / "adapter")
    reference = load_model(str(llm))[0]
    with torch.no_grad():
        for m, w in change.items():
            reference.get_submodule(m).weight += w.T  # Conv1D weight is (in, out)
    loaded = PeftModel.from_pretrained(load_model(str(llm))[0], str(out))
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0)
