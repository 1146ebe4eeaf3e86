"""The one place that decides what leaves a site: every ClientApp reply is built here and nowhere else.

A reply holds exactly:
- ``arrays``: the TinyLM update, keys and shapes of the round's ``UpdateSpec`` (nothing when declining);
- ``metrics``: ``ALWAYS`` (``num-examples``, the ε spent so far, a declined flag) plus the metrics of
  ``policy.release`` that the round produced. Deployment defaults release nothing else: no loss, no raw update norm,
  no clipping flag, no test scores, no names;
- when declining, ``decline``: a reason built by site code from fixed phrases and numbers the site chooses to state
  (its policy's limits, its budget), never a path or a data set's name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedgt.core.updates import UpdateSpec, to_array_record, validate_update
from fedgt.org.policy import SitePolicy

ALWAYS = ("num-examples", "dp-epsilon-total", "declined")


def released_metrics(metrics: Mapping[str, float], policy: SitePolicy) -> dict[str, float]:
    """The subset of a round's metrics this site's policy lets leave."""
    allowed = set(ALWAYS) | set(policy.release)
    return {k: float(v) for k, v in metrics.items() if k in allowed}


def release(update: Mapping[str, torch.Tensor] | None, spec: UpdateSpec, metrics: Mapping[str, float],
            policy: SitePolicy, decline: str | None = None) -> RecordDict:
    """The whole reply content: the update (validated against ``spec``) or a decline, and the released metrics."""
    if decline is not None:
        out = released_metrics({**metrics, "num-examples": 0.0, "declined": 1.0}, policy)
        return RecordDict({"metrics": MetricRecord(out), "decline": ConfigRecord({"reason": decline})})
    if update is None:
        raise ValueError("release: no update and no decline reason")
    validate_update(dict(update), spec, source="outgoing update")
    return RecordDict({"arrays": to_array_record(dict(update), spec),
                       "metrics": MetricRecord(released_metrics(metrics, policy))})


def describe_release(spec: UpdateSpec, policy: SitePolicy, dp_note: str) -> str:
    """What leaves this organization each round, for the site's own log."""
    lines = [f"each round this organization sends {len(spec.keys)} tensors, {spec.num_params:,} float32 values "
             f"({4 * spec.num_params:,} bytes): its TinyLM LoRA update"]
    lines += [f"  {k} {tuple(s)}" for k, s in zip(spec.keys, spec.shapes, strict=True)]
    lines.append(f"  privacy: {dp_note}; policy from {policy.source}")
    lines.append(f"  plus metrics: {', '.join(ALWAYS + tuple(policy.release))}")
    return "\n".join(lines)
