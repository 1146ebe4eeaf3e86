"""Which private data each organization of a federation holds.

- At a partner site: the SuperNode's ``node_config`` gives ``data-path``, a folder of ``.txt``/``.jsonl`` files
  (``fedgt.core.data`` formats); only that organization ever reads it.
- In simulation: ``partition-id`` / ``num-partitions`` from the node config select one organization of
  either ``data.path`` (one subfolder per organization, sorted by name) or the built-in private task domains
  of ``data.setting``: ``same_distribution`` draws from the provider's curated shadow domains (private
  people: never in any public data), ``held_out_combination`` / ``held_out_family`` from domains no public
  data comes from. ``data.partition`` deals them out: one domain per organization, IID, or Dirichlet(α).
The server (simulation only) rebuilds the same splits to score the LLM on each organization's test split.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedgt.core.data import DomainData, load_user_domain, load_user_domains, partition, task_domain_data
from fedgt.core.mixture import PretrainData
from fedgt.core.run_config import FedConfig
from fedgt.core.splits import make_domain_splits, shadow_task_domains
from fedgt.core.tasks import TaskDomain
from fedgt.core.world import make_world


def _pool(cfg: FedConfig) -> list[TaskDomain]:
    setting = cfg.data.setting
    if setting == "same_distribution":
        return shadow_task_domains(cfg.gt.shadow_domains, seed=0)  # the provider's curated domains (seed 0)
    splits = make_domain_splits(PretrainData().splits_seed)
    return list(splits.held_out_combination if setting == "held_out_combination" else splits.held_out_family)


def builtin_domains(cfg: FedConfig, num_orgs: int) -> list[TaskDomain]:
    """The task domains a simulated federation of ``num_orgs`` draws its private data from."""
    pool = sorted(_pool(cfg))
    rng = random.Random(f"federation-{cfg.data.seed}")
    if num_orgs <= len(pool):
        return rng.sample(pool, num_orgs)
    if cfg.data.partition == "domain":
        return [pool[i % len(pool)] for i in rng.sample(range(num_orgs), num_orgs)]  # domains repeat, people differ
    return pool


@lru_cache(maxsize=4)
def simulated_organizations(cfg: FedConfig, num_orgs: int) -> tuple[DomainData, ...]:
    """Every simulated organization's private data (train and test), in partition-id order."""
    d = cfg.data
    if d.path:
        orgs = load_user_domains(Path(d.path), seed=d.seed)
        if d.partition == "domain":
            if len(orgs) != num_orgs:
                raise ValueError(f"data.path {d.path} holds {len(orgs)} organization folders but the federation has "
                                 f"{num_orgs} organizations (num-supernodes)")
            return tuple(orgs)
        return tuple(partition(orgs, num_orgs, d.partition, d.alpha, d.seed))
    world = make_world(PretrainData().num_people, seed=PretrainData().world_seed)
    domains = builtin_domains(cfg, num_orgs)
    if d.partition == "domain":
        # Organization i: domain i with its own seed, so repeated domains still hold different private samples.
        return tuple(DomainData(f"org-{i}:{dom.name}", *_split(world, dom, d.n_train, d.n_test, d.seed + 1000 * i))
                     for i, dom in enumerate(domains))
    data = [task_domain_data(world, dom, d.n_train, d.n_test, d.seed) for dom in domains]
    return tuple(partition(data, num_orgs, d.partition, d.alpha, d.seed))


def _split(world, domain: TaskDomain, n_train: int, n_test: int, seed: int) -> tuple:
    data = task_domain_data(world, domain, n_train, n_test, seed)
    return data.train, data.test, data.source


def site_data(node_config: Mapping[str, Any], split_seed: int = 0) -> DomainData:
    """A partner site's data: its node config's ``data-path``, split with the site's own seed."""
    if not node_config.get("data-path"):
        raise ValueError(f"node config needs data-path (this site's data folder), got {sorted(node_config)}")
    path = Path(str(node_config["data-path"]))
    if not path.is_dir():
        raise FileNotFoundError(f"node config data-path={path} is not a directory")
    return load_user_domain(path, seed=split_seed)


def simulated_data(cfg: FedConfig, node_config: Mapping[str, Any]) -> DomainData:
    """A simulated organization's data: its partition of the scenario (``partition-id`` of ``num-partitions``)."""
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(f"simulation node config needs partition-id and num-partitions, got {sorted(node_config)}")
    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= pid < n:
        raise ValueError(f"node config partition-id={pid} outside 0..{n - 1}")
    return simulated_organizations(cfg, n)[pid]


def write_jsonl(data: DomainData, folder: Path) -> Path:
    """An organization's examples (train and test) as a site data folder in the ``fedgt.core.data`` JSONL format."""
    import json

    from fedgt.core.examples import PROMPT_TEMPLATE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix, suffix = PROMPT_TEMPLATE.split("{prompt}")
    with (folder / "data.jsonl").open("w") as f:
        for ex in (*data.train, *data.test):
            if ex.is_task and ex.context.startswith(prefix) and ex.context.endswith(suffix):
                row = {"prompt": ex.context[len(prefix):len(ex.context) - len(suffix)], "answer": ex.answer}
            else:
                row = {"text": ex.text}
            f.write(json.dumps(row) + "\n")
    return folder
