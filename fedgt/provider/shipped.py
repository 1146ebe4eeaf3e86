"""Prepared models and the default provider's Grad-Transformer, shipped in the repository under ``artifacts/``.

Pretraining the default pair takes 8–16 minutes on 2 cores, and float results differ across CPUs, so every
machine would otherwise build other weights. The repository ships the result instead: ``artifacts/MANIFEST.json``
lists each artifact (``models/<preset>-<fingerprint>``, ``provider/<key>/gt``) with the recipe it was built from,
the command that built it, and the sha256 of every file. The folder names carry the recipe's fingerprint, so a
changed recipe (preset, pretraining data, provider settings) no longer finds its artifact and is rebuilt locally;
``tests/test_shipped.py`` fails until ``fedgt prepare --rebuild`` / ``fedgt provide --rebuild`` ship the new one.
On first use an artifact is verified file by file and copied into the cache (``$FEDGT_CACHE``); a damaged file is
an error that names it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from fedgt.core.manifest import DamagedArtifact, sha256_file, write_manifest

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
MANIFEST = "MANIFEST.json"
SKIP = ("train_state.pt", "MANIFEST.json")  # GT training resume state (large, unused by the GT); the cache's list


def read_manifest(root: Path = ARTIFACTS) -> dict:
    """The manifest (``{"artifacts": {key: entry}}``); empty when nothing is shipped."""
    path = root / MANIFEST
    if not path.is_file():
        return {"artifacts": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DamagedArtifact(f"{path}: not valid JSON ({err})") from err


def verify(key: str, root: Path = ARTIFACTS) -> dict:
    """Check every file of a shipped artifact against its sha256; its manifest entry."""
    entry = read_manifest(root)["artifacts"].get(key)
    if entry is None:
        raise KeyError(f"{key} is not shipped in {root / MANIFEST}")
    for name, digest in entry["files"].items():
        path = root / key / name
        if not path.is_file():
            raise DamagedArtifact(f"{path}: missing (listed in {root / MANIFEST})")
        if sha256_file(path) != digest:
            raise DamagedArtifact(f"{path}: sha256 differs from {root / MANIFEST}; the file is damaged or was "
                                  "changed without `fedgt prepare --rebuild` / `fedgt provide --rebuild`")
    return entry


def install(key: str, dest: Path, root: Path = ARTIFACTS) -> bool:
    """Copy shipped artifact ``key`` into ``dest`` after verifying it (atomic: temp dir, then rename)."""
    if key not in read_manifest(root)["artifacts"]:
        return False
    entry = verify(key, root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    for name in entry["files"]:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / key / name, tmp / name)
    write_manifest(tmp)  # the cached copy is verified on every load, like one built here
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return True


def ship(src: Path, key: str, command: str, recipe: dict, root: Path = ARTIFACTS) -> dict:
    """Copy a built artifact into the repository and record it (files, sha256, recipe, command) in the manifest."""
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.name not in SKIP)
    if not files:
        raise FileNotFoundError(f"nothing to ship in {src}")
    out = root / key
    if out.exists():
        shutil.rmtree(out)
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, out / name)
    manifest = read_manifest(root)
    # Older artifacts of the same kind (another recipe's fingerprint) are replaced.
    kind = key.rsplit("-", 1)[0] if key.startswith("models/") else "provider/"
    for old in [k for k in manifest["artifacts"] if k != key and k.startswith(kind)
                and (not key.startswith("models/") or k.rsplit("-", 1)[0] == kind)]:
        del manifest["artifacts"][old]
        shutil.rmtree(root / (Path(old).parent if old.endswith("/gt") else Path(old)), ignore_errors=True)
    manifest["artifacts"][key] = {"files": {n: sha256_file(out / n) for n in files}, "recipe": recipe,
                                  "command": command, "built": time.strftime("%Y-%m-%d")}
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest["artifacts"][key]


def install_all(cache: Path, root: Path = ARTIFACTS) -> list[str]:
    """Install every shipped artifact the cache lacks (before ``flwr run``: the apps read only the cache)."""
    done = []
    for key in read_manifest(root)["artifacts"]:
        dest = cache / key
        marker = "fedgt_prepared.json" if key.startswith("models/") else "provider.json"
        if not (dest / marker).is_file() and install(key, dest, root):
            done.append(key)
    return done
