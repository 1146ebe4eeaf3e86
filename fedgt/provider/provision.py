"""The provider's whole pipeline behind one call: prepare the pair, curate shadow pairs, train the GT.

``provide(cfg)`` is what ``fedgt provide`` and the federation's ServerApp run when no Grad-Transformer
checkpoint is given. Every stage is cached under ``$FEDGT_CACHE/provider/<hash of the config>`` and resumable,
so the second call returns at once. The GT directory it returns holds what the server needs at run time:
``model.safetensors`` + ``config.json`` (``fedgt.provider.grad_transformer``) and ``provider.json`` (the models, the
LoRA and fine-tuning settings the GT was trained for, and the public probe prompts it reads updates through).
``provider.json`` names the models by preset name or folder basename, never by a path of this machine, and publishes
their identities (``fedgt.core.identity``: sha256 of weights, tokenizer and seeded LoRA init) under ``"models"``, so
the server and the sites can check they hold the very TinyLM the GT was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fedgt.core.dp import DPConfig
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.identity import model_identity
from fedgt.core.lora import LoraSettings
from fedgt.core.manifest import write_manifest
from fedgt.core.models import cache_dir
from fedgt.core.run_config import FedConfig, GTSection
from fedgt.provider.prompt_pool import save_prompt_pool
from fedgt.provider.shipped import install


@dataclass(frozen=True)
class ProviderConfig:
    """What the provider curates and trains (organizations must fine-tune with the same LoRA and budget)."""

    tiny: str = "tinylm"  # a preset (prepared on demand) or a local model directory
    llm: str = "llm"
    lora: LoraSettings = field(default_factory=LoraSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tiny_dp: DPConfig = DPConfig()  # curate the TinyLM side under the organizations' DP-SGD settings
    shadow_domains: int = GTSection.shadow_domains
    n_examples: int = 128
    probes: int = 32
    epochs: int = GTSection.epochs
    examples_per_pair: int = 4  # GT functional loss: shadow examples per pair per step (train_gt.TrainConfig)
    same_val_domains: int = 16  # training domains re-tuned on other examples to validate the GT (same_val)
    d_model: int = 256
    anchor_k: int = GTSection.anchor_k  # > 0: residual on the k nearest shadow updates (grad_transformer.GTConfig)
    seed: int = 0
    workers: int = 2

    def key(self) -> str:
        """A short hash of everything that changes the result (a plain GT keeps the key it had before anchor_k)."""
        d = asdict(self)
        d.pop("workers")
        if not d["anchor_k"]:
            d.pop("anchor_k")
        if d["examples_per_pair"] == 4:
            d.pop("examples_per_pair")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def provider_config_for(cfg: FedConfig) -> ProviderConfig:
    """The provider's default curation + GT training for a federation's settings."""
    tiny, llm = cfg.model_names()
    d = cfg.dp
    tiny_dp = DPConfig(mode="dp-sgd", epsilon=d.epsilon, delta=d.delta, max_grad_norm=d.max_grad_norm) \
        if d.mode == "dp-sgd" else DPConfig()
    from fedgt.provider.public_data import builtin_shadow_source

    # Probe features are (positions x vocabulary) wide per prompt: cheap for the presets' character vocabulary,
    # 4.7M numbers per update for a 49k-token one. Real models are read through their weights only.
    probes = ProviderConfig.probes if builtin_shadow_source(tiny) == "tasks" else 0
    return ProviderConfig(tiny=tiny, llm=llm, lora=cfg.lora_settings(), finetune=cfg.finetune_config(),
                          tiny_dp=tiny_dp, shadow_domains=cfg.gt.shadow_domains, epochs=cfg.gt.epochs,
                          anchor_k=cfg.gt.anchor_k, probes=probes)


def snapshot_steps(steps: int) -> tuple[int, ...]:
    """Late snapshots paired by step (the paper's trick for many pairs per run)."""
    return tuple(range(steps - 40, steps + 1, 10)) if steps > 40 else tuple(sorted({max(1, steps // 2), steps}))


def resolve_model(spec: str) -> str:
    """A preset or derived model name prepared on demand (cached), or a local model directory as given."""
    from fedgt.core.models import preparable
    from fedgt.provider.pretrain import prepare_model

    return str(prepare_model(spec)) if preparable(spec) else spec


def provide(cfg: ProviderConfig, progress: bool = True) -> Path:
    """Prepare, curate and train (each cached); the trained Grad-Transformer's directory."""
    from fedgt.core.judge import LLMJudge
    from fedgt.provider.grad_transformer import best_device
    from fedgt.provider.probes import probe_features, probe_prompts
    from fedgt.provider.public_data import shadow_domains
    from fedgt.provider.same_val import same_domain_val
    from fedgt.provider.shadow import CurationConfig, curate, load_pairs
    from fedgt.provider.train_gt import TrainConfig, gt_config_for, split_domains, train_gt

    root = cache_dir() / "provider" / cfg.key()
    gt_dir = root / "gt"
    if (gt_dir / "provider.json").is_file():
        return gt_dir
    if install(f"provider/{cfg.key()}/gt", gt_dir):  # shipped in the repository: verified and copied
        return gt_dir
    log = print if progress else (lambda *a, **k: None)
    tiny, llm = resolve_model(cfg.tiny), resolve_model(cfg.llm)
    shadow = shadow_domains(cfg.n_examples, cfg.shadow_domains, cfg.seed, tiny_model=cfg.tiny)
    ft = replace(cfg.finetune, snapshot_steps=snapshot_steps(cfg.finetune.steps))
    ccfg = CurationConfig(tiny_model=tiny, llm_model=llm, lora=cfg.lora, finetune=ft, n_examples=cfg.n_examples,
                          tiny_dp=cfg.tiny_dp)
    log(f"provider: curating {len(shadow)} shadow domains into {root / 'shadow'}", flush=True)
    curate([(d.name, list(d.train)) for d in shadow], ccfg, root / "shadow", workers=cfg.workers, progress=progress)
    pairs = load_pairs(root / "shadow")
    device = best_device()
    judge = LLMJudge(llm, cfg.lora, device=device)
    prompts = probe_prompts(shadow, cfg.probes, cfg.seed) if cfg.probes else []
    tcfg = TrainConfig(epochs=cfg.epochs, seed=cfg.seed, examples_per_pair=cfg.examples_per_pair)
    test_examples = {d.name: list(d.test) for d in shadow}
    same_val = None
    if cfg.same_val_domains:
        train_names, _ = split_domains(pairs.names, tcfg.val_fraction, tcfg.seed)
        log(f"provider: {min(cfg.same_val_domains, len(train_names))} same-domain validation runs", flush=True)
        same_val = same_domain_val(tiny, cfg.lora, cfg.finetune, test_examples, train_names, cfg.same_val_domains,
                                   cfg.seed, cfg.tiny_dp)
    if prompts:
        tiny_judge = LLMJudge(tiny, cfg.lora, device=device)
        pairs.probes = probe_features(tiny_judge, pairs.tiny, prompts)
        if same_val is not None:
            same_val.probes = probe_features(tiny_judge, same_val.tiny, prompts)
    probe = dict(probe_tokens=len(prompts), probe_dim=pairs.probes.shape[-1]) if prompts else {}
    gcfg = gt_config_for(pairs, decoder="parallel", d_model=cfg.d_model, ffn=2 * cfg.d_model, anchor_k=cfg.anchor_k,
                         **probe)
    log(f"provider: training the Grad-Transformer on {len(pairs.tiny)} pairs ({cfg.epochs} epochs, {device})",
        flush=True)
    train_gt(pairs, gcfg, tcfg, judge, {d.name: list(d.train) for d in shadow}, test_examples, gt_dir,
             progress=progress, same_val=same_val)
    save_prompt_pool(gt_dir, pairs, shadow)
    meta = provider_meta(cfg, tiny, llm, prompts, pairs.names)
    (gt_dir / "provider.json").write_text(json.dumps(meta, indent=1))  # marks the GT complete
    write_manifest(gt_dir)  # every file's sha256, verified when a server loads the GT
    return gt_dir


def model_name(spec: str) -> str:
    """What provider.json calls a model: the preset name, or a local directory's basename (never a full path)."""
    from fedgt.core.models import preparable

    return spec if preparable(spec) else Path(spec).name


def model_manifest(spec: str, model_dir: str | Path, lora: LoraSettings) -> dict:
    """provider.json's entry for one model: its name, prepared folder's basename and identity (sha256 digests)."""
    path = Path(model_dir)
    # A .gguf or packaged model is no HF directory: it has no identity to publish (its users are warned).
    identity = model_identity(path, lora) if path.is_dir() else None
    return {"name": model_name(spec), "dir": path.name, "identity": identity}


def provider_meta(cfg: ProviderConfig, tiny_dir: str | Path, llm_dir: str | Path, prompts: list[str],
                  shadow_names: list[str]) -> dict:
    """provider.json: the models (names and identities), settings and probe prompts; no machine-specific path."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("lora", "finetune", "tiny_dp")}
    settings.update(tiny=model_name(cfg.tiny), llm=model_name(cfg.llm))
    return {"tiny": model_name(cfg.tiny), "llm": model_name(cfg.llm),
            "models": {"tiny": model_manifest(cfg.tiny, tiny_dir, cfg.lora),
                       "llm": model_manifest(cfg.llm, llm_dir, cfg.lora)},
            "lora": asdict(cfg.lora), "finetune": asdict(cfg.finetune), "tiny_dp": asdict(cfg.tiny_dp),
            "probe_prompts": prompts, "shadow_domains": shadow_names, "provider": settings}


def published_identity(meta: dict, role: str = "tiny") -> dict[str, str] | None:
    """The identity provider.json publishes for ``role`` ("tiny" or "llm"); None for GT dirs written before it."""
    entry = (meta.get("models") or {}).get(role) or {}
    identity = entry.get("identity")
    return dict(identity) if identity else None
