"""Tokenizer, model presets, pretraining cache and loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fedgt.core.mixture import PretrainData
from fedgt.core.models import PAIRS, PRESETS, build_model, count_parameters, get_preset, load_model
from fedgt.core.splits import make_domain_splits
from fedgt.core.tasks import generate
from fedgt.core.tokenizer import train_char_tokenizer
from fedgt.core.world import make_world
from fedgt.provider.pretrain import length_bucketed_batches, prepare_preset, pretraining_corpus


def test_char_tokenizer_round_trips_and_reloads(tmp_path) -> None:
    tok = train_char_tokenizer(["héllo"] * 10)
    text = "Q: reverse Varno?\nA: = onraV\n é"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) - 2 - 3 and tok.decode(ids) == text  # "Q: " and "\nA: " are one token each
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids


def test_rare_characters_are_unknown() -> None:
    tok = train_char_tokenizer(["ü"] * 2, min_count=5)
    assert tok("ü", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_default_llm_has_over_10x_the_tinylm_non_embedding_parameters() -> None:
    tiny_name, llm_name = PAIRS["default"]
    tiny = count_parameters(build_model(get_preset(tiny_name), 100))
    llm = count_parameters(build_model(get_preset(llm_name), 100))
    assert llm["non_embedding"] >= 10 * tiny["non_embedding"]
    # Same pretraining data for both: the gap comes from capacity, not from more data.
    assert PRESETS[llm_name].pretrain_steps * PRESETS[llm_name].pretrain_batch == (
        PRESETS[tiny_name].pretrain_steps * PRESETS[tiny_name].pretrain_batch)


def test_build_model_is_deterministic_for_a_seed() -> None:
    a, b, c = (build_model(get_preset("toy"), 50, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="toy"):
        get_preset("gpt-5")


def test_prepare_caches_and_loads(toy_pair) -> None:
    tiny_dir, _ = toy_pair
    assert prepare_preset("toy", progress=False) == tiny_dir  # cached: same directory, no retraining
    model, tok = load_model("toy")
    assert model.config.hidden_size == PRESETS["toy"].hidden_size
    assert tok.decode(tok("abc", add_special_tokens=False).input_ids) == "abc"


def test_prepare_is_deterministic_for_a_seed(tmp_path, monkeypatch) -> None:
    states = []
    for sub in ("a", "b"):
        monkeypatch.setenv("FEDGT_CACHE", str(tmp_path / sub))
        model, _ = load_model(prepare_preset("toy", progress=False))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_loading_errors_say_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDGT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="fedgt prepare"):
        load_model("llm")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model(tmp_path / "model.gguf")


def test_pretraining_corpus_never_contains_private_questions() -> None:
    cfg = PretrainData()
    corpus = {ex.text for ex in pretraining_corpus(cfg, 3000, seed=0) if ex.is_task}
    world, splits = make_world(cfg.num_people, seed=cfg.world_seed), make_domain_splits(cfg.splits_seed)
    private = {ex.text for d in splits.pretrain + splits.shadow + splits.private_only[::7]
               for split in ("train", "test") for ex in generate(world, d, split, 8)}
    assert corpus and not corpus & private


def test_length_bucketed_batches_cover_every_row_once() -> None:
    lengths = torch.randint(5, 90, (1000,))
    batches = length_bucketed_batches(lengths, 32, seed=0, window=4)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches) / len(batches)
    assert spread < 40  # sorted within windows: far less spread than random batches (~80)
