"""Round checkpoints for exact resume: written atomically, listed with their sha256, verified on load.

After each round the ServerApp saves ``checkpoints/round-N.pt``: the strategy's state (shared adapters, server
optimizer, central-DP accountant, distillation warm start, each organization's last LLM update), the evaluator's
references, and the server's RNG state. The file goes through ``write_durably`` (temp file, fsync, rename), and its
sha256 is recorded in ``checkpoints/MANIFEST.json``. A resumed run loads the newest checkpoint that verifies. It
skips a damaged one with a warning that names the file and what is wrong, and continues at the next round.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import torch

from fedgt.core.durable import save_durably, write_durably
from fedgt.core.manifest import sha256_file

log = logging.getLogger("fedgt.server")
MANIFEST = "MANIFEST.json"


class ResumeError(RuntimeError):
    """An output folder that cannot be resumed from, or a new run pointed at a previous run's folder."""


def rng_state() -> dict:
    """The server's random state: Python's (Flower samples nodes with it) and torch's (CPU, and CUDA if used)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, server_round: int, state: dict) -> Path:
    """``state`` as ``folder/round-N.pt`` (atomic) with its sha256 in the folder's manifest (atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{server_round}.pt"
    save_durably({"round": server_round, **state}, path)
    manifest = _manifest(folder)
    manifest[path.name] = sha256_file(path)
    write_durably(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return path


def load_checkpoint(path: Path) -> dict:
    """A checkpoint verified against its manifest's sha256; ``ResumeError`` names the file and what is wrong."""
    expected = _manifest(path.parent).get(path.name)
    if expected is None:
        raise ResumeError(f"{path}: not listed in {path.parent / MANIFEST}; refusing an unverified checkpoint")
    actual = sha256_file(path)
    if actual != expected:
        raise ResumeError(f"{path}: sha256 {actual[:12]}… differs from {expected[:12]}… in {MANIFEST} (damaged or "
                          "changed after it was written)")
    try:
        return torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # our own file, hash-verified
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a damaged file
        raise ResumeError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


def latest_checkpoint(folder: Path) -> dict | None:
    """The newest checkpoint in ``folder`` that verifies; damaged ones are skipped with a warning naming them.

    A manifest that cannot be read raises: without it no checkpoint can be trusted, and starting over silently
    would redo (and re-spend the sites' privacy budget on) every round.
    """
    _manifest(folder)
    paths = sorted(folder.glob("round-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)
    for path in paths:
        try:
            return load_checkpoint(path)
        except ResumeError as err:
            log.warning("resume: skipping %s", err)
    return None


def _manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ResumeError(f"{path}: corrupt checkpoint manifest ({err})") from err


def prepare_output(out: Path, resume: bool) -> None:
    """Refuse a previous run's folder unless resuming, and a resume with nothing to resume from."""
    used = out.is_dir() and any(out.iterdir())
    if used and not resume:
        raise ResumeError(f"output.dir {out} holds a previous run; set output.resume = true (`fedgt federate "
                          "--resume`) to continue it, or choose an empty folder")
    if resume and not (out / "config.json").is_file():
        raise ResumeError(f"output.resume: {out} holds no run to resume (no config.json)")


def check_same_run(out: Path, run_config: dict) -> None:
    """A resumed run must have the config it was started with (except output.resume); names the keys that differ."""
    saved = json.loads((out / "run_config.json").read_text()) if (out / "run_config.json").is_file() else None
    if saved is None:
        raise ResumeError(f"output.resume: {out / 'run_config.json'} is missing; cannot check this is the same run")
    keys = sorted(k for k in set(saved) | set(run_config)
                  if k != "output.resume" and saved.get(k) != run_config.get(k))
    if keys:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in keys[:5])
        raise ResumeError(f"output.resume: the run config differs from the one {out} was started with ({diff})")
