"""The main job on the embedded default: models, provider, and a simulated federation, end to end.

``fedgt demo``: prepare the pair -> the provider's curation + Grad-Transformer (cached) -> ``flwr run`` of the
app's embedded default (8 organizations, 3 rounds, Ray simulation) -> the results table. ``fedgt org-demo``:
one organization's private fine-tune next to the LLM fine-tuned on the same data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedgt.core.dp import DPConfig
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.models import PAIRS
from fedgt.org.private_finetune import describe_release, run_private_finetune
from fedgt.provider.pretrain import prepare_preset


def _row(name: str, before: dict, after: dict) -> str:
    em = lambda m: f"{m['exact_match']:.3f}" if "exact_match" in m else "  -  "  # noqa: E731
    return f"{name:<34} {before['loss']:>9.3f} {em(before):>8} {after['loss']:>9.3f} {em(after):>8}"


def run_org_demo(args: argparse.Namespace, lora: LoraSettings, cfg: FinetuneConfig, dp: DPConfig) -> None:
    """Prepare the default pair (cached), fine-tune one organization's TinyLM privately, compare with the LLM."""
    from fedgt.run.args import load_org_data

    tiny, llm = PAIRS[args.pair]
    t0 = time.time()
    for name in (tiny, llm):
        print(f"preparing {name} (cached after the first run) ...", flush=True)
        prepare_preset(name)
    print(f"models ready in {time.time() - t0:.0f} s\n")

    data = load_org_data(args)
    print(f"organization data: {data.name} ({len(data.train)} train / {len(data.test)} test examples, private)")
    org = run_private_finetune(tiny, data, lora, cfg, dp, out_dir=args.out / "tinylm")
    print(describe_release(org))
    print(f"saved: {org.update_path} and peft adapter {org.adapter_dir}\n")

    # The reference the provider's Grad-Transformer aims at: the LLM fine-tuned on the same data directly.
    # Only a simulation can compute it (the data never leaves the organization).
    ref = run_private_finetune(llm, data, lora, cfg, DPConfig(), out_dir=args.out / "llm")
    print(f"{'model (test split)':<34} {'base loss':>9} {'base EM':>8} {'ft loss':>9} {'ft EM':>8}")
    print(_row(f"TinyLM, organization ({dp.mode})", org.before, org.after))
    print(_row("LLM fine-tuned directly (ceiling)", ref.before, ref.after))


def run_demo(app_dir: Path, overrides: dict, out: Path, flwr_home: Path) -> int:
    """Prepare, provide, federate (each stage cached or timed), then print the results table."""
    from fedgt.core.run_config import from_run_config, pyproject_run_config
    from fedgt.provider.provision import provide, provider_config_for, resolve_model
    from fedgt.run.flwr_runner import run_federation

    overrides = {**overrides, "output.dir": str(out.resolve())}
    cfg = from_run_config({**pyproject_run_config(app_dir / "pyproject.toml"), **overrides})
    stages = {}
    t0 = time.time()
    for name in cfg.model_names():
        print(f"preparing {name} (cached after the first run) ...", flush=True)
        resolve_model(name)
    stages["models"] = time.time() - t0
    t0 = time.time()
    gt_dir = Path(cfg.gt.checkpoint) if cfg.gt.checkpoint else provide(provider_config_for(cfg))
    stages["provider (curate + train GT)"] = time.time() - t0
    print(f"Grad-Transformer: {gt_dir}", flush=True)
    t0 = time.time()
    rc = run_federation(app_dir, overrides, flwr_home)
    stages["federation (flwr run)"] = time.time() - t0
    results = out / "results.md"
    if rc != 0 or not results.is_file():
        print(f"fedgt demo: the federation failed (flwr exit code {rc}); see the log above", flush=True)
        return rc or 1
    print("\n" + results.read_text())
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    print(f"the run on one page: {out / 'report.html'} (open it in a browser)")
    return 0
