"""The provider's public prompts, by shadow domain, with the TinyLM update it curated on each: routing keys.

The server's consolidation (``fedgt.server.consolidate``) asks each organization's LLM update to answer public
prompts; which prompts is decided here: those of the shadow domains nearest the organization's released TinyLM
update (cosine of normalised updates, as the kNN baseline). The provider saves the pool next to its GT.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedgt.core.data import DomainData
from fedgt.core.examples import prompt_of
from fedgt.provider.shadow import ShadowPairs, load_pairs

POOL_JSON, POOL_TENSORS = "prompt_pool.json", "prompt_pool.safetensors"


class PromptPool:
    """Public prompts of the provider's shadow domains, with the TinyLM update it curated on each (routing keys)."""

    def __init__(self, names: Sequence[str], prompts: Sequence[Sequence[str]], tiny: torch.Tensor):
        if not (len(names) == len(prompts) == len(tiny)):
            raise ValueError(f"prompt pool: {len(names)} names, {len(prompts)} prompt lists, {len(tiny)} updates")
        self.names, self.prompts = list(names), [list(p) for p in prompts]
        self.tiny = tiny.float()
        flat = tiny.flatten(1).float()
        std = flat.std(0) if len(flat) > 1 else torch.ones(flat.shape[1])
        self.mean, self.std = flat.mean(0), torch.where(std > 1e-12, std, torch.ones_like(std))
        self.keys = torch.nn.functional.normalize((flat - self.mean) / self.std, dim=1)  # (S, Ls * Ds)

    def save(self, gt_dir: Path) -> None:
        """Write ``prompt_pool.json`` (names, prompts) and ``prompt_pool.safetensors`` (routing keys) into a GT dir."""
        save_file({"tiny": self.tiny.contiguous()}, str(Path(gt_dir) / POOL_TENSORS))
        (Path(gt_dir) / POOL_JSON).write_text(json.dumps({"names": self.names, "prompts": self.prompts}))

    @classmethod
    def load(cls, gt_dir: Path) -> PromptPool:
        """Read a pool written by ``save``; errors name the file."""
        path = Path(gt_dir) / POOL_JSON
        try:
            meta = json.loads(path.read_text())
            tiny = load_file(str(Path(gt_dir) / POOL_TENSORS))["tiny"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"prompt pool in {gt_dir} is unreadable ({type(err).__name__}: {err})") from err
        return cls(meta["names"], meta["prompts"], tiny)

    @classmethod
    def from_provider(cls, gt_dir: str | Path) -> PromptPool:
        """The pool of a provider folder: saved with its GT, else rebuilt from its curated shadow pairs."""
        from fedgt.provider.public_data import task_shadow_domains

        gt_dir = Path(gt_dir)
        if (gt_dir / POOL_JSON).is_file():
            return cls.load(gt_dir)
        meta_path = gt_dir / "provider.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"consolidation needs the provider's metadata: {meta_path} is missing")
        provider = json.loads(meta_path.read_text())["provider"]
        pairs = load_pairs(gt_dir.parent / "shadow").final()
        domains = {d.name: d for d in task_shadow_domains(provider["n_examples"], provider["shadow_domains"],
                                                          provider["seed"])}
        missing = [n for n in pairs.names if n not in domains]
        if missing:
            raise ValueError(f"{gt_dir.parent / 'shadow'}: curated domains {missing[:3]} are not built-in shadow "
                             "domains (a user shadow folder cannot be regenerated here)")
        order = torch.argsort(pairs.domain)
        prompts = [[ex.context for ex in domains[n].train if ex.is_task] for n in pairs.names]
        return cls(pairs.names, prompts, pairs.tiny[order])

    def neighbours(self, tiny: torch.Tensor, k: int) -> list[list[int]]:
        """Indices of the ``k`` nearest shadow domains of each TinyLM update ``(T, Ls, Ds)``."""
        q = torch.nn.functional.normalize((tiny.flatten(1).float() - self.mean) / self.std, dim=1)
        return (q @ self.keys.T).topk(min(k, len(self.keys)), dim=1).indices.tolist()

    def route(self, tiny: torch.Tensor, n: int, k: int, seed: int = 0) -> list[list[str]]:
        """``n`` public prompts per TinyLM update, drawn evenly from its ``k`` nearest shadow domains."""
        rng = random.Random(seed)
        out = []
        for near in self.neighbours(tiny, k):
            pool = [p for i in near for p in self.prompts[i]]
            out.append([pool[j % len(pool)] for j in rng.sample(range(max(n, len(pool))), n)])
        return out


def save_prompt_pool(gt_dir: Path, pairs: ShadowPairs, shadow: Sequence[DomainData]) -> PromptPool:
    """The pool of a curation (final-step TinyLM updates, each domain's public prompts), saved in ``gt_dir``."""
    final = pairs.final()
    order = torch.argsort(final.domain)
    by_name = {d.name: d for d in shadow}
    pool = PromptPool(final.names, [[prompt_of(ex) for ex in by_name[n].train] for n in final.names],
                      final.tiny[order])
    pool.save(gt_dir)
    return pool
