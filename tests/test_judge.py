"""The LLM judge's dense weight changes: set on the base weights in the layer's own layout, reset from the base."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from fedgt.core.dense import dense_shapes
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.tokenizer import train_char_tokenizer

IDS = torch.tensor([[1, 5, 9, 14, 20, 3]])


def _save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    train_char_tokenizer().save_pretrained(path)
    return str(path)


def gpt2_dir(path) -> str:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=120, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2)
    return _save(GPT2LMHeadModel(config), path)


def llama_dir(path) -> str:
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2,
                                              intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                                              max_position_embeddings=16)), path)


@pytest.mark.parametrize("build", [llama_dir, gpt2_dir], ids=["llama-linear", "gpt2-conv1d"])
def test_set_dense_equals_adding_the_change_to_each_weight_and_resets(build, tmp_path) -> None:
    # Prepare: a dense (out, in) change per LoRA module, as fedgt.core.dense writes them.
    judge = LLMJudge(build(tmp_path / "m"), LoraSettings())
    g = torch.Generator().manual_seed(0)
    change = {m: 0.5 * torch.randn(shape, generator=g) for m, shape in dense_shapes(judge.spec).items()}
    reference = LLMJudge(str(tmp_path / "m"), LoraSettings())
    with torch.no_grad():
        for m, delta in change.items():
            layer = reference.model.get_submodule("base_model.model." + m).base_layer
            # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out).
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta
        want = reference.model(input_ids=IDS).logits
        base = judge.model(input_ids=IDS).logits

    # Execute
    judge.set_dense(change)
    with torch.no_grad():
        got = judge.model(input_ids=IDS).logits
    judge.set_dense({})
    with torch.no_grad():
        reset = judge.model(input_ids=IDS).logits

    # Assert
    assert not torch.allclose(got, base, atol=1e-4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(reset, base)
