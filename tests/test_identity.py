"""Model identity: same files give the same digests, any change is named, the manifest and messages carry it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord
from safetensors.torch import load_file, save_file

from fedgt.core.identity import (
    IDENTITY_KEYS,
    IdentityMismatch,
    from_config,
    model_identity,
    to_config,
    verify_identity,
)
from fedgt.core.lora import LoraSettings
from fedgt.core.models import build_model, get_preset, local_model_dir
from fedgt.core.tokenizer import train_char_tokenizer

LORA = LoraSettings()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """An untrained toy-preset TinyLM saved as a HF directory (no pretraining: identity needs only the files)."""
    out = tmp_path_factory.mktemp("toy-model")
    tokenizer = train_char_tokenizer()
    build_model(get_preset("toy"), len(tokenizer), seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def copy_of(toy_dir, tmp_path):
    """A fresh copy of the toy model directory (to change one file of)."""
    return lambda name="copy": Path(shutil.copytree(toy_dir, tmp_path / name))


def mismatch(expected: dict, actual: dict) -> IdentityMismatch:
    with pytest.raises(IdentityMismatch) as info:
        verify_identity(expected, actual)
    return info.value


def test_identical_directories_have_the_same_identity(toy_dir, copy_of) -> None:
    ours, theirs = model_identity(toy_dir, LORA), model_identity(copy_of(), LORA)
    assert ours == theirs and set(ours) == set(IDENTITY_KEYS)
    assert all(len(ours[k]) == 64 and int(ours[k], 16) >= 0 for k in ("weights", "tokenizer", "lora-init"))
    assert json.loads(ours["lora"])["init_seed"] == LORA.init_seed
    verify_identity(theirs, ours)  # no exception


def test_one_changed_weight_is_named_weights(toy_dir, copy_of) -> None:
    published = model_identity(toy_dir, LORA)
    other = copy_of()
    tensors = load_file(other / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    err = mismatch(published, model_identity(other, LORA))
    assert err.fields == ("weights",)
    assert "TinyLM weights differ from the provider's manifest" in str(err) and published["weights"][:12] in str(err)


def test_a_changed_tokenizer_file_is_named_tokenizer(toy_dir, copy_of) -> None:
    published = model_identity(toy_dir, LORA)
    other = copy_of()
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    err = mismatch(published, model_identity(other, LORA))
    assert err.fields == ("tokenizer",) and "tokenizer" in str(err)


@pytest.mark.parametrize("freeze_a", [False, True])
def test_another_lora_init_seed_is_named_lora_init(toy_dir, freeze_a) -> None:
    published = model_identity(toy_dir, LoraSettings(freeze_a=freeze_a))
    ours = model_identity(toy_dir, LoraSettings(init_seed=LORA.init_seed + 1, freeze_a=freeze_a))
    err = mismatch(published, ours)
    # with freeze_a the seeded A factors do not train, but they are still the init the GT was trained from
    assert err.fields == ("lora-init", "lora") and "lora-init" in str(err) and '"init_seed":43' in str(err)


def test_a_file_changed_in_place_is_hashed_again(copy_of) -> None:
    model_dir = copy_of()
    before = model_identity(model_dir, LORA)
    path = model_dir / "tokenizer_config.json"
    path.write_text(path.read_text() + "\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # coarse clocks: mtime moves
    assert model_identity(model_dir, LORA)["tokenizer"] != before["tokenizer"]


def test_missing_fields_in_the_published_identity_are_named(toy_dir) -> None:
    ours = model_identity(toy_dir, LORA)
    err = mismatch({"weights": ours["weights"]}, ours)
    assert err.fields == ("tokenizer", "lora-init", "lora") and "has no" in str(err)


def test_identity_round_trips_through_a_flower_config(toy_dir) -> None:
    identity = model_identity(toy_dir, LORA)
    flat = to_config(identity)
    assert set(flat) == {f"tiny-id.{k}" for k in IDENTITY_KEYS}
    record = ConfigRecord({"server-round": 3, **flat})
    assert from_config(record) == identity == from_config(flat)
    assert from_config(ConfigRecord({"server-round": 3})) is None


def test_local_model_dir_finds_a_directory_and_never_pretrains(toy_dir, tmp_path, monkeypatch) -> None:
    assert local_model_dir(str(toy_dir)) == toy_dir
    monkeypatch.setenv("FEDGT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="tiny-model") as info:
        local_model_dir("toy")
    assert "fedgt prepare --models toy" in str(info.value)
    assert not (tmp_path / "cache").exists()  # nothing was prepared
    with pytest.raises(FileNotFoundError, match="tiny-model"):
        local_model_dir(str(tmp_path / "nowhere"))


def strings(value) -> list[str]:
    """Every string inside a JSON value (keys too)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_provider_json_names_models_without_machine_paths(toy_dir) -> None:
    from fedgt.provider.provision import ProviderConfig, provider_meta, published_identity

    cfg = ProviderConfig(tiny=str(toy_dir), llm="toy-large", lora=LORA)
    meta = json.loads(json.dumps(provider_meta(cfg, toy_dir, toy_dir, ["Q: a?"], ["d0"])))  # what provide() writes
    assert not [s for s in strings(meta) if os.path.isabs(s) or str(toy_dir.parent) in s]
    assert meta["tiny"] == meta["models"]["tiny"]["name"] == toy_dir.name and meta["llm"] == "toy-large"
    assert meta["provider"]["tiny"] == toy_dir.name
    assert published_identity(meta) == model_identity(toy_dir, LORA)
    assert published_identity({"tiny": "/old/abs/path", "lora": {}}) is None  # GT dirs from before manifests


