"""Damaged artifacts: every prepared model, GT folder and curation shard is verified by sha256 before use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedgt.core.manifest import MANIFEST, DamagedArtifact, read_manifest, verify_folder, write_manifest


def _damage_tail(path: Path, n: int = 64) -> None:
    """Overwrite a file's last ``n`` bytes (what a torn write or a bad sector leaves)."""
    data = bytearray(path.read_bytes())
    data[-n:] = b"\xff" * n
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def provider_gt(toy_pair) -> Path:
    from fedgt.core.finetune import FinetuneConfig
    from fedgt.provider.provision import ProviderConfig, provide

    cfg = ProviderConfig(tiny="toy", llm="toy-large", finetune=FinetuneConfig(steps=6, batch_size=4),
                         shadow_domains=6, n_examples=16, probes=4, epochs=2, same_val_domains=2, d_model=32,
                         workers=1)
    return provide(cfg, progress=False)


def test_a_manifest_names_the_damaged_missing_or_unreadable_file(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc" * 100)
    (tmp_path / "sub" / "b.json").write_text("{}")
    assert sorted(write_manifest(tmp_path)["files"]) == ["a.bin", "sub/b.json"]
    assert verify_folder(tmp_path)
    _damage_tail(tmp_path / "a.bin", 1)
    with pytest.raises(DamagedArtifact, match=r"a\.bin: sha256 .* differs"):
        verify_folder(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(DamagedArtifact, match=r"a\.bin: missing"):
        verify_folder(tmp_path)
    (tmp_path / MANIFEST).write_text('{"files": {"a.bin": ')
    with pytest.raises(DamagedArtifact, match=rf"{MANIFEST}: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    assert verify_folder(tmp_path) is False  # nothing to verify against: loaded as is, with a warning


def test_a_prepared_model_lists_its_files_and_a_damaged_one_is_named(toy_pair, tmp_path) -> None:
    from fedgt.core.models import PREPARED_META, load_model

    manifest = read_manifest(toy_pair[0])
    assert manifest is not None and {"model.safetensors", "config.json", PREPARED_META} <= set(manifest["files"])
    copy = tmp_path / "toy"
    shutil.copytree(toy_pair[0], copy)
    load_model(copy)
    _damage_tail(copy / "model.safetensors")
    with pytest.raises(DamagedArtifact, match=r"toy/model\.safetensors: sha256"):
        load_model(copy)
    (copy / MANIFEST).unlink()  # a user's own folder: no manifest, but a truncated file still names the folder
    (copy / "model.safetensors").write_bytes((toy_pair[0] / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(DamagedArtifact, match=r"toy: cannot load the model"):
        load_model(copy)
    (copy / "model.safetensors").write_bytes((toy_pair[0] / "model.safetensors").read_bytes())
    (copy / "config.json").write_text('{"model_type": ')
    with pytest.raises(DamagedArtifact, match=r"toy: cannot load the model"):
        load_model(copy)


def test_a_gt_with_its_tail_overwritten_is_refused_naming_the_file(provider_gt, tmp_path) -> None:
    from fedgt.server.translator import Translator

    assert "model.safetensors" in read_manifest(provider_gt)["files"]
    gt = tmp_path / "gt"
    shutil.copytree(provider_gt, gt)
    Translator(gt, "cpu")
    _damage_tail(gt / "model.safetensors", 256)  # 0xff bytes: NaN floats in the last tensor
    with pytest.raises(DamagedArtifact, match=r"gt/model\.safetensors: sha256"):
        Translator(gt, "cpu")
    (gt / MANIFEST).unlink()  # without a manifest the NaN weights are still caught
    with pytest.raises(DamagedArtifact, match=r"gt/model\.safetensors: holds non-finite weights"):
        Translator(gt, "cpu")
    (gt / "model.safetensors").write_bytes((provider_gt / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(DamagedArtifact, match=r"gt/model\.safetensors: cannot be read"):
        Translator(gt, "cpu")
    (gt / "model.safetensors").write_bytes((provider_gt / "model.safetensors").read_bytes())
    (gt / "provider.json").write_text("{not json")
    with pytest.raises(DamagedArtifact, match=r"gt/provider\.json: not valid JSON"):
        Translator(gt, "cpu")


def test_a_damaged_curation_shard_is_named_before_it_is_read(provider_gt, tmp_path) -> None:
    from fedgt.provider.shadow import MANIFEST as CURATION
    from fedgt.provider.shadow import load_pairs

    shadow = tmp_path / "shadow"
    shutil.copytree(provider_gt.parent / "shadow", shadow)
    shards = json.loads((shadow / CURATION).read_text())["shards"]
    assert shards and all(len(s["sha256"]) == 64 for s in shards)
    load_pairs(shadow)
    _damage_tail(shadow / shards[0]["file"])
    with pytest.raises(DamagedArtifact, match=rf"{shards[0]['file']}: sha256"):
        load_pairs(shadow)
    (shadow / CURATION).write_text('{"shards": [')
    with pytest.raises(DamagedArtifact, match=rf"shadow/{CURATION}: not valid JSON"):
        load_pairs(shadow)


def test_an_installed_artifact_is_listed_and_verified_in_the_cache(tmp_path) -> None:
    from fedgt.provider.shipped import install, ship

    src = tmp_path / "built"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\x00" * 128)
    root = tmp_path / "artifacts"
    ship(src, "models/toy-000000000000", "test", {}, root)
    dest = tmp_path / "cache" / "models" / "toy-000000000000"
    assert install("models/toy-000000000000", dest, root)
    assert sorted(read_manifest(dest)["files"]) == ["config.json", "model.safetensors"]
    _damage_tail(dest / "model.safetensors", 1)
    with pytest.raises(DamagedArtifact, match="model.safetensors"):
        verify_folder(dest)
