"""Shadow curation on the toy pair: pairs per snapshot, storage, resume without recomputation."""

from __future__ import annotations

import json

import pytest
import torch

from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.tasks import generate, parse_domain
from fedgt.core.world import make_world
from fedgt.provider.shadow import CurationConfig, curate, load_pairs, read_manifest

WORLD = make_world(40, seed=0)
NAMES = ["lookup/city/-/t0/f0", "string/upper/pet/t1/f2", "arith/last_digit/age/t0/f1", "lookup/pet/-/t2/f3"]


def _domains(names):
    return [(n, generate(WORLD, parse_domain(n), "public", 16)) for n in names]


def _cfg(toy_pair) -> CurationConfig:
    tiny, llm = toy_pair
    return CurationConfig(tiny_model=str(tiny), llm_model=str(llm), lora=LoraSettings(freeze_a=True),
                          finetune=FinetuneConfig(steps=4, batch_size=4, snapshot_steps=(3, 4)), n_examples=16)


def test_curate_stores_step_matched_pairs_and_resumes(toy_pair, tmp_path) -> None:
    cfg = _cfg(toy_pair)
    first = curate(_domains(NAMES[:2]), cfg, tmp_path, workers=1, shard_domains=1, progress=False)
    assert sorted(n for s in first["shards"] for n in s["domains"]) == sorted(NAMES[:2])
    assert len(first["shards"]) == 2  # one domain per shard here
    shard_files = sorted(p.name for p in tmp_path.glob("shard-*"))
    # Running again over more domains only computes the new ones: stored shards stay byte-identical.
    before = {f: (tmp_path / f).read_bytes() for f in shard_files}
    curate(_domains(NAMES), cfg, tmp_path, workers=2, shard_domains=8, progress=False)
    assert all((tmp_path / f).read_bytes() == b for f, b in before.items())
    pairs = load_pairs(tmp_path)
    assert sorted(pairs.names) == sorted(NAMES) and len(set(pairs.names)) == 4
    assert pairs.tiny.shape == (8, pairs.tiny_spec.num_layers, pairs.tiny_spec.token_dim)
    assert pairs.llm.shape == (8, pairs.llm_spec.num_layers, pairs.llm_spec.token_dim)
    assert sorted(pairs.step.tolist()) == [3] * 4 + [4] * 4
    assert pairs.final().tiny.shape[0] == 4
    # LoRA-FA: the updates are B only, and B moved away from zero.
    assert all(k.endswith("lora_B.weight") for k in pairs.llm_spec.keys)
    assert pairs.llm.abs().sum() > 0 and pairs.tiny.abs().sum() > 0
    # Same domain + same config in a fresh folder gives the same pairs (deterministic curation).
    again = curate(_domains(NAMES[:1]), cfg, tmp_path / "again", workers=1, progress=False)
    redo = load_pairs(tmp_path / "again")
    row = pairs.names.index(NAMES[0])
    torch.testing.assert_close(redo.llm, pairs.llm[pairs.domain == row])
    assert again["cpu_seconds"] > 0


def test_resume_with_another_config_is_refused(toy_pair, tmp_path) -> None:
    cfg = _cfg(toy_pair)
    curate(_domains(NAMES[:1]), cfg, tmp_path, workers=1, progress=False)
    other = CurationConfig(**{**cfg.__dict__, "n_examples": 8})
    with pytest.raises(ValueError, match="another config"):
        curate(_domains(NAMES[:1]), other, tmp_path, workers=1, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text()) == read_manifest(tmp_path)


def test_load_pairs_without_curation_says_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="fedgt curate"):
        load_pairs(tmp_path)


def test_dp_recuration_reuses_the_llm_side(toy_pair, tmp_path) -> None:
    from fedgt.core.dp import DPConfig

    cfg = _cfg(toy_pair)
    curate(_domains(NAMES[:2]), cfg, tmp_path / "plain", workers=1, progress=False)
    plain = load_pairs(tmp_path / "plain")
    dp_cfg = CurationConfig(**{**cfg.__dict__, "tiny_dp": DPConfig(mode="dp-sgd", epsilon=8.0)})
    manifest = curate(_domains(NAMES[:2]), dp_cfg, tmp_path / "dp", workers=1, progress=False, reuse_llm=plain)
    dp = load_pairs(tmp_path / "dp")
    for name in NAMES[:2]:
        a, b = plain.domain == plain.names.index(name), dp.domain == dp.names.index(name)
        torch.testing.assert_close(dp.llm[b], plain.llm[a])  # the LLM side is reused as is
        assert not torch.allclose(dp.tiny[b], plain.tiny[a])  # the TinyLM side was trained under DP-SGD
    assert all("dp-epsilon" in m for m in manifest["metrics"].values())
    other = CurationConfig(**{**dp_cfg.__dict__, "n_examples": 8})
    with pytest.raises(ValueError, match="differs"):
        curate(_domains(NAMES[:1]), other, tmp_path / "bad", workers=1, progress=False, reuse_llm=plain)


def test_grouped_curation_equals_one_domain_at_a_time(toy_pair, tmp_path) -> None:
    cfg = _cfg(toy_pair)
    curate(_domains(NAMES), cfg, tmp_path / "grouped", workers=1, group_domains=4, progress=False)
    curate(_domains(NAMES), cfg, tmp_path / "single", workers=1, group_domains=1, progress=False)
    grouped, single = load_pairs(tmp_path / "grouped"), load_pairs(tmp_path / "single")
    assert grouped.names == single.names
    torch.testing.assert_close(grouped.tiny, single.tiny, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grouped.llm, single.llm, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="group_domains"):
        curate(_domains(NAMES[:1]), cfg, tmp_path / "bad", group_domains=0, progress=False)
