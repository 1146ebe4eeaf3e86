"""The server's view of one shared model across rounds: its LoRA factors, and the rounds folded into its base.

Two round schemes (``strategy.rounds``):
- ``naive``: one adapter accumulates every round's update (FedAvg of LoRA); later rounds start from factors the
  Grad-Transformer never saw in training.
- ``merge``: at the end of each round the round's adapter is folded into the base weights and the next round
  starts again from the seeded init, so every update the GT maps is "from the seeded init on (nearly) the base
  model", the regime it was trained on.

Either way the model equals base + sum over pieces of scaling * B_i @ A_i. Concatenating the pieces gives one
LoRA adapter of rank r * k with alpha * k (same scaling), which is how the final LLM is saved: a standard peft
adapter directory that loads with ``PeftModel.from_pretrained`` on the untouched base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fedgt.core.dense import dense_change, dense_shapes, dense_to_vector, module_names, vector_to_dense
from fedgt.core.lora import A_SUFFIX, B_SUFFIX, LoraSettings
from fedgt.core.updates import UpdateSpec

__all__ = ["GlobalAdapter", "concat_pieces", "dense_as_lora", "dense_change", "dense_shapes", "dense_to_vector",
           "module_names", "save_dense_peft", "vector_to_dense"]


def concat_pieces(pieces: list[Mapping[str, torch.Tensor]], spec: UpdateSpec) -> dict[str, torch.Tensor]:
    """Rank-r pieces as one rank-(r * len(pieces)) set of factors: A stacked by rows, B by columns."""
    out = {}
    for m in module_names(spec):
        out[m + A_SUFFIX] = torch.cat([p[m + A_SUFFIX] for p in pieces], 0)
        out[m + B_SUFFIX] = torch.cat([p[m + B_SUFFIX] for p in pieces], 1)
    return out


class GlobalAdapter:
    """One shared model's LoRA state: the current factors and the pieces already folded into the base."""

    def __init__(self, spec: UpdateSpec, init: Mapping[str, torch.Tensor], lora: LoraSettings, scheme: str = "merge"):
        if scheme not in ("merge", "naive"):
            raise ValueError(f"round scheme must be 'merge' or 'naive', got {scheme!r}")
        self.spec, self.lora, self.scheme = spec, lora, scheme
        self.init = {k: v.detach().float().clone() for k, v in init.items()}
        self.current = {k: v.clone() for k, v in self.init.items()}
        self.merged: list[dict[str, torch.Tensor]] = []

    def add(self, delta: Mapping[str, torch.Tensor]) -> None:
        """current += delta (an update in this model's spec)."""
        for k in self.spec.keys:
            self.current[k] = self.current[k] + delta[k].float()

    def end_round(self) -> dict[str, torch.Tensor] | None:
        """Merge scheme: fold the current factors into the base, restart at the init; returns the folded piece."""
        if self.scheme != "merge":
            return None
        piece = self.current
        self.merged.append(piece)
        self.current = {k: v.clone() for k, v in self.init.items()}
        return piece

    def base_factors(self) -> dict[str, torch.Tensor]:
        """Everything folded into the base so far as one set of factors (empty before the first merge)."""
        return concat_pieces(self.merged, self.spec) if self.merged else {}

    def pieces(self) -> list[dict[str, torch.Tensor]]:
        """All the rank-r pieces whose sum is the model's change from its base."""
        return [*self.merged, self.current]

    def state_dict(self) -> dict:
        """Everything needed to resume (for round checkpoints)."""
        return {"current": self.current, "merged": self.merged, "scheme": self.scheme}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict``."""
        self.current = {k: v.clone() for k, v in state["current"].items()}
        self.merged = [{k: v.clone() for k, v in p.items()} for p in state["merged"]]

    def save_peft(self, base_model_spec: str, out: Path, merged_copy: bool = False) -> Path:
        """Save as a standard peft LoRA adapter (rank r * pieces) for ``PeftModel.from_pretrained(base, out)``."""
        import peft

        from fedgt.core.lora import lora_config, set_lora_parameters
        from fedgt.core.models import load_model

        pieces = self.pieces()
        model, tokenizer = load_model(base_model_spec)
        config = lora_config(model, self.lora.target_modules, self.lora.r * len(pieces), self.lora.alpha * len(pieces))
        peft_model = peft.get_peft_model(model, config)
        set_lora_parameters(peft_model, concat_pieces(pieces, self.spec))
        out = Path(out)
        peft_model.save_pretrained(out)
        if merged_copy:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
        return out


# --- weight space (fedgt.core.dense): the server keeps one dense change per adapted module, memory independent of
# how many organizations; saved as an exact LoRA.


def dense_as_lora(change: Mapping[str, torch.Tensor], rtol: float = 1e-6) -> tuple[dict[str, torch.Tensor], int]:
    """Exact LoRA factors (scaling 1) of dense changes by SVD at the smallest rank keeping them all; (factors, r)."""
    svds = {m: torch.linalg.svd(w.double(), full_matrices=False) for m, w in change.items()}
    rank = max(1, max(int((s > rtol * max(float(s[0]), 1e-30)).sum()) for _, s, _ in svds.values()))
    factors = {}
    for m, (u, s, vh) in svds.items():
        root = s[:rank].sqrt()
        factors[m + B_SUFFIX] = (u[:, :rank] * root).float()
        factors[m + A_SUFFIX] = (root[:, None] * vh[:rank]).float()
    return factors, rank


def save_dense_peft(change: Mapping[str, torch.Tensor], base_model_spec: str, lora: LoraSettings, out: Path,
                    merged_copy: bool = False) -> Path:
    """Dense changes saved as a standard peft LoRA adapter (exact: rank by SVD, alpha = r so scaling is 1)."""
    import peft

    from fedgt.core.lora import lora_config, set_lora_parameters
    from fedgt.core.models import load_model

    factors, rank = dense_as_lora(change)
    model, tokenizer = load_model(base_model_spec)
    config = lora_config(model, lora.target_modules, rank, rank)
    peft_model = peft.get_peft_model(model, config)
    set_lora_parameters(peft_model, factors)
    out = Path(out)
    peft_model.save_pretrained(out)
    if merged_copy:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    return out
