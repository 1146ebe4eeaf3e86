"""LoRA adapters with a seeded initialisation: the only place ``peft.get_peft_model`` is called.

Seeding the init matters because an update is "after minus before": a receiver that attaches LoRA to the same
architecture with the same ``init_seed`` gets bit-identical initial factors, so ``before`` never has to travel.

Canonical parameter names are peft's names with the adapter name and the ``base_model.model.`` prefix removed, e.g.
``model.layers.0.self_attn.q_proj.lora_A.weight``; they equal the keys of ``peft.get_peft_model_state_dict`` with
that prefix stripped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import peft
import torch
from transformers.pytorch_utils import Conv1D

PEFT_PREFIX = "base_model.model."
LORA_FACTORS = ("lora_A", "lora_B")

# Llama-style name -> the same projection in other families. Fused qkv layers (c_attn, query_key_value, Wqkv) stand in
# for q and v at once; families that already use q_proj/v_proj (Phi, OPT, GPT-J/Neo, Mistral, Qwen) need no entry.
FAMILY_EQUIVALENTS: dict[str, tuple[str, ...]] = {
    "q_proj": ("c_attn", "query_key_value", "Wqkv", "q"),  # GPT-2, GPT-NeoX/Falcon/Bloom, MPT, T5
    "k_proj": ("c_attn", "query_key_value", "Wqkv", "k"),
    "v_proj": ("c_attn", "query_key_value", "Wqkv", "v"),
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters plus the seed that fixes the initial A factors."""

    r: int = 2
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    init_seed: int = 42
    freeze_a: bool = False  # LoRA-FA: A stays at its seeded init and only B trains

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoraSettings.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraSettings.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")
        if len(self.target_modules) == 0:
            raise ValueError(f"LoraSettings.target_modules must be non-empty, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        """The factor peft multiplies B @ A by: alpha / r."""
        return self.alpha / self.r


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear-like leaf modules (nn.Linear or GPT-2's Conv1D) by full module name."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D)) and name
    }


def _matches(module_name: str, target: str) -> bool:
    # Same rule peft uses for a list of target_modules: the whole name or a dotted suffix.
    return module_name == target or module_name.endswith("." + target)


def _present(names: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """Candidates that are a suffix of at least one of ``names``, deduplicated in order."""
    found: list[str] = []
    for candidate in candidates:
        if candidate not in found and any(_matches(name, candidate) for name in names):
            found.append(candidate)
    return found


def discover_target_modules(model: torch.nn.Module, requested: Sequence[str]) -> list[str]:
    """The requested LoRA targets that exist in ``model``, else their equivalents in the model's family."""
    names = list(_linear_modules(model))
    found = _present(names, requested)
    if found:
        return found
    equivalents = [alt for name in requested for alt in FAMILY_EQUIVALENTS.get(name, ())]
    found = _present(names, equivalents)
    if found:
        return found
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in names})
    raise ValueError(
        f"none of the LoRA target modules {list(requested)} (nor a known family equivalent) exist in "
        f"{type(model).__name__}; its Linear module names are {leaf_names}, e.g. {names[:4]}"
    )


def _uses_conv1d(model: torch.nn.Module, targets: Sequence[str]) -> bool:
    """Whether the targets are GPT-2 style Conv1D (weight stored (in, out), so peft needs fan_in_fan_out)."""
    kinds = {
        isinstance(module, Conv1D)
        for name, module in _linear_modules(model).items()
        if any(_matches(name, target) for target in targets)
    }
    if len(kinds) > 1:
        # peft keeps one fan_in_fan_out flag per config and flips it per module, so a mix is not supported.
        raise ValueError(f"LoRA targets {list(targets)} mix nn.Linear and Conv1D modules; pick one kind")
    return kinds == {True}


