"""A comparison page for several runs: ``fedgt report RUN_A RUN_B ...`` or a ``bench_strategies`` result JSON.

One self-contained HTML file: the settings that differ between the runs, each run's scores after its last round
(mean ± std over seeds where the source has seeds), and each score per round, one line per run, in embedded plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedgt.server.html_parts import esc, fmt, page, png_img, table
from fedgt.server.html_report import read_rows

# score -> (label, a percentage?, higher is better?)
METRICS = {"lgr-em": ("LGR (EM)", True, True), "lgr": ("LGR (loss)", True, True),
           "org-em": ("org test EM", True, True), "org-loss": ("org test loss", False, False),
           "public-loss": ("public loss", False, False), "server_s": ("server s", False, False)}
Stat = dict[str, float]  # {"mean": m, "std": s (absent for one run), "n": seeds}
Series = dict[str, list[dict[str, Stat]]]  # run name -> its rounds (1, 2, ...) -> score -> Stat


def _stat(x) -> Stat | None:
    if isinstance(x, dict) and isinstance(x.get("mean"), int | float):
        return x
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return {"mean": float(x), "n": 1}
    return None


def runs_from_dirs(dirs: list[Path]) -> tuple[Series, dict[str, dict]]:
    """Each run folder's rounds 1.. (its scores) and its run config, named by folder (parent/folder where needed)."""
    names = [Path(d).resolve().name for d in dirs]
    series, configs = {}, {}
    for d in dirs:
        d = Path(d)
        name = d.resolve().name if names.count(d.resolve().name) == 1 else f"{d.resolve().parent.name}/{d.name}"
        rows = [r for r in read_rows(d) if r["round"] > 0]
        series[name] = [{k: s for k in METRICS if (s := _stat(
            (r.get("log") or {}).get("server_s") if k == "server_s" else r.get("eval", {}).get(k))) is not None}
            for r in rows]
        path = d / "run_config.json"
        configs[name] = json.loads(path.read_text()) if path.is_file() else {}
    return series, configs


def runs_from_bench(results: dict) -> tuple[Series, dict[str, Stat]]:
    """A ``bench_strategies`` result: each strategy's rounds (mean ± std over seeds) and the references."""
    if "summary" not in results or "runs" not in results["summary"]:
        raise ValueError("not a bench_strategies result: it has no summary.runs")
    summary = results["summary"]
    series = {name: [{k: s for k in METRICS if (s := _stat(r.get(k))) is not None} for r in rows]
              for name, rows in summary["runs"].items()}
    refs = {name: s for name, ref in summary.get("references", {}).items() if (s := _stat(ref.get("lgr-em")))}
    return series, refs


def _cell(s: Stat | None, pct: bool) -> str:
    if s is None:
        return "-"
    std = s.get("std")
    return fmt(s["mean"], pct) + (f" ± {fmt(std, pct)}" if std is not None and s.get("n", 1) > 1 else "")


def _plot(series: Series, key: str) -> str:
    label = METRICS[key][0]
    bands = len(series) <= 4  # ± std bands only where they stay readable

    def draw(ax) -> None:
        import matplotlib

        colors = matplotlib.colormaps["tab20"].colors
        for i, (name, rows) in enumerate(series.items()):
            pts = [(j + 1, r[key]) for j, r in enumerate(rows) if key in r]
            if not pts:
                continue
            xs, stats = zip(*pts, strict=True)
            means = [s["mean"] for s in stats]
            ax.plot(xs, means, marker="o", label=name, color=colors[i % len(colors)])
            if bands and all("std" in s for s in stats):
                ax.fill_between(xs, [m - s["std"] for m, s in zip(means, stats, strict=True)],
                                [m + s["std"] for m, s in zip(means, stats, strict=True)], alpha=0.15,
                                color=colors[i % len(colors)])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))

    return png_img(draw, f"{label} per round", f"plot-{key}", (9.0, 3.6))


def _rank(rows: list[dict[str, Stat]], key: str) -> float:
    """Sort key: the best last-round score first, runs without it last."""
    s = rows[-1].get(key) if rows else None
    if s is None:
        return math.inf
    return -s["mean"] if METRICS[key][2] else s["mean"]


def write_comparison(series: Series, out: Path, title: str, configs: dict[str, dict] | None = None,
                     refs: dict[str, Stat] | None = None, notes: str = "") -> Path:
    """Write the comparison page of ``series`` to ``out``; its path."""
    if not series:
        raise ValueError("nothing to compare: no runs")
    refs = refs or {}
    keys = [k for k in METRICS if any(k in r for rows in series.values() for r in rows)]
    order = sorted(series, key=lambda n: _rank(series[n], keys[0]))
    parts = [f"<h1>{esc(title)}</h1>"]
    if notes:
        parts.append(f"<p class=note>{esc(notes)}</p>")
    if configs:
        every = sorted({k for c in configs.values() for k in c})
        differ = [k for k in every if len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
        parts += ["<h2>Settings that differ</h2>",
                  table(["key", *configs], [[k, *(configs[n].get(k, "-") for n in configs)] for k in differ],
                        id="differ") if differ else "<p>The runs share every setting.</p>"]
    parts += ["<h2>After the last round</h2>",
              table(["run", "rounds", *(METRICS[k][0] for k in keys)],
                    [[n, len(series[n]), *(_cell(series[n][-1].get(k) if series[n] else None, METRICS[k][1])
                                           for k in keys)] for n in order], set(range(1, len(keys) + 2)), id="last")]
    if refs:
        parts += ["<h3>References (LGR in EM)</h3>",
                  table(["reference", "LGR (EM)"], [[n, _cell(s, True)] for n, s in refs.items()], {1}, id="refs")]
    parts.append("<h2>Per round</h2>")
    parts += [_plot(series, k) for k in keys if k in ("lgr-em", "lgr", "org-loss")]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(title, parts))
    return out


def compare(paths: list[Path], out: Path | None = None) -> Path:
    """The comparison page of run folders, or of one ``bench_strategies`` JSON (written next to it as .html)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].suffix == ".json":
        results = json.loads(paths[0].read_text())
        series, refs = runs_from_bench(results)
        notes = f"{results.get('command', '')} — {results.get('machine', '')}, {results.get('date', '')}; " \
                f"{len(results.get('seeds', {}))} seeds (mean ± std)"
        return write_comparison(series, out or paths[0].with_suffix(".html"), "Aggregation strategies compared",
                                refs=refs, notes=notes)
    series, configs = runs_from_dirs(paths)
    return write_comparison(series, out or Path("comparison.html"), f"{len(series)} fedgt runs compared", configs)
