"""Which task domains are pretraining, shadow (public, for the provider) and private (held out).

- ``held_out_family`` domains and ``held_out_combination`` domains are private-only: never pretrained on,
  never curated. A held-out combination is a (family, op, attribute) whose every parameter value is
  still seen elsewhere.
- The remaining ("seen") domains are split into ``pretrain`` and ``shadow`` domains. Shadow domains are
  not pretrained on either, so a shadow fine-tune learns something new, as a private one does.
- Within a domain, questions are further split by person into public/train/test (``fedgt.core.tasks``), so
  ``same_distribution`` private data can share a domain with the shadow data but never a sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedgt.core.mixture import PretrainData
from fedgt.core.tasks import FAMILIES, TaskDomain, all_domains


@dataclass(frozen=True)
class DomainSplits:
    """Disjoint lists of task domains."""

    pretrain: tuple[TaskDomain, ...]
    shadow: tuple[TaskDomain, ...]
    held_out_combination: tuple[TaskDomain, ...]
    held_out_family: tuple[TaskDomain, ...]

    @property
    def private_only(self) -> tuple[TaskDomain, ...]:
        """Domains no public data ever comes from."""
        return self.held_out_combination + self.held_out_family


def _holdable(combo: tuple[str, str, str], kept: set[tuple[str, str, str]]) -> bool:
    """A combination may be held out if its op and its attribute each stay seen in another kept combination."""
    family, op, attr = combo
    others = kept - {combo}
    op_seen = any(c[0] == family and c[1] == op for c in others) or family == "lookup"
    attr_seen = attr == "-" or any(c[2] == attr for c in others)
    value_seen = family != "lookup" or any(c[2] == op for c in others)  # lookup's op is an attribute
    return op_seen and attr_seen and value_seen


def make_domain_splits(
    seed: int = 0,
    held_out_family: str = "compose",
    combinations_per_family: int = 2,
    pretrain_fraction: float = 0.5,
) -> DomainSplits:
    """Deterministic split of every generator domain for a seed."""
    if held_out_family not in FAMILIES:
        raise ValueError(f"held_out_family must be one of {FAMILIES}, got {held_out_family!r}")
    if not 0.0 < pretrain_fraction < 1.0:
        raise ValueError(f"pretrain_fraction must be in (0, 1), got {pretrain_fraction}")
    rng = random.Random(f"splits-{seed}")
    domains = all_domains()
    combos = sorted({d.combination for d in domains if d.family != held_out_family})
    kept = set(combos)
    held: set[tuple[str, str, str]] = set()
    for family in FAMILIES:
        candidates = [c for c in combos if c[0] == family]
        rng.shuffle(candidates)
        for combo in candidates:
            if sum(c[0] == family for c in held) >= combinations_per_family:
                break
            if _holdable(combo, kept):
                kept.discard(combo)
                held.add(combo)
    seen = [d for d in domains if d.family != held_out_family and d.combination in kept]
    rng.shuffle(seen)
    n_pretrain = int(round(len(seen) * pretrain_fraction))
    return DomainSplits(
        pretrain=tuple(sorted(seen[:n_pretrain])),
        shadow=tuple(sorted(seen[n_pretrain:])),
        held_out_combination=tuple(d for d in domains if d.combination in held),
        held_out_family=tuple(d for d in domains if d.family == held_out_family),
    )


def shadow_task_domains(limit: int | None = None, seed: int = 0, data: PretrainData = PretrainData()
                        ) -> list[TaskDomain]:
    """The built-in shadow domains the provider curates: a seeded sample of ``limit`` of them, else all."""
    domains = list(make_domain_splits(data.splits_seed).shadow)
    if limit is not None and limit < len(domains):
        domains = sorted(random.Random(f"shadow-sample-{seed}").sample(domains, limit))
    return domains