def lora_config(model: torch.nn.Module, targets: Sequence[str], r: int, alpha: float, dropout: float = 0.0
                ) -> peft.LoraConfig:
    """peft's LoraConfig for ``model``'s modules matching ``targets`` (Conv1D targets get ``fan_in_fan_out``)."""
    found = discover_target_modules(model, targets)
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=found, bias="none",
                           task_type="CAUSAL_LM", fan_in_fan_out=_uses_conv1d(model, found))


def attach_lora(model: torch.nn.Module, settings: LoraSettings) -> peft.PeftModel:
    """Wrap ``model`` (in place) with seeded LoRA adapters; same architecture + seed gives identical factors."""
    config = lora_config(model, settings.target_modules, settings.r, settings.alpha, settings.dropout)
    # peft creates the A factors on the CPU (kaiming-uniform from the global generator) and only then moves them to
    # the base layer's device, so seeding the CPU generator fixes them on any device. Restore it (and CUDA's, which
    # manual_seed also touches) so the caller's random stream is unaffected.
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        torch.manual_seed(settings.init_seed)
        with warnings.catch_warnings():
            # peft 0.21 still calls transformers' deprecated is_gradient_checkpointing; not actionable here.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = peft.get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    if settings.freeze_a:
        for name, param in peft_model.named_parameters():
            if _lora_factor(name) == "lora_A":
                param.requires_grad_(False)
    return peft_model


def _lora_factor(param_name: str) -> str | None:
    """``lora_A``/``lora_B`` when the parameter is a LoRA factor, else None."""
    parts = param_name.split(".")
    return next((part for part in parts if part in LORA_FACTORS), None)


def canonical_name(param_name: str, adapter_names: Sequence[str]) -> str:
    """peft's parameter name without the adapter component and the ``base_model.model.`` prefix."""
    parts = param_name.removeprefix(PEFT_PREFIX).split(".")
    # The adapter name sits right after lora_A/lora_B (``q_proj.lora_A.default.weight``); drop only that one so a
    # module that happens to share the adapter's name survives.
    kept = [
        part for i, part in enumerate(parts) if not (i > 0 and parts[i - 1] in LORA_FACTORS and part in adapter_names)
    ]
    return ".".join(kept)


def _lora_params_by_name(peft_model: peft.PeftModel) -> dict[str, torch.nn.Parameter]:
    """Every LoRA factor parameter (trainable or frozen) by canonical name."""
    adapters = list(peft_model.peft_config)
    return {
        canonical_name(name, adapters): param
        for name, param in peft_model.named_parameters()
        if _lora_factor(name) is not None
    }


def lora_parameters(peft_model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """The trainable LoRA parameters as detached float32 clones, by canonical name."""
    return {
        name: param.detach().to(torch.float32).clone()
        for name, param in _lora_params_by_name(peft_model).items()
        if param.requires_grad
    }


def set_lora_parameters(peft_model: peft.PeftModel, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the LoRA parameters of the same canonical name, in place."""
    params = _lora_params_by_name(peft_model)
    for name, value in values.items():
        if name not in params:
            raise KeyError(f"no LoRA parameter named {name!r} in the model (it has e.g. {sorted(params)[:2]})")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"LoRA parameter {name!r}: shape {tuple(value.shape)} != expected {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"  # peft state-dict keys of a module's factors


@torch.no_grad()
def merge_into_base(peft_model: torch.nn.Module, factors: Mapping[str, torch.Tensor], scaling: float) -> None:
    """W += scaling * B @ A for every module in ``factors`` (any rank), in the base layers of a peft model."""
    modules = dict(peft_model.named_modules())
    for name in {k.removesuffix(A_SUFFIX) for k in factors if k.endswith(A_SUFFIX)}:
        layer = modules.get("base_model.model." + name)
        if layer is None or not hasattr(layer, "base_layer"):
            raise KeyError(f"merge_into_base: no LoRA-wrapped module {name!r} in the model")
        weight = layer.base_layer.weight
        delta = factors[name + B_SUFFIX].to(weight) @ factors[name + A_SUFFIX].to(weight)
        weight += scaling * (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
