"""sha256 manifests: an artifact folder lists every file it holds with its digest, and is verified before use.

Prepared models, Grad-Transformer folders and installed artifacts carry ``MANIFEST.json`` (``{"files": {relative
path: sha256}}``); curation shards carry their digest in the curation manifest; round checkpoints in their own.
Verification reads every listed file once per process and state (size, mtime), so loading a model in every
client round does not rehash it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from fedgt.core.durable import write_durably

MANIFEST = "MANIFEST.json"
log = logging.getLogger("fedgt")
_verified: dict[Path, tuple] = {}  # folder -> the (name, size, mtime) stamps it verified with
_unlisted: set[Path] = set()  # folders already warned about (no manifest)


class DamagedArtifact(ValueError):
    """A file whose bytes differ from its manifest, a listed file that is missing, or an unreadable manifest."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, expected: str, listed_in: Path) -> None:
    """``DamagedArtifact`` naming ``path`` unless it exists and its sha256 is ``expected``."""
    if not path.is_file():
        raise DamagedArtifact(f"{path}: missing (listed in {listed_in})")
    actual = sha256_file(path)
    if actual != expected:
        raise DamagedArtifact(f"{path}: sha256 {actual[:12]}… differs from {expected[:12]}… listed in {listed_in}; "
                              "the file is damaged or was changed after it was written")


def write_manifest(folder: Path, skip: Iterable[str] = ()) -> dict:
    """List every file under ``folder`` (except ``skip`` names) with its sha256 in ``folder/MANIFEST.json``."""
    folder = Path(folder)
    skip = {MANIFEST, *skip}
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in skip and not p.name.startswith(".")}
    manifest = {"files": files}
    write_durably(folder / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    _verified.pop(folder.resolve(), None)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """A folder's manifest; None when it has none; ``DamagedArtifact`` when it cannot be read."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedArtifact(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DamagedArtifact(f"{path}: no 'files' table of relative path -> sha256")
    return manifest


def verify_folder(folder: Path, what: str = "artifact") -> bool:
    """Check every file a folder's manifest lists; False (and a warning) when it has no manifest."""
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    if manifest is None:
        if folder not in _unlisted:
            log.warning("%s %s has no %s: its files cannot be verified", what, folder, MANIFEST)
            _unlisted.add(folder)
        return False
    stamps = tuple(_stamp(folder / name) for name in sorted(manifest["files"]))
    if _verified.get(folder) == stamps:
        return True
    for name, digest in manifest["files"].items():
        check_file(folder / name, digest, folder / MANIFEST)
    _verified[folder] = stamps
    return True


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (path.name, -1, -1)
    return (path.name, st.st_size, st.st_mtime_ns)
