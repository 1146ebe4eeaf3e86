"""The provider's derived TinyLM: layers kept, the cut model distilled toward its teacher, saved as a prepared model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedgt.core.batching import encode
from fedgt.core.models import PREPARED_META, load_model
from fedgt.core.tokenizer import train_char_tokenizer
from fedgt.provider.derive import DeriveConfig, derive_tiny, distillation_text, drop_layers, kept_layers


def save_teacher(path: Path, layers: int = 5) -> Path:
    """A random 5-layer Llama with the character tokenizer, saved as a model directory."""
    tok = train_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_kept_layers_spread_evenly_and_keep_both_ends() -> None:
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert kept_layers(5, 2) == [0, 4]
    assert kept_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep_layers"):
        kept_layers(4, 1)
    with pytest.raises(ValueError, match="keep_layers"):
        kept_layers(4, 5)


def test_drop_layers_copies_the_kept_layers_and_leaves_the_teacher_whole(tmp_path: Path) -> None:
    teacher, _ = load_model(save_teacher(tmp_path / "teacher"))
    small = drop_layers(teacher, [0, 4])
    assert len(teacher.model.layers) == 5 and small.config.num_hidden_layers == 2
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, teacher.model.layers[4].mlp.up_proj.weight)
    assert small.model.layers[1].mlp.up_proj.weight.data_ptr() != teacher.model.layers[4].mlp.up_proj.weight.data_ptr()
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    ids = torch.tensor([[1, 5, 6, 7]])
    assert small.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)  # the KV cache sees 2 layers


def test_distillation_text_never_holds_the_held_out_reference_topics() -> None:
    from fedgt.core.python_text import reference_topic_domains

    distilled = {ex.text for ex in distillation_text()}
    held_out = {ex.text for d in reference_topic_domains() for ex in d.train + d.test}
    assert len(distilled) > 1000 and len(held_out) > 1000
    assert not distilled & held_out


def test_derive_tiny_brings_the_cut_model_closer_to_its_teacher(tmp_path: Path) -> None:
    teacher_dir = save_teacher(tmp_path / "teacher")
    cfg = DeriveConfig(keep_layers=2, steps=30, batch=8, max_length=48, lr=3e-3)
    out = derive_tiny(teacher_dir, cfg, tmp_path / "tiny", progress=False)
    meta = json.loads((out / PREPARED_META).read_text())
    assert meta["kept_layers"] == [0, 4] and meta["derive"]["steps"] == 30
    assert meta["final_loss"] < 0.7 * meta["initial_loss"]
    student, tok = load_model(out)
    teacher, _ = load_model(teacher_dir)
    assert student.config.num_hidden_layers == 2 and len(tok) == len(teacher.get_input_embeddings().weight)
    batch = encode(tok, distillation_text(seed=1)[:16], 48)

    def kl(model) -> float:
        with torch.no_grad():
            p = torch.log_softmax(teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
            q = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
        return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))

    assert kl(student) < 0.7 * kl(drop_layers(teacher, [0, 4]))
