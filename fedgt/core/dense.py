"""LoRA adapters as dense weight changes: scaling * B @ A per adapted module, flattened in spec order.

Averaging LoRA factors (mean of B times mean of A) is not the mean of the weight changes B_i @ A_i; across
organizations on different data the cross terms cancel most of the signal. Aggregating and merging in weight
space needs these conversions, shared by the server (aggregation) and the provider (choosing merge knobs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedgt.core.lora import A_SUFFIX, B_SUFFIX
from fedgt.core.updates import UpdateSpec


def module_names(spec: UpdateSpec) -> list[str]:
    """The LoRA-wrapped module paths of a spec, in spec order."""
    return [k.removesuffix(A_SUFFIX) for k in spec.keys if k.endswith(A_SUFFIX)]


def dense_change(factors: Mapping[str, torch.Tensor], spec: UpdateSpec, scaling: float) -> dict[str, torch.Tensor]:
    """scaling * B @ A per LoRA module (absolute factors), as dense (out, in) matrices."""
    return {m: scaling * factors[m + B_SUFFIX].float() @ factors[m + A_SUFFIX].float() for m in module_names(spec)}


def dense_shapes(spec: UpdateSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA module's weight."""
    shapes = dict(zip(spec.keys, spec.shapes, strict=True))
    return {m: (shapes[m + B_SUFFIX][0], shapes[m + A_SUFFIX][1]) for m in module_names(spec)}


def dense_to_vector(change: Mapping[str, torch.Tensor], spec: UpdateSpec) -> torch.Tensor:
    """Dense changes flattened in spec module order."""
    return torch.cat([change[m].reshape(-1) for m in module_names(spec)])


def vector_to_dense(vector: torch.Tensor, spec: UpdateSpec) -> dict[str, torch.Tensor]:
    """Inverse of ``dense_to_vector``."""
    out, start = {}, 0
    for m, (o, i) in dense_shapes(spec).items():
        out[m] = vector[start:start + o * i].reshape(o, i)
        start += o * i
    if start != vector.numel():
        raise ValueError(f"dense vector has {vector.numel()} values, the spec's modules take {start}")
    return out
