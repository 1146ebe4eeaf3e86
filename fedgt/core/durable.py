"""Files that survive a crash: written whole or not at all, and on disk before the call returns."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a torn one.

    Temp file in the same folder, fsync, rename over ``path``, fsync the folder (so the rename itself survives).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_durably(obj: object, path: Path) -> None:
    """``torch.save`` through ``write_durably``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_durably(path, buffer.getvalue())
