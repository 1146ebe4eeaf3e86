"""Run the app with the real Flower CLI (``flwr run``) on a local simulation SuperLink, and clean up after it.

``flwr run`` starts a detached local SuperLink (simulation mode, Ray) the first time and leaves it running. This
runner gives it its own ``FLWR_HOME`` (so a user's ``~/.flwr`` is untouched), sets the federation size with
``--federation-config``, validates the run config before anything starts, and stops that SuperLink afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedgt.core.models import cache_dir
from fedgt.core.run_config import from_run_config, pyproject_run_config
from fedgt.provider.shipped import install_all


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        if '"' in v:
            raise ValueError(f"run config value {v!r} contains a double quote")
        return f'"{v}"'
    return repr(v)


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """``k=v`` pairs as ``flwr run --run-config`` parses them."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())


def _superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of local SuperLinks started with this FLWR_HOME (their log file lives under it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in args[:2]) and any(str(flwr_home).encode() in a for a in args):
            pids.append(int(proc.name))
    return pids


def stop_local_superlink(flwr_home: Path, timeout: float = 10.0) -> int:
    """Stop the local SuperLink (and its process group) of ``flwr_home``; returns how many were stopped."""
    pids = _superlink_pids(flwr_home)
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                if not _alive(pid):
                    break
                time.sleep(0.2)
            if not _alive(pid):
                break
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for ``flwr``: offline flags, its own FLWR_HOME and local-SuperLink ports, this venv's bin on PATH.

    Own ports: ``flwr run`` reuses whatever local SuperLink answers on its port, so a SuperLink left by another
    FLWR_HOME (started with another environment) would otherwise run this app.
    """
    env = os.environ.copy()
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_federation(app_dir: Path, overrides: Mapping[str, Any], flwr_home: Path, cpus_per_org: int = 1,
                   timeout: float | None = None, stream: bool = True, ray_address: str | None = None) -> int:
    """``flwr run APP --federation-config ... --run-config ...`` with num-supernodes from the run config.

    ``ray_address`` (e.g. ``head-node:6379``): run the organizations on an existing Ray cluster. Flower's Ray
    backend calls ``ray.init()``, which joins the cluster named by ``RAY_ADDRESS``; the cluster's nodes need this
    package installed and the prepared models under the same ``FEDGT_CACHE`` path.
    """
    app_dir = Path(app_dir).resolve()
    cfg = from_run_config({**pyproject_run_config(app_dir / "pyproject.toml"), **overrides})  # fail before starting
    install_all(cache_dir())  # the shipped pair and GT: the apps read only the cache (a FAB carries no weights)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flwr_env(flwr_home)
    stop_local_superlink(flwr_home)
    n = cfg.federation.num_organizations
    fed = f"num-supernodes={n} client-resources-num-cpus={cpus_per_org}"
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # joining a cluster: Ray refuses num_cpus in ray.init
    else:
        fed += f" init-args-num-cpus={os.cpu_count() or 1}"
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "--federation-config", fed]
    if overrides:
        cmd += ["--run-config", run_config_arg(overrides)]
    if stream:
        cmd.append("--stream")
    try:
        return subprocess.run(cmd, env=env, timeout=timeout, check=False).returncode
    finally:
        stop_local_superlink(flwr_home)
