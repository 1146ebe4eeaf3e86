"""The update vector, as an explicit spec.

An *update* is a dict of LoRA parameters "after minus before", keyed like ``lora.lora_parameters``. Its tokens
are one per transformer layer: that layer's tensors flattened and concatenated in sorted key order, layers in
increasing index, so ``flatten`` gives a ``(num_layers, token_dim)`` matrix. ``UpdateSpec`` records the keys, shapes
and layer of each tensor, travels as JSON, and is what every update is validated against.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import peft
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedgt.core.lora import lora_parameters, set_lora_parameters

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

# A layer index is the integer right after one of these path components: Llama/Qwen/Mistral ``model.layers.N``,
# GPT-2 ``transformer.h.N``, GPT-NeoX ``gpt_neox.layers.N``, T5 ``block.N``.
LAYER_CONTAINERS = frozenset({"layers", "h", "layer", "blocks", "block"})
SPEC_METADATA_KEY = "fedgt_spec"
NUMPY_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

UpdateLike = Mapping[str, Any]  # str -> torch.Tensor or np.ndarray


class UpdateError(ValueError):
    """An update that does not fit its spec (or a bound); ``key`` is None for whole-update problems."""

    def __init__(self, reason: str, key: str | None = None, source: str | None = None) -> None:
        self.reason = reason
        self.key = key
        self.source = source
        where = f"key '{key}': " if key is not None else ""
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}update rejected: {where}{reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes across pickling (e.g. errors returned from worker processes).
        return (type(self), (self.reason, self.key, self.source))


def layer_index(key: str) -> int:
    """The layer a parameter belongs to: the integer right after a path part in ``LAYER_CONTAINERS``."""
    parts = key.split(".")
    for container, index in itertools.pairwise(parts):
        if container in LAYER_CONTAINERS and index.isdigit():
            return int(index)
    raise ValueError(f"no layer index in parameter name {key!r} (expected e.g. 'model.layers.3.self_attn.q_proj...')")


@dataclass(frozen=True)
class UpdateSpec:
    """Keys (ordered by layer, then name), their shapes and layers: the layout of an update and of its tokens."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layer_of: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.shapes) == len(self.layer_of)):
            raise ValueError(
                f"UpdateSpec needs one shape and layer per key: {len(self.keys)} keys, "
                f"{len(self.shapes)} shapes, {len(self.layer_of)} layers"
            )
        if len(self.keys) == 0:
            raise ValueError("UpdateSpec needs at least one key")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("UpdateSpec keys must be unique")
        order = sorted(zip(self.layer_of, self.keys, strict=True))
        if order != list(zip(self.layer_of, self.keys, strict=True)):
            raise ValueError("UpdateSpec keys must be ordered by layer index, then name")
        widths = {layer: self.layer_width(layer) for layer in self.layers}
        if len(set(widths.values())) != 1:
            raise ValueError(f"every layer must have the same token width, got {widths} (layer -> numel)")

    @classmethod
    def from_parameters(cls, params: Mapping[str, torch.Tensor | np.ndarray]) -> UpdateSpec:
        """The spec of a dict of LoRA parameters (or of an update with the same keys)."""
        keys = sorted(params, key=lambda k: (layer_index(k), k))
        return cls(
            keys=tuple(keys),
            shapes=tuple(tuple(int(d) for d in params[k].shape) for k in keys),
            layer_of=tuple(layer_index(k) for k in keys),
        )

    @property
    def layers(self) -> tuple[int, ...]:
        """The distinct layer indices, increasing: row i of the tokens is layer ``layers[i]``."""
        return tuple(sorted(set(self.layer_of)))

    @property
    def num_layers(self) -> int:
        """Number of tokens (layers that carry LoRA parameters)."""
        return len(self.layers)

    @property
    def token_dim(self) -> int:
        """Width of one token: the number of LoRA parameters in one layer."""
        return self.layer_width(self.layers[0])

    @property
    def num_params(self) -> int:
        """Total number of scalars in an update."""
        return sum(math.prod(shape) for shape in self.shapes)

    def layer_width(self, layer: int) -> int:
        """Number of scalars in one layer's tensors."""
        return sum(math.prod(s) for s, l_ in zip(self.shapes, self.layer_of, strict=True) if l_ == layer)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; inverse of ``from_json``."""
        return {"keys": list(self.keys), "shapes": [list(s) for s in self.shapes], "layer_of": list(self.layer_of)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> UpdateSpec:
        """Rebuild a spec from ``to_json`` output."""
        return cls(
            keys=tuple(str(k) for k in d["keys"]),
            shapes=tuple(tuple(int(x) for x in s) for s in d["shapes"]),
            layer_of=tuple(int(x) for x in d["layer_of"]),
        )


def spec_of(peft_model: peft.PeftModel) -> UpdateSpec:
    """The update spec of a LoRA model (its trainable LoRA parameters)."""
    return UpdateSpec.from_parameters(lora_parameters(peft_model))


# --- validation ---------------------------------------------------------------------------------------------------


def _as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A torch view of a tensor or numpy array (no copy when possible)."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _check_keys(update: UpdateLike, spec: UpdateSpec, source: str | None) -> None:
    missing = [k for k in spec.keys if k not in update]
    if missing:
        raise UpdateError(f"missing ({len(missing)} of {len(spec.keys)} expected keys absent)", missing[0], source)
    expected = set(spec.keys)
    extra = sorted(k for k in update if k not in expected)
    if extra:
        raise UpdateError(f"unexpected key, not in the spec ({len(extra)} extra)", extra[0], source)


def _check_structure(update: UpdateLike, spec: UpdateSpec, source: str | None) -> dict[str, torch.Tensor]:
    """Keys, types, floating dtypes and shapes; returns the update as tensors in spec order."""
    _check_keys(update, spec, source)
    for key in spec.keys:
        value = update[key]
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise UpdateError(f"expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}", key, source)
    for key in spec.keys:
        value = update[key]
        # Check the dtype before converting: numpy has dtypes torch cannot hold (str, object, longdouble), and
        # is_floating_point is False for int, bool and complex.
        ok = value.is_floating_point() if isinstance(value, torch.Tensor) else value.dtype in NUMPY_FLOATS
        if not ok:
            raise UpdateError(f"dtype {value.dtype} is not a real floating type", key, source)
    tensors = {key: _as_tensor(update[key]) for key in spec.keys}
    for key, shape in zip(spec.keys, spec.shapes, strict=True):
        if tuple(tensors[key].shape) != shape:
            raise UpdateError(f"shape {tuple(tensors[key].shape)} != expected {shape}", key, source)
    return tensors


def validate_update(
    update: UpdateLike, spec: UpdateSpec, max_norm: float | None = None, source: str | None = None
) -> None:
    """Raise UpdateError unless ``update`` matches ``spec``, is finite, and has L2 norm <= ``max_norm`` (if given)."""
    tensors = _check_structure(update, spec, source)
    for key, tensor in tensors.items():
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            found = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
            raise UpdateError(f"not finite: {found} of {tensor.numel()} values", key, source)
    if max_norm is not None:
        norm = update_norm(tensors)
        if norm > max_norm:
            raise UpdateError(f"global L2 norm {norm:.6g} > max_norm {max_norm:.6g}", None, source)


# --- arithmetic ---------------------------------------------------------------------------------------------------


def extract_update(before: UpdateLike, after: UpdateLike) -> dict[str, torch.Tensor]:
    """``after - before`` per key, as float32; the key sets and shapes must match."""
    spec = UpdateSpec.from_parameters(before)
    before_t = _check_structure(before, spec, "before")
    after_t = _check_structure(after, spec, "after")
    return {k: (after_t[k].to(torch.float32) - before_t[k].to(torch.float32)).detach() for k in spec.keys}


def apply_update(peft_model: peft.PeftModel, base: UpdateLike, update: UpdateLike) -> None:
    """Set the model's LoRA parameters to ``base + update`` (both validated against the model's spec first)."""
    spec = spec_of(peft_model)
    base_t = _check_structure(base, spec, "base")
    validate_update(update, spec)
    update_t = {k: _as_tensor(update[k]) for k in spec.keys}
    set_lora_parameters(peft_model, {k: base_t[k].to(torch.float32) + update_t[k].to(torch.float32) for k in spec.keys})


def update_norm(update: UpdateLike) -> float:
    """Global L2 norm over all tensors of the update."""
    # Accumulate in float64 so large updates do not lose the small tensors.
    total = sum(float(_as_tensor(v).to(torch.float64).pow(2).sum()) for v in update.values())
    return math.sqrt(total)


# --- layouts ------------------------------------------------------------------------------------------------------


def flatten(update: UpdateLike, spec: UpdateSpec) -> torch.Tensor:
    """The update as tokens: float32 ``(num_layers, token_dim)``, one row per layer in increasing index."""
    tensors = _check_structure(update, spec, None)
    rows = []
    for layer in spec.layers:
        # Keys are already ordered by (layer, name), so this layer's tensors come in sorted key order.
        parts = [
            tensors[k].reshape(-1).to(torch.float32)
            for k, l_ in zip(spec.keys, spec.layer_of, strict=True)
            if l_ == layer
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def unflatten(tokens: torch.Tensor, spec: UpdateSpec) -> dict[str, torch.Tensor]:
    """Exact inverse of ``flatten``: tokens ``(num_layers, token_dim)`` back to a dict in spec order."""
    expected = (spec.num_layers, spec.token_dim)
    if tuple(tokens.shape) != expected:
        raise UpdateError(f"tokens shape {tuple(tokens.shape)} != expected {expected} (num_layers, token_dim)")
    row_of = {layer: i for i, layer in enumerate(spec.layers)}
    offsets = dict.fromkeys(spec.layers, 0)
    out: dict[str, torch.Tensor] = {}
    for key, shape, layer in zip(spec.keys, spec.shapes, spec.layer_of, strict=True):
        n = math.prod(shape)
        start = offsets[layer]
        out[key] = tokens[row_of[layer], start : start + n].reshape(shape).clone()
        offsets[layer] = start + n
    return out


def to_vector(update: UpdateLike, spec: UpdateSpec) -> torch.Tensor:
    """The update as one float32 vector ``(num_params,)``: the tokens, row after row."""
    return flatten(update, spec).reshape(-1)


def from_vector(vector: torch.Tensor, spec: UpdateSpec) -> dict[str, torch.Tensor]:
    """Inverse of ``to_vector``."""
    if tuple(vector.shape) != (spec.num_params,):
        raise UpdateError(f"vector shape {tuple(vector.shape)} != expected ({spec.num_params},)")
    return unflatten(vector.reshape(spec.num_layers, spec.token_dim), spec)


# --- transport and storage ----------------------------------------------------------------------------------------


def to_array_record(update: UpdateLike, spec: UpdateSpec) -> ArrayRecord:
    """A Flower ArrayRecord with one float32 numpy array per spec key, in spec order."""
    from flwr.app import Array, ArrayRecord

    tensors = _check_structure(update, spec, None)
    arrays = {k: Array(np.ascontiguousarray(tensors[k].detach().cpu().to(torch.float32).numpy())) for k in spec.keys}
    return ArrayRecord(array_dict=arrays)


def from_array_record(record: ArrayRecord, spec: UpdateSpec, source: str | None = None) -> dict[str, torch.Tensor]:
    """The update carried by an ArrayRecord, validated against ``spec``."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise UpdateError(f"expected a flwr ArrayRecord, got {type(record).__name__}", None, source)
    update = {k: torch.from_numpy(np.array(array.numpy())) for k, array in record.items()}
    validate_update(update, spec, source=source)
    return {k: update[k] for k in spec.keys}


