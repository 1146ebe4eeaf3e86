"""The provider's public data: shadow domains for curation and GT validation (never an organization's data).

Built-in shadow domains are the ``shadow`` task domains of ``fedgt.core.splits`` (public people only) for the preset
pairs, and public text (``text_shadow_domains``) for real models; a user adds their own with a folder of per-domain
subfolders (``--shadow-data``, the foundation's file formats).
"""

from __future__ import annotations

import random
import re
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


def text_shadow_domains(n_examples: int = 128, limit: int | None = None, seed: int = 0) -> list[DomainData]:
    """Public text domains for real models: chatterbot-corpus categories and standard-library docstrings.

    The language reference topics (``fedgt.core.python_text.reference_topic_domains``) are never among them: they
    are the held-out text. Each domain keeps at most ``n_examples`` training examples; ``limit`` draws a seeded sample.
    """
    from fedgt.core.data import public_text_domains
    from fedgt.core.python_text import stdlib_text_domains

    domains = [DomainData(f"chat/{d.name}", d.train[:n_examples], d.test[:n_examples], d.source)
               for d in public_text_domains(seed=seed) if len(d.train) >= 8]
    domains += [DomainData(d.name, d.train[:n_examples], d.test[:n_examples], d.source)
                for d in stdlib_text_domains(seed=seed)]
    if limit is not None and limit < len(domains):
        domains = sorted(random.Random(f"text-shadow-{seed}").sample(domains, limit), key=lambda d: d.name)
    return domains


def builtin_shadow_source(tiny_model: str) -> str:
    """Which built-in shadow domains suit a TinyLM: the world's tasks for a preset, public text for real models.

    ``tiny_model`` is a name or a directory; a prepared preset's directory (``<preset>-<fingerprint>``) counts as it.
    """
    from fedgt.core.models import PRESETS

    name = re.sub(r"-[0-9a-f]{12}$", "", Path(tiny_model).name)
    return "tasks" if name in PRESETS else "text"


def shadow_domains(n_examples: int = 128, limit: int | None = None, seed: int = 0,
                   shadow_data: Path | None = None, builtin: bool = True, tiny_model: str = "tinylm",
                   ) -> list[DomainData]:
    """Built-in shadow domains (``builtin_shadow_source``) and/or a user's shadow folder (one subfolder per domain)."""
    out = []
    if builtin:
        text = builtin_shadow_source(tiny_model) == "text"
        out = (text_shadow_domains if text else task_shadow_domains)(n_examples, limit, seed)
    if shadow_data is not None:
        out += [DomainData(f"user/{d.name}", d.train, d.test, d.source) for d in load_user_domains(Path(shadow_data))]
    if not out:
        raise ValueError("no shadow domains: keep the built-in ones or give --shadow-data")
    return out
