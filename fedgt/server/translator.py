"""The server's Grad-Transformer at run time: TinyLM update tokens in, LLM update tokens out, batched.

Loads a GT directory written by ``fedgt provide`` / ``fedgt train-gt`` (``provider.json`` says which models
and LoRA settings it was trained for and which public probe prompts it reads updates through), runs on CUDA
when present (``gt.device = auto``) and on CPU otherwise. ``coverage`` scores how far each TinyLM update lies from
the curated ones the GT was trained on (``fedgt.provider.coverage``; None when the GT directory cannot tell).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.manifest import DamagedArtifact, verify_folder
from fedgt.core.updates import UpdateSpec
from fedgt.provider.coverage import Coverage, load_coverage


def read_provider(gt_dir: Path) -> dict:
    """``provider.json`` of a GT directory, with a clear error when it is missing."""
    path = Path(gt_dir) / "provider.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: gt.checkpoint must be a directory written by `fedgt provide` or "
                                "`fedgt train-gt`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedArtifact(f"{path}: not valid JSON ({err})") from err


def lora_from_json(d: dict) -> LoraSettings:
    """LoraSettings from its asdict() form."""
    return LoraSettings(**{**d, "target_modules": tuple(d["target_modules"])})


def finetune_from_json(d: dict) -> FinetuneConfig:
    """FinetuneConfig from its asdict() form."""
    return FinetuneConfig(**{**d, "snapshot_steps": tuple(d.get("snapshot_steps", ()))})


class Translator:
    """A trained Grad-Transformer plus the TinyLM it reads probe features with."""

    def __init__(self, gt_dir: Path, device: str = "auto", tiny_model: str | Path | None = None):
        from fedgt.core.judge import LLMJudge
        from fedgt.provider.grad_transformer import best_device, load_gt

        verify_folder(Path(gt_dir), "Grad-Transformer")  # DamagedArtifact names a damaged or missing file
        self.meta = read_provider(gt_dir)
        self.device = best_device() if device == "auto" else torch.device(device)
        self.model, _ = load_gt(Path(gt_dir), self.device)
        # Where the GT is trustworthy (fedgt.provider.coverage); None: unknown (a GT dir with no curated updates).
        self.coverage: Coverage | None = load_coverage(Path(gt_dir), self.model.src_norm.mean,
                                                       self.model.src_norm.std)
        self.lora = lora_from_json(self.meta["lora"])
        self.prompts: list[str] = list(self.meta.get("probe_prompts", []))
        # provider.json names the TinyLM (a preset name or a folder's basename, no path of the provider's machine):
        # the server passes the copy it checked against the published identity; else the name is resolved here.
        tiny = tiny_model if tiny_model is not None else self.meta["tiny"]
        self.tiny_judge = LLMJudge(tiny, self.lora, device=self.device) if self.prompts else None

    @property
    def src_shape(self) -> tuple[int, int]:
        """(layer tokens, token width) of the TinyLM updates it reads."""
        return self.model.cfg.src_tokens, self.model.cfg.src_dim

    def check_specs(self, tiny: UpdateSpec, llm: UpdateSpec) -> None:
        """Refuse models whose update spaces differ from the ones the GT was trained on."""
        cfg = self.model.cfg
        if (tiny.num_layers, tiny.token_dim) != (cfg.src_tokens, cfg.src_dim):
            raise ValueError(f"the Grad-Transformer reads {cfg.src_tokens}x{cfg.src_dim} TinyLM tokens, the "
                             f"TinyLM's LoRA gives {tiny.num_layers}x{tiny.token_dim}: same model.tiny and lora.* as "
                             "the provider?")
        if (llm.num_layers, llm.token_dim) != (cfg.tgt_tokens, cfg.tgt_dim):
            raise ValueError(f"the Grad-Transformer writes {cfg.tgt_tokens}x{cfg.tgt_dim} LLM tokens, the LLM's LoRA "
                             f"takes {llm.num_layers}x{llm.token_dim}: same model.llm and lora.* as the provider?")

    @torch.no_grad()
    def __call__(self, tiny_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, Ls, Ds)`` TinyLM update tokens to ``(B, Lt, Dt)`` LLM update tokens (on the CPU)."""
        from fedgt.provider.grad_transformer import predict
        from fedgt.provider.probes import probe_features

        probes = probe_features(self.tiny_judge, tiny_tokens, self.prompts) if self.tiny_judge is not None else None
        return predict(self.model, tiny_tokens, probes)