def save_update(
    path: str | os.PathLike[str], update: UpdateLike, spec: UpdateSpec, metadata: dict[str, str] | None = None
) -> None:
    """Write the update as safetensors, with the spec (JSON) and ``metadata`` in the file header."""
    metadata = dict(metadata or {})
    if SPEC_METADATA_KEY in metadata:
        raise ValueError(f"metadata key {SPEC_METADATA_KEY!r} is reserved for the update spec")
    bad = {k: type(v).__name__ for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str, got {bad}")
    tensors = _check_structure(update, spec, None)
    contiguous = {k: tensors[k].detach().cpu().to(torch.float32).contiguous() for k in spec.keys}
    save_file(contiguous, os.fspath(path), metadata={**metadata, SPEC_METADATA_KEY: json.dumps(spec.to_json())})


def load_update(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], UpdateSpec, dict[str, str]]:
    """Read ``save_update`` output: (update in spec order, spec, the user metadata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no update file at {os.fspath(path)!r}")
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        if SPEC_METADATA_KEY not in metadata:
            raise ValueError(f"{os.fspath(path)!r} has no {SPEC_METADATA_KEY!r} metadata; not written by save_update")
        spec = UpdateSpec.from_json(json.loads(metadata.pop(SPEC_METADATA_KEY)))
        names = f.keys()
        update = {k: f.get_tensor(k) for k in names}
    # Structure only: the caller validates finiteness and norm bounds against the spec it expects.
    tensors = _check_structure(update, spec, os.fspath(path))
    return tensors, spec, metadata
