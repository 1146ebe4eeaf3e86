"""The shipped default pair and GT (artifacts/): current with their recipes, intact, consistent, and installable."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from fedgt.core.identity import model_identity
from fedgt.core.mixture import PretrainData
from fedgt.core.models import PAIRS, get_preset, prepared_dir
from fedgt.core.run_config import from_run_config, pyproject_run_config
from fedgt.provider.provision import provider_config_for
from fedgt.provider.shipped import ARTIFACTS, DamagedArtifact, install, install_all, read_manifest, ship, verify

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = read_manifest()["artifacts"]
pytestmark = pytest.mark.skipif(not SHIPPED, reason="no artifacts shipped in this checkout")


def _default_cfg():
    return from_run_config(pyproject_run_config(ROOT / "pyproject.toml"))


def test_the_shipped_models_are_the_default_pairs_current_recipe() -> None:
    # A changed preset, pretraining data or seed changes the fingerprint: rebuild with `fedgt prepare --rebuild`.
    want = {f"models/{prepared_dir(get_preset(n), asdict(PretrainData()), 0).name}" for n in PAIRS["default"]}
    assert want == {k for k in SHIPPED if k.startswith("models/")}


def test_the_shipped_gt_is_the_default_providers_and_was_trained_on_the_shipped_models() -> None:
    pcfg = provider_config_for(_default_cfg())
    key = f"provider/{pcfg.key()}/gt"
    assert key in SHIPPED, "the default provider's settings changed: run `fedgt provide --rebuild`"
    meta = json.loads((ARTIFACTS / key / "provider.json").read_text())
    tiny_dir = ARTIFACTS / f"models/{prepared_dir(get_preset('tinylm'), asdict(PretrainData()), 0).name}"
    ours = model_identity(tiny_dir, pcfg.lora)
    published = meta["models"]["tiny"]["identity"]
    assert {k: published[k] for k in ("weights", "tokenizer")} == {k: ours[k] for k in ("weights", "tokenizer")}
    assert (ARTIFACTS / key / "prompt_pool.json").is_file()


def test_every_shipped_file_matches_its_sha256_and_all_fit_in_25_mb() -> None:
    for key in SHIPPED:
        verify(key)
    size = sum(p.stat().st_size for p in ARTIFACTS.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"artifacts/ holds {size / 2**20:.1f} MiB"


def test_install_copies_a_verified_artifact_and_names_a_damaged_file(tmp_path) -> None:
    src = tmp_path / "built"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "train_state.pt").write_bytes(b"not shipped")
    root = tmp_path / "artifacts"
    entry = ship(src, "models/toy-0123456789ab", "fedgt prepare --rebuild", {"preset": "toy"}, root=root)
    assert list(entry["files"]) == ["model.safetensors"]
    assert install("models/toy-0123456789ab", tmp_path / "cache" / "toy", root=root)
    assert (tmp_path / "cache" / "toy" / "model.safetensors").read_bytes() == b"weights"
    assert not install("models/other-0123456789ab", tmp_path / "cache" / "other", root=root)
    (root / "models/toy-0123456789ab/model.safetensors").write_bytes(b"tampered")
    with pytest.raises(DamagedArtifact, match="model.safetensors: sha256 differs"):
        install("models/toy-0123456789ab", tmp_path / "cache" / "toy2", root=root)
    assert not (tmp_path / "cache" / "toy2").exists()  # nothing half-copied


def test_a_fresh_cache_gets_the_shipped_pair_without_pretraining(tmp_path, monkeypatch) -> None:
    from fedgt.provider.pretrain import prepare_preset

    monkeypatch.setenv("FEDGT_CACHE", str(tmp_path))
    monkeypatch.setattr("fedgt.provider.pretrain.pretrain", lambda *a, **k: pytest.fail("pretrained"))
    out = prepare_preset("tinylm", progress=False)
    assert out.parent == tmp_path / "models" and (out / "fedgt_prepared.json").is_file()


def test_install_all_fills_a_cache_once(tmp_path) -> None:
    src = tmp_path / "built"
    src.mkdir()
    (src / "fedgt_prepared.json").write_text("{}")
    root = tmp_path / "artifacts"
    ship(src, "models/toy-0123456789ab", "fedgt prepare --rebuild", {}, root=root)
    assert install_all(tmp_path / "cache", root) == ["models/toy-0123456789ab"]
    assert (tmp_path / "cache/models/toy-0123456789ab/fedgt_prepared.json").is_file()
    assert install_all(tmp_path / "cache", root) == []  # already there
