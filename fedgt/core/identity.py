"""Model identity: sha256 digests that say whether two parties hold the very same TinyLM and LoRA init.

The Grad-Transformer only understands updates of the TinyLM it was trained on, starting from the seeded LoRA init.
Shapes alone cannot tell a site's TinyLM from another one of the same architecture (e.g. one pretrained again on a
different CPU, whose weights differ in the last bits and beyond), so the provider publishes these digests with the
GT (``provider.json``), the server checks its own TinyLM against them and sends them with every train message, and
each site checks its local TinyLM before fine-tuning.

An identity is a flat ``dict[str, str]`` with the fields of ``IDENTITY_KEYS``:

* ``weights``: sha256 of the weight files (``*.safetensors``, ``*.bin``), names and bytes, in sorted order;
* ``tokenizer``: sha256 of the tokenizer files that exist (``tokenizer.json``, ``tokenizer_config.json``, ...);
* ``lora-init``: sha256 of the seeded initial LoRA factors (float32, sorted canonical names);
* ``lora``: the LoRA settings as canonical JSON (readable, so a mismatch shows what differs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import torch

from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters
from fedgt.core.models import load_model

IDENTITY_KEYS: tuple[str, ...] = ("weights", "tokenizer", "lora-init", "lora")
MODEL_KEYS: tuple[str, ...] = ("weights", "tokenizer")  # the model files alone, whatever the LoRA settings
CONFIG_PREFIX = "tiny-id."  # flat keys in a Flower ConfigRecord: "tiny-id.weights", ...

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json")
LABELS = {"weights": "TinyLM weights", "tokenizer": "TinyLM tokenizer", "lora-init": "seeded LoRA init",
          "lora": "LoRA settings"}
_CHUNK = 1 << 20


class IdentityMismatch(ValueError):
    """The local model differs from the published one; ``fields`` lists the differing identity fields."""

    def __init__(self, message: str, fields: Sequence[str]):
        super().__init__(message)
        self.fields = tuple(fields)


def lora_json(lora: LoraSettings) -> str:
    """The LoRA settings as canonical JSON (sorted keys, no spaces)."""
    return json.dumps(asdict(lora), sort_keys=True, separators=(",", ":"))


def weight_files(model_dir: Path) -> list[Path]:
    """The model's weight files, sorted by name."""
    return sorted({p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern) if p.is_file()})


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer files present in the directory, sorted by name."""
    return sorted(p for name in TOKENIZER_FILES if (p := Path(model_dir) / name).is_file())


def files_digest(files: Iterable[Path]) -> str:
    """sha256 over each file's name, size and bytes (the name and size keep file boundaries unambiguous)."""
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes of tensors, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def lora_init_digest(model_dir: Path, lora: LoraSettings) -> str:
    """sha256 of the seeded initial LoRA factors ``attach_lora`` gives this model."""
    # freeze_a only stops A from training after the seeded init; hash every factor (lora_parameters lists the
    # trainable ones, so with freeze_a it would miss A, the only factor the seed decides).
    model = attach_lora(load_model(Path(model_dir))[0], replace(lora, freeze_a=False))
    return tensors_digest(lora_parameters(model))


def _stamp(files: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of each file: a changed file invalidates the cache."""
    return tuple((p.name, (s := p.stat()).st_mtime_ns, s.st_size) for p in files)


def model_identity(model_dir: Path, lora: LoraSettings) -> dict[str, str]:
    """The identity (``IDENTITY_KEYS``) of a local Hugging Face model directory under LoRA settings ``lora``."""
    model_dir = Path(model_dir).expanduser().resolve()
    weights, tokenizer = weight_files(model_dir), tokenizer_files(model_dir)
    if not weights:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {model_dir}")
    if not tokenizer:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {model_dir}")
    config = model_dir / "config.json"
    stamp = _stamp(weights + tokenizer + ([config] if config.is_file() else []))
    return dict(_cached_identity(str(model_dir), stamp, lora))


@lru_cache(maxsize=16)
def _cached_identity(model_dir: str, _stamp: tuple, lora: LoraSettings) -> tuple[tuple[str, str], ...]:
    # A site checks every round; hashing and building the LoRA model again each time would be wasted work.
    path = Path(model_dir)
    identity = {"weights": files_digest(weight_files(path)), "tokenizer": files_digest(tokenizer_files(path)),
                "lora-init": lora_init_digest(path, lora), "lora": lora_json(lora)}
    return tuple(identity.items())


def _describe(key: str, here: str | None, published: str | None) -> str:
    """One clause saying how a field differs (digests shortened; the LoRA JSON shown whole)."""
    label = LABELS.get(key, key)
    if published is None:
        return f"{key}: the provider's manifest has no {label} digest"
    if here is None:
        return f"{key}: no local {label} digest to compare with the provider's manifest"
    verb = "differ" if label.endswith("s") else "differs"
    shown = (here, published) if key == "lora" else (f"sha256 {here[:12]}…", f"{published[:12]}…")
    return f"{key}: {label} {verb} from the provider's manifest ({shown[0]} here vs {shown[1]} published)"


def verify_identity(expected: Mapping[str, str], actual: Mapping[str, str],
                    keys: Sequence[str] = IDENTITY_KEYS) -> None:
    """Raise IdentityMismatch naming every field of ``keys`` that is missing from ``expected`` or differs."""
    bad = [k for k in keys if expected.get(k) is None or expected.get(k) != actual.get(k)]
    if bad:
        lines = "; ".join(_describe(k, actual.get(k), expected.get(k)) for k in bad)
        raise IdentityMismatch(f"model identity mismatch: {lines}. Use the provider's published TinyLM (and the "
                               "run's LoRA settings) unchanged.", bad)


def to_config(identity: Mapping[str, str], prefix: str = CONFIG_PREFIX) -> dict[str, str]:
    """The identity as flat ConfigRecord entries: ``{"tiny-id.weights": ..., ...}``."""
    return {prefix + k: str(identity[k]) for k in IDENTITY_KEYS if k in identity}


def from_config(config: Mapping, prefix: str = CONFIG_PREFIX) -> dict[str, str] | None:
    """The identity carried in a config (fields present only), or None when it carries none."""
    found = {k: str(config[prefix + k]) for k in IDENTITY_KEYS if prefix + k in config}
    return found or None
