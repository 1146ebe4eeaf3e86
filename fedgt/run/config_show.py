"""`fedgt config show`: the effective run config, each value with where it came from.

Layers apply in order, later ones winning: the app's defaults (``[tool.flwr.app.config]`` of its
``pyproject.toml``), the scenario file, then the command-line flags (``--orgs``, ``--rounds``, ``--set``). For a
finished run (``--run DIR``) the values are the ones it recorded in ``run_config.json``, marked where they differ
from today's defaults. The result is validated exactly as a run validates it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedgt.core.run_config import from_run_config, pyproject_run_config, to_run_config

Layer = tuple[str, dict[str, Any]]  # (where the values come from, flat run-config values)


def effective_config(app: Path, layers: Sequence[Layer]) -> list[tuple[str, Any, str]]:
    """Every run-config key as ``(key, value, source)`` after applying ``layers`` over the app's defaults."""
    merged = pyproject_run_config(Path(app) / "pyproject.toml")
    source = dict.fromkeys(merged, "default")
    for name, values in layers:
        merged.update(values)
        source.update(dict.fromkeys(values, name))
    cfg = to_run_config(from_run_config(merged, check_paths=False))  # unknown keys and bad values fail here
    return [(key, cfg[key], source.get(key, "default")) for key in sorted(cfg)]


def recorded_config(app: Path, run_dir: Path) -> list[tuple[str, Any, str]]:
    """A finished run's config (``run_config.json``), each value marked ``run`` where it differs from the default."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run needs the output folder of a fedgt run")
    recorded = json.loads(path.read_text())
    defaults = to_run_config(from_run_config(pyproject_run_config(Path(app) / "pyproject.toml"), check_paths=False))
    return [(key, value, "default" if defaults.get(key) == value else f"run (default {_toml(defaults.get(key))})")
            for key, value in sorted(recorded.items())]


def render(rows: Sequence[tuple[str, Any, str]]) -> str:
    """``key = value  # source`` lines (TOML values: the output is itself a valid scenario file)."""
    width = max((len(f"{k} = {_toml(v)}") for k, v, _ in rows), default=0)
    return "\n".join(f"{f'{k} = {_toml(v)}':<{width}}  # {s}" for k, v, s in rows)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