def test_server_checks_its_tinylm_against_the_published_identity(toy_dir, copy_of, caplog) -> None:
    from fedgt.server.server_app import tiny_identity

    ours = model_identity(toy_dir, LORA)
    assert tiny_identity({"models": {"tiny": {"identity": ours}}}, str(toy_dir), LORA) == ours
    with caplog.at_level(logging.WARNING, logger="fedgt.server"):
        assert tiny_identity({"tiny": "toy"}, str(toy_dir), LORA) == ours  # old GT dir: own identity, warned
    assert "publishes no TinyLM identity" in caplog.text
    # Other LoRA settings than the GT's are check_provider_match's warning, not an identity error.
    other_lora = LoraSettings(init_seed=7)
    assert tiny_identity({"models": {"tiny": {"identity": ours}}}, str(toy_dir), other_lora)["lora"] != ours["lora"]
    other = copy_of()
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + " ")
    with pytest.raises(IdentityMismatch, match="not the one the Grad-Transformer was trained on") as info:
        tiny_identity({"models": {"tiny": {"identity": ours}}}, str(other), LORA)
    assert info.value.fields == ("tokenizer",)


def test_every_train_message_carries_the_identity(toy_dir, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedgt.core.updates import UpdateSpec
    from strategies.grad_transformer import GradTransformerStrategy

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):  # messages outside a Flower run
        monkeypatch.setattr(TaskIdentity, attr, value)

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    keys = ["model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B.weight"]
    init = {keys[0]: torch.ones(2, 4), keys[1]: torch.zeros(4, 2)}
    spec = UpdateSpec.from_parameters(init)
    identity = model_identity(toy_dir, LORA)
    strategy = GradTransformerStrategy(translate=lambda x: x, tiny_spec=spec, llm_spec=spec, tiny_init=init,
                                       llm_init=init, lora=LORA, tiny_identity=identity, min_available_nodes=2,
                                       aggregator="mean")
    messages = list(strategy.configure_train(1, strategy.current_arrays(), ConfigRecord({}), Grid()))
    assert len(messages) == 2
    assert all(from_config(m.content.config_records["config"]) == identity for m in messages)


def test_provide_publishes_the_identity_the_server_checks(toy_pair) -> None:
    """The whole provider pipeline on the toy pair with tiny settings (about 10 s)."""
    from fedgt.core.finetune import FinetuneConfig
    from fedgt.provider.provision import ProviderConfig, provide, published_identity
    from fedgt.server.server_app import tiny_identity
    from fedgt.server.translator import Translator

    cfg = ProviderConfig(tiny="toy", llm="toy-large", finetune=FinetuneConfig(steps=6, batch_size=4),
                         shadow_domains=6, n_examples=16, probes=4, epochs=2, same_val_domains=2, d_model=32,
                         workers=1)
    gt = provide(cfg, progress=False)
    meta = json.loads((gt / "provider.json").read_text())
    assert not [s for s in strings(meta) if os.path.isabs(s) or str(toy_pair[0].parent) in s]
    assert tiny_identity(meta, str(toy_pair[0]), cfg.lora) == published_identity(meta)
    assert Translator(gt, "cpu").tiny_judge is not None  # "toy" in provider.json resolves by name
