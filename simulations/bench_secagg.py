"""Secure aggregation vs plain aggregate-then-transform: the same federation through `flwr run`, LGR and time.

    python -m simulations.bench_secagg              # default pair, 8 organizations, 3 rounds, seeds 0,1
    python -m simulations.bench_secagg --quick      # toy pair, 3 organizations, 2 rounds (about 2 minutes)

Both runs use `simulations/secagg.toml` (aggregate-then-transform, plain mean); the plain one only turns
``strategy.secure-aggregation`` off. Coverage is set to ``apply`` in both, so every round's mean is translated and
the comparison measures SecAgg+'s clipping and quantisation, not the coverage check. Reported: the shared LLM's
pooled LGR (exact match and loss) after the last round and each run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedgt.core.run_config import _flatten  # noqa: E402
from fedgt.run.flwr_runner import run_federation  # noqa: E402


def _toml(name: str) -> dict:
    return _flatten(tomllib.loads((ROOT / "simulations" / name).read_text()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default=None, help="comma-separated data seeds (default 0,1; --quick: 0)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = p.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    base = {**(_toml("toy.toml") if args.quick else {}), **_toml("secagg.toml"), "strategy.out-of-coverage": "apply"}
    if args.quick:
        base["federation.num-organizations"] = 3
    runs: dict = {"secagg": {}, "plain": {}}
    for seed in seeds:
        for name, secure in (("secagg", True), ("plain", False)):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run"
                overrides = {**base, "data.seed": seed, "strategy.secure-aggregation": secure, "output.dir": str(out)}
                t0 = time.time()
                rc = run_federation(ROOT, overrides, Path(tmp) / "home", timeout=3600)
                wall = time.time() - t0
                if rc != 0:
                    error = (out / "error.txt").read_text()[-2000:] if (out / "error.txt").is_file() else ""
                    raise SystemExit(f"{name} seed {seed}: flwr exit {rc}: {error}")
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                last = rows[-1]["eval"]
                runs[name][str(seed)] = {"lgr-em": last.get("lgr-em"), "lgr": last.get("lgr"),
                                         "org-em": last.get("org-em"), "public-loss": last.get("public-loss"),
                                         "wall_s": wall, "participants": [r["log"].get("secagg", {}).get("participants")
                                                                          for r in rows[1:]]}
                print(f"{name} seed {seed}: {runs[name][str(seed)]}", flush=True)
    summary = {name: {k: statistics.fmean(v[k] for v in per.values() if v[k] is not None)
                      for k in ("lgr-em", "lgr", "wall_s")} for name, per in runs.items()}
    results = {"command": "python -m simulations.bench_secagg " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores; nothing else ran",
               "date": time.strftime("%Y-%m-%d"), "seeds": seeds, "config": base, "runs": runs, "summary": summary}
    name = "secagg_quick" if args.quick else "secagg"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / f"{name}.md").write_text(render(results))
    print(render(results))
    return results


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def render(r: dict) -> str:
    """Markdown report."""
    lines = ["# Secure aggregation (SecAgg+) vs plain aggregate-then-transform", "", f"Command: `{r['command']}`  ",
             f"Machine: {r['machine']}  ", f"Date: {r['date']}  ",
             f"Seeds {r['seeds']}; scenario `simulations/secagg.toml`"
             + (" on `simulations/toy.toml`" if "model.pair" in r["config"] else " on the default pair")
             + ", coverage `apply`.", "",
             "| aggregation | seed | LGR (EM) | LGR (loss) | wall s | organizations in each round's sum |",
             "|---|---|---|---|---|---|"]
    for name, per in r["runs"].items():
        for seed, v in per.items():
            who = v["participants"] if name == "secagg" else "-"
            lines.append(f"| {name} | {seed} | {_pct(v['lgr-em'])} | {_pct(v['lgr'])} | {v['wall_s']:.0f} | {who} |")
    lines += ["", "| aggregation | mean LGR (EM) | mean LGR (loss) | mean wall s |", "|---|---|---|---|"]
    for name, s in r["summary"].items():
        lines.append(f"| {name} | {_pct(s['lgr-em'])} | {_pct(s['lgr'])} | {s['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
