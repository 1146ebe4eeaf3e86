"""The `fedgt` command line on the toy pair: fine-tune, save, reload the adapter, evaluate, and fail clearly."""

from __future__ import annotations

import json

import torch
from peft import PeftModel

from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters
from fedgt.core.models import load_model
from fedgt.core.updates import apply_update, load_update
from fedgt.run.cli import main

DOMAIN = "string/reverse/pet/t0/f1"


def test_finetune_saves_an_update_and_a_peft_adapter_that_agree(toy_pair, tmp_path, capsys) -> None:
    out = tmp_path / "org"
    assert main(["finetune", "--model", "toy", "--domain", DOMAIN, "--steps", "3", "--n-train", "16",
                 "--n-test", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "released update" in printed and "bytes" in printed and "privacy: none" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["loss"] != report["before"]["loss"]

    base, tok = load_model("toy")
    adapter_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    update, spec, meta = load_update(out / "update.safetensors")
    assert meta["data"] == DOMAIN and spec.num_layers == 2
    rebuilt = attach_lora(load_model("toy")[0], LoraSettings())
    apply_update(rebuilt, lora_parameters(rebuilt), update)
    ids = torch.tensor([[1] + tok("Q: Kafek?", add_special_tokens=False).input_ids])
    torch.testing.assert_close(rebuilt(input_ids=ids).logits, adapter_model(input_ids=ids).logits, atol=1e-5, rtol=0)

    assert main(["evaluate", "--model", "toy", "--adapter", str(out / "adapter"), "--domain", DOMAIN,
                 "--n-test", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == report["after"]["loss"]


def test_dp_sgd_from_the_command_line_reports_epsilon(toy_pair, tmp_path, capsys) -> None:
    assert main(["finetune", "--model", "toy", "--domain", DOMAIN, "--steps", "3", "--n-train", "32",
                 "--dp-mode", "dp-sgd", "--epsilon", "8", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "privacy: dp-sgd" in printed and "dp-epsilon" in printed


def test_bad_input_gives_a_clear_error_and_exit_code_2(toy_pair, tmp_path, capsys) -> None:
    assert main(["finetune", "--model", "toy", "--domain", "nope/x/-/t0/f0", "--out", str(tmp_path)]) == 2
    assert "unknown task domain" in capsys.readouterr().err
    assert main(["finetune", "--model", "toy", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["finetune", "--model", "toy", "--domain", DOMAIN, "--dp-mode", "dp-sgd", "--epsilon", "8",
                 "--noise-multiplier", "1", "--out", str(tmp_path)]) == 2
    assert "dp.epsilon or dp.noise_multiplier" in capsys.readouterr().err
    assert main(["finetune", "--model", "toy", "--domain", DOMAIN, "--dp-mode", "update", "--epsilon", "0",
                 "--out", str(tmp_path)]) == 2
    assert "dp.epsilon must be > 0" in capsys.readouterr().err


def test_user_folder_data_from_the_command_line(toy_pair, tmp_path, capsys) -> None:
    folder = tmp_path / "acme"
    folder.mkdir()
    rows = [json.dumps({"prompt": f"code {i}?", "answer": str(i % 3)}) for i in range(20)]
    (folder / "qa.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["finetune", "--model", "toy", "--data", str(folder), "--steps", "2", "--out",
                 str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["data"] == "acme"


def test_demo_runs_end_to_end_on_the_toy_pair(toy_pair, tmp_path, capsys) -> None:
    assert main(["org-demo", "--pair", "toy", "--steps", "3", "--n-train", "16", "--n-test", "16", "--out",
                 str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "released update" in printed and "LLM fine-tuned directly" in printed
    assert (tmp_path / "tinylm" / "update.safetensors").is_file() and (tmp_path / "llm" / "adapter").is_dir()


def test_curate_then_train_gt_from_the_command_line(toy_pair, tmp_path, capsys) -> None:
    pairs, gt = tmp_path / "pairs", tmp_path / "gt"
    assert main(["curate", "--tiny", "toy", "--llm", "toy-large", "--domains", "4", "--steps", "4",
                 "--snapshots", "3,4", "--batch-size", "4", "--n-examples", "16", "--workers", "1",
                 "--out", str(pairs)]) == 0
    assert "4 domains, 8 pairs" in capsys.readouterr().out
    assert main(["train-gt", "--pairs", str(pairs), "--out", str(gt), "--epochs", "2", "--d-model", "32",
                 "--layers", "1", "--gt-batch-size", "4"]) == 0
    assert "best epoch" in capsys.readouterr().out
    gt_cfg = json.loads((gt / "config.json").read_text())["gt"]
    assert gt_cfg["tgt_tokens"] == 3  # toy-large has 3 layers
    from fedgt.server.translator import Translator  # what the federation's server loads as gt.checkpoint

    translator = Translator(gt, "cpu")
    assert translator(torch.zeros(2, *translator.src_shape)).shape == (2, 3, gt_cfg["tgt_dim"])
    # A second run resumes: nothing left to train, same checkpoint.
    before = (gt / "model.safetensors").read_bytes()
    assert main(["train-gt", "--pairs", str(pairs), "--out", str(gt), "--epochs", "2", "--d-model", "32",
                 "--layers", "1", "--gt-batch-size", "4"]) == 0
    assert (gt / "model.safetensors").read_bytes() == before
    assert main(["train-gt", "--pairs", str(tmp_path / "none"), "--out", str(gt)]) == 2
    assert "fedgt curate" in capsys.readouterr().err


def test_federate_refuses_a_bad_run_config_before_starting_anything(tmp_path, capsys) -> None:
    assert main(["federate", "--set", "strategy.aggregator=krum", "--out", str(tmp_path / "run"),
                 "--flwr-home", str(tmp_path / "home")]) == 2
    assert "strategy.aggregator" in capsys.readouterr().err
    assert main(["federate", "--scenario", str(tmp_path / "missing.toml")]) == 2
    assert not (tmp_path / "home").exists()
