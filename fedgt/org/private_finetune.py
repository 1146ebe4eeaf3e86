"""What one organization does with its private data: fine-tune LoRA privately and release only the update."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fedgt.core.data import DomainData
from fedgt.core.dp import DPConfig
from fedgt.core.evaluate import evaluate_split
from fedgt.core.finetune import FinetuneConfig, FinetuneResult, finetune
from fedgt.core.lora import LoraSettings, attach_lora
from fedgt.core.models import load_model
from fedgt.core.noise import NoiseSource, SecretNoise
from fedgt.core.updates import UpdateSpec, save_update, spec_of, update_norm


@dataclass
class OrgReport:
    """The outcome of one private fine-tune: the released update, its spec, and before/after metrics."""

    model: str
    data: str
    spec: UpdateSpec
    result: FinetuneResult
    dp: DPConfig
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    update_path: Path | None = None
    adapter_dir: Path | None = None

    def summary(self) -> dict:
        """JSON-ready metrics (no tensors)."""
        return {"model": self.model, "data": self.data, "before": self.before, "after": self.after,
                "train": self.result.metrics, "dp": asdict(self.dp), "update_norm": update_norm(self.result.update),
                "update_path": str(self.update_path) if self.update_path else None,
                "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None}


def describe_release(report: OrgReport) -> str:
    """Exactly what leaves the organization: keys, shapes, bytes and the DP parameters."""
    spec = report.spec
    lines = [f"released update: {len(spec.keys)} tensors, {spec.num_params:,} float32 values "
             f"({4 * spec.num_params:,} bytes), {spec.num_layers} layer tokens x {spec.token_dim}"]
    lines += [f"  {k} {tuple(s)}" for k, s in zip(spec.keys, spec.shapes, strict=False)]
    dp = report.dp
    if dp.mode == "none":
        lines.append("  privacy: none (dp.mode=none) — the update is not differentially private")
    else:
        dp_metrics = {k: round(v, 4) for k, v in report.result.metrics.items() if k.startswith("dp-")}
        lines.append(f"  privacy: {dp.mode} {dp_metrics}")
    lines.append("  plus metrics: " + ", ".join(k for k in report.result.metrics if not k.startswith("dp-")))
    return "\n".join(lines)


def run_private_finetune(model_spec: str, data: DomainData, lora: LoraSettings, cfg: FinetuneConfig,
                         dp: DPConfig = DPConfig(), out_dir: Path | None = None,
                         noise: NoiseSource | None = None) -> OrgReport:
    """Load the model, evaluate, fine-tune LoRA on the train split, evaluate, save update and adapter.

    DP noise is secret (``SecretNoise``) unless a ``noise`` source is given.
    """
    model, tokenizer = load_model(model_spec)
    before = evaluate_split(model, tokenizer, data.test, cfg.max_length)
    model = attach_lora(model, lora)
    spec = spec_of(model)
    result = finetune(model, tokenizer, data.train, cfg, dp, noise if noise is not None else SecretNoise())
    after = evaluate_split(model, tokenizer, data.test, cfg.max_length)
    report = OrgReport(str(model_spec), data.name, spec, result, dp, before, after)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report.update_path = out_dir / "update.safetensors"
        save_update(report.update_path, result.update, spec, {"model": str(model_spec), "data": data.name})
        report.adapter_dir = out_dir / "adapter"
        model.save_pretrained(report.adapter_dir)  # a peft adapter: PeftModel.from_pretrained(base, dir)
        (out_dir / "report.json").write_text(json.dumps(report.summary(), indent=2))
    return report


@torch.no_grad()
def evaluate_model(model_spec: str, data: DomainData, adapter: Path | None = None, max_length: int = 96
                   ) -> dict[str, float]:
    """Test-split metrics of a model, optionally with a saved peft adapter applied."""
    model, tokenizer = load_model(model_spec)
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter directory not found: {adapter}")
        model = PeftModel.from_pretrained(model, str(adapter))
    return evaluate_split(model, tokenizer, data.test, max_length)
