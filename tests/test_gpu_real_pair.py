"""The timing script: its decoders agree (KV cache = recompute), and the pipeline runs end to end on the toy pair."""

from __future__ import annotations

import json

import torch

from simulations.gpu_real_pair import DecodeDims, generate_recompute, main, random_gt, time_decoders

DIMS = DecodeDims(src_tokens=3, src_dim=16, tgt_tokens=5, tgt_dim=24)


def test_cached_decoding_equals_recomputing_the_prefix() -> None:
    model = random_gt(DIMS, "autoregressive", d_model=32, seed=1)
    src = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached, recomputed = model.generate(src), generate_recompute(model, src)
    assert cached.shape == recomputed.shape == (2, 5, 24)
    assert cached.std(dim=1).min() > 0  # the layers differ: the check is not between constant outputs
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-4)
    # Each step feeds back the previous output: perturbing layer 0's output changes the later layers.
    with torch.no_grad():
        teacher = model(src, cached)
        shifted = cached.clone()
        shifted[:, 0] += 1.0
        assert not torch.allclose(model(src, shifted)[:, 1:], teacher[:, 1:])
    torch.testing.assert_close(teacher, cached, atol=1e-5, rtol=1e-4)


def test_every_decoder_gives_the_target_shape() -> None:
    result = time_decoders(DIMS, batch=2, d_model=32, device=torch.device("cpu"), repeats=1)
    assert len(result["decoders"]) == 4
    assert all(r["shape"] == [2, 5, 24] and r["seconds"] > 0 and r["parameters"] > 0
               for r in result["decoders"].values())
    assert result["kv_vs_recompute_max_abs_diff"] < 1e-5
    assert result["recompute_over_parallel"] > 0


def test_pipeline_on_the_toy_pair_writes_the_report(toy_pair, tmp_path) -> None:
    tiny, llm = toy_pair
    out = tmp_path / "gpu"
    main(["--tiny", str(tiny), "--llm", str(llm), "--device", "cpu", "--domains", "3", "--orgs", "1", "--steps", "3",
          "--n-examples", "8", "--epochs", "1", "--probes", "2", "--anchor-k", "1", "--repeats", "1",
          "--d-model", "32", "--no-decode", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    stages = result["pipeline"]["seconds"]
    assert set(stages) == {"load models", "curation", "shadow probe features", "GT training"}
    assert all(v > 0 for v in stages.values())
    (org,) = result["pipeline"]["orgs"]
    assert org["translate"] == org["probe features"] + org["GT predict"] and org["LLM fine-tune"] > 0
    assert result["decode"] == [] and result["device"] == "cpu"
    report = out.with_suffix(".md").read_text()
    assert "CPU figures" in report and "fine-tune / translate" in report and result["command"] in report
