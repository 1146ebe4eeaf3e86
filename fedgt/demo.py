"""The main job on the embedded default: prepare the model pair, run one organization end to end."""

from __future__ import annotations

import argparse
import time

from fedgt.finetune import FinetuneConfig
from fedgt.lora import LoraSettings
from fedgt.models import PAIRS
from fedgt.organization import describe_release, run_private_finetune
from fedgt.pretrain import prepare_preset
from fedgt.privacy import DPConfig


def _row(name: str, before: dict, after: dict) -> str:
    em = lambda m: f"{m['exact_match']:.3f}" if "exact_match" in m else "  -  "  # noqa: E731
    return f"{name:<34} {before['loss']:>9.3f} {em(before):>8} {after['loss']:>9.3f} {em(after):>8}"


def run_demo(args: argparse.Namespace, lora: LoraSettings, cfg: FinetuneConfig, dp: DPConfig) -> None:
    """Prepare the default pair (cached), fine-tune one organization's TinyLM privately, compare with the LLM."""
    from fedgt.cli import load_org_data

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
