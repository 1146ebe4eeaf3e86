"""Any family: a GPT-2 TinyLM and a Llama LLM with different tokenizers, from the provider to a peft adapter.

Both models are random and tiny, saved as ordinary Hugging Face directories: the TinyLM with a byte-level BPE
tokenizer trained here (no pad token, like GPT-2's own), the LLM with the project's character tokenizer. The real
pipeline runs on them: the provider curates and trains the GT (``provide``), the federation runs through ``flwr
run``, and the final LLM adapter loads onto the Llama base with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedgt.core.models import load_model
from fedgt.core.run_config import from_run_config, pyproject_run_config
from fedgt.core.tokenizer import train_char_tokenizer
from fedgt.provider.provision import provide, provider_config_for
from fedgt.provider.public_data import task_shadow_domains
from fedgt.provider.shadow import load_pairs
from fedgt.run.flwr_runner import _superlink_pids, run_federation

ROOT = Path(__file__).resolve().parents[1]
END = "<|endoftext|>"


def bpe_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained in memory; its one special token is bos, eos and unk, and no pad."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=END, eos_token=END, unk_token=END)


def save_gpt2_tiny(path: Path, texts: list[str]) -> Path:
    """A random 2-layer GPT-2 (Conv1D c_attn) with its own BPE tokenizer, saved as a model directory."""
    tok = bpe_tokenizer(texts)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_llama_llm(path: Path) -> Path:
    """A random 2-layer Llama (q_proj / v_proj) with the character tokenizer, saved as a model directory."""
    tok = train_char_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=2, intermediate_size=48,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(GPT-2 TinyLM dir, Llama LLM dir), random weights, different tokenizers."""
    root = tmp_path_factory.mktemp("cross_pair")
    texts = [ex.context + ex.target for d in task_shadow_domains(16, limit=8) for ex in d.train]
    return save_gpt2_tiny(root / "gpt2-tiny", texts), save_llama_llm(root / "llama-llm")


def test_the_two_models_really_differ_in_family_and_tokenizer(cross_pair) -> None:
    (tiny, tiny_tok), (llm, llm_tok) = load_model(cross_pair[0]), load_model(cross_pair[1])
    assert type(tiny).__name__ == "GPT2LMHeadModel" and type(llm).__name__ == "LlamaForCausalLM"
    assert tiny_tok.pad_token_id is None and llm_tok.pad_token_id is not None
    text = "Q: Kafek?\nA: 12"
    assert tiny_tok(text).input_ids != llm_tok(text).input_ids
    assert tiny_tok.decode(tiny_tok(text).input_ids) == text and llm_tok.decode(llm_tok(text).input_ids) == text


def test_gpt2_tinylm_updates_a_llama_llm_through_provider_and_federation(cross_pair, fedgt_cache, tmp_path) -> None:
    # Prepare: the federation's run config names the two model directories; the provider trains for it.
    tiny_dir, llm_dir = (str(p) for p in cross_pair)
    out = tmp_path / "run"
    overrides = {"num-server-rounds": 2, "federation.num-organizations": 2, "model.tiny": tiny_dir,
                 "model.llm": llm_dir, "train.steps": 4, "train.batch-size": 4, "train.lr": 0.01,
                 "train.max-length": 48, "data.n-train": 16, "data.n-test": 8, "eval.ceiling": False,
                 "eval.test-examples": 8, "eval.public-examples": 8, "distill.prompts-per-teacher": 8,
                 "distill.steps": 4, "distill.batch-size": 8, "output.dir": str(out),
                 "strategy.out-of-coverage": "apply"}  # the pipeline under test, not the guard: keep every update
    cfg = from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), **overrides})
    # A small provider: 6 shadow domains, 2 GT epochs, 4 probe prompts (probe features run the GPT-2 TinyLM under
    # grouped LoRA on its Conv1D c_attn).
    provider = replace(provider_config_for(cfg), shadow_domains=6, n_examples=16, probes=4, epochs=2,
                       same_val_domains=2, d_model=32, workers=1)

    # Execute: curate + train the GT, then two federated rounds with the GT at gt.checkpoint.
    gt_dir = provide(provider, progress=False)
    rc = run_federation(ROOT, {**overrides, "gt.checkpoint": str(gt_dir)}, tmp_path / "flwr-home", timeout=300)

    # Assert: the curated pairs map GPT-2's fused c_attn (Conv1D) to Llama's q_proj / v_proj.
    pairs = load_pairs(gt_dir.parent / "shadow")
    assert {k.split(".")[-3] for k in pairs.tiny_spec.keys} == {"c_attn"}
    assert {k.split(".")[-3] for k in pairs.llm_spec.keys} == {"q_proj", "v_proj"}
    assert len(pairs.names) == 6 and pairs.tiny.abs().sum() > 0 and pairs.llm.abs().sum() > 0
    meta = json.loads((gt_dir / "provider.json").read_text())
    assert meta["models"]["tiny"]["name"] == "gpt2-tiny" and meta["models"]["tiny"]["identity"]["weights"]
    # Both rounds ran with both organizations (the sites checked their GPT-2 against the published identity).
    assert rc == 0 and _superlink_pids(tmp_path / "flwr-home") == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["log"]["accepted"]) == 2 and not r["log"]["rejected"] for r in rows[1:])
    # The final LLM is a standard peft adapter on the untouched Llama base, with its own tokenizer.
    base, tok = load_model(llm_dir)
    ids = torch.tensor([[tok.bos_token_id] + tok("Q: Kafek?", add_special_tokens=False).input_ids])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(out / "llm_adapter"))
    assert set(tuned.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    after = tuned(input_ids=ids).logits
    assert after.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(after).all()
    assert not torch.allclose(after, before)
