"""A site's own privacy policy, and how it answers the server's request.

The server's run config only *requests* a DP mode, ε and δ (``dp.*``). Each site decides, from a policy it alone
controls, what it grants:

- At a partner site the policy comes from the SuperNode's ``--node-config``: ``policy="/path/policy.toml"`` (keys
  below, in a ``[policy]`` table or at the top level) and/or the same keys inline (``dp-mode="dp-sgd"
  max-epsilon=4.0``; inline keys win). Without either, ``SitePolicy()``'s defaults apply: DP-SGD, ε <= 8 per
  round, δ <= 1e-5, budget 24, and nothing released beyond the update, ``num-examples`` and the ε spent.
- In simulation (a node with ``partition-id`` and no ``data-path``) the emulated organizations' policies come
  from the scenario's ``sim-sites.*`` keys, with per-organization ``[org-N]`` tables in ``sim-sites.policy-file``.

A request weaker than the policy (another mechanism, a larger ε or δ) is refused, and the reply says why. The
ledger lives where the policy says (default: beside the site's data); nothing the server sends can move it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedgt.core.dp import DP_MODES, DPConfig
from fedgt.core.run_config import DPSection, SimSitesSection

# Metrics a policy may choose to release, besides what every reply holds (``fedgt.org.release.ALWAYS``).
RELEASABLE = ("train-loss", "tiny-test-loss", "tiny-test-em", "dp-epsilon", "dp-delta", "dp-noise-multiplier",
              "dp-clip", "dp-sample-rate", "dp-sigma", "dp-budget", "sim-partition-id")
# sim-partition-id: an emulated organization's partition (simulation only), so the simulation can score the LLM
# adapter the server derives from its update on its own test split.


class PolicyError(ValueError):
    """A site policy that cannot be used; the message names the key and where it came from."""


class RequestRefused(Exception):
    """The server asked for less privacy than the site's policy allows."""


@dataclass(frozen=True)
class SitePolicy:
    """What one organization allows: its DP floor, its budget, where its ledger lives, what it releases."""

    dp_mode: str = "dp-sgd"  # the mechanism it requires; "none" grants any request
    max_epsilon: float = 8.0  # the largest ε per round it grants
    max_delta: float = 1e-5  # the largest δ it grants; also the δ its ledger accounts at
    budget: float = 24.0  # ε over all rounds (RDP composition); beyond it, it declines
    ledger: str = ""  # the ledger file; "" = <data-path>/.fedgt-ledger/ledger.json
    release: tuple[str, ...] = ()  # metrics from RELEASABLE it may send
    tiny_model: str = ""  # the provider's published TinyLM directory; "" = the prepared preset of that name
    split_seed: int = 0  # how the site splits its data into train and test (never the server's choice)
    noise_seed: int | None = None  # simulation only: reproducible (non-private) DP noise
    source: str = field(default="defaults", compare=False)  # where it was read from, for messages

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise PolicyError(f"site policy ({self.source}) '{key}': {what}")

        need(self.dp_mode in DP_MODES, "dp-mode", f"must be one of {DP_MODES}, got {self.dp_mode!r}")
        need(math.isfinite(self.max_epsilon) and self.max_epsilon > 0, "max-epsilon",
             f"must be > 0, got {self.max_epsilon}")
        need(0 < self.max_delta < 1, "max-delta", f"must be in (0, 1), got {self.max_delta}")
        need(math.isfinite(self.budget) and self.budget > 0, "budget", f"must be > 0, got {self.budget}")
        bad = [m for m in self.release if m not in RELEASABLE]
        need(not bad, "release", f"unknown metric(s) {bad}; releasable: {list(RELEASABLE)}")


_KEYS = {f.name.replace("_", "-"): f.name for f in fields(SitePolicy) if f.name != "source"}


def _coerce(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Policy keys (kebab-case, as in node config and policy files) to ``SitePolicy`` fields."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            raise PolicyError(f"site policy ({source}): unknown key {key!r}; known keys: {sorted(_KEYS)}")
        name = _KEYS[key]
        try:
            if name == "release":
                items = value.split(",") if isinstance(value, str) else list(value)
                out[name] = tuple(s.strip() for s in items if str(s).strip())
            elif name in ("max_epsilon", "max_delta", "budget"):
                out[name] = float(value)
            elif name == "noise_seed":
                out[name] = None if value is None or int(value) < 0 else int(value)
            elif name == "split_seed":
                out[name] = int(value)
            else:
                out[name] = str(value)
        except (TypeError, ValueError) as err:
            raise PolicyError(f"site policy ({source}) '{key}': cannot use {value!r} ({err})") from err
    return out


def read_policy_file(path: Path, table: str = "policy") -> dict[str, Any]:
    """The raw keys of a policy TOML file (a ``[policy]`` table, or top-level keys)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"site policy file {path}: cannot read it ({err})") from err
    return dict(data.get(table, data))


def site_policy(node_config: Mapping[str, Any]) -> SitePolicy:
    """A partner site's policy: its node config's ``policy`` file, then its inline policy keys, over the defaults."""
    raw: dict[str, Any] = {}
    sources = []
    if node_config.get("policy"):
        path = Path(str(node_config["policy"])).expanduser()
        raw.update(read_policy_file(path))
        sources.append(str(path))
    inline = {k: v for k, v in node_config.items() if k in _KEYS}
    raw.update(inline)
    if inline:
        sources.append("node config")
    if "noise-seed" in raw:  # a deployed site's noise is always secret
        raise PolicyError(f"site policy ({' + '.join(sources)}) 'noise-seed': reproducible noise is a "
                          "simulation-only switch (sim-sites.noise-seed)")
    source = " + ".join(sources) or "defaults"
    return SitePolicy(**_coerce(raw, source), source=source)


def simulated_policy(sim: SimSitesSection, partition_id: int) -> SitePolicy:
    """An emulated organization's policy: the scenario's ``sim-sites.*`` keys, then its ``[org-N]`` table."""
    base = SitePolicy(dp_mode=sim.dp_mode, max_epsilon=sim.max_epsilon, max_delta=sim.max_delta, budget=sim.budget,
                      release=tuple(s.strip() for s in sim.release.split(",") if s.strip()),
                      noise_seed=None if sim.noise_seed < 0 else sim.noise_seed, source="sim-sites")
    if not sim.policy_file:
        return base
    data = tomllib.loads(Path(sim.policy_file).read_text())
    raw = {**data.get("default", {}), **data.get(f"org-{partition_id}", {})}
    source = f"{sim.policy_file} [org-{partition_id}]"
    return replace(base, **_coerce(raw, source), source=source)


def grant(policy: SitePolicy, request: DPSection) -> DPConfig:
    """The DP this site runs for ``request``, or ``RequestRefused`` saying how the request is weaker."""
    if policy.dp_mode != "none":
        if request.mode != policy.dp_mode:
            raise RequestRefused(f"site policy requires dp.mode={policy.dp_mode!r}; the run requested "
                                 f"{request.mode!r}")
        if request.epsilon > policy.max_epsilon:
            raise RequestRefused(f"site policy allows ε <= {policy.max_epsilon:g} per round; the run requested "
                                 f"dp.epsilon={request.epsilon:g}")
        if request.delta > policy.max_delta:
            raise RequestRefused(f"site policy allows δ <= {policy.max_delta:g}; the run requested "
                                 f"dp.delta={request.delta:g}")
    if request.mode == "none":
        return DPConfig()
    return DPConfig(mode=request.mode, epsilon=request.epsilon, delta=request.delta,
                    max_grad_norm=request.max_grad_norm, update_clip=request.update_clip)
