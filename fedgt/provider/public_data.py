"""The provider's public data: shadow domains for curation and GT validation (never an organization's data).

Built-in shadow domains are the ``shadow`` task domains of ``fedgt.core.splits`` (public people only); a user
adds their own with a folder of per-domain subfolders (``--shadow-data``, the foundation's file formats).
"""

from __future__ import annotations

from pathlib import Path

from fedgt.core.data import DomainData, load_user_domains, task_domain_data
from fedgt.core.mixture import PretrainData
from fedgt.core.splits import shadow_task_domains
from fedgt.core.world import make_world


def task_shadow_domains(n_examples: int = 128, limit: int | None = None, seed: int = 0,
                        data: PretrainData = PretrainData()) -> list[DomainData]:
    """Public examples of the built-in shadow domains (a seeded sample of ``limit`` of them, else all)."""
    world = make_world(data.num_people, seed=data.world_seed)
    return [task_domain_data(world, d, n_examples, n_examples, seed, split="public")
            for d in shadow_task_domains(limit, seed, data)]


def shadow_domains(n_examples: int = 128, limit: int | None = None, seed: int = 0,
                   shadow_data: Path | None = None, builtin: bool = True) -> list[DomainData]:
    """Built-in shadow task domains and/or a user's shadow folder (one subfolder per domain)."""
    out = task_shadow_domains(n_examples, limit, seed) if builtin else []
    if shadow_data is not None:
        out += [DomainData(f"user/{d.name}", d.train, d.test, d.source) for d in load_user_domains(Path(shadow_data))]
    if not out:
        raise ValueError("no shadow domains: keep the built-in ones or give --shadow-data")
    return out
