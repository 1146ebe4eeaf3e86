"""`report.html`: one self-contained page for a run (no network; plots embedded), written after every run.

It shows the run's status and configuration, quality per round (the shared LLM; in simulation also each
organization's own LLM adapter, its own TinyLM and the ceiling), time per round (server, GT, evaluation, sites),
each organization's scores and its ε ledger over rounds, and every reply: accepted, rejected or declined with its
reason, or a transport error, with what crossed the network (tensor names, shapes and bytes; the metrics released
and their values). Read from the run folder only: ``metrics.jsonl``, ``run_config.json`` and ``summary.json``.
``fedgt report RUN_DIR`` writes it again for any finished run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fedgt.server.html_parts import Raw, esc, fmt, page, png_img, table


def read_rows(run_dir: Path) -> list[dict]:
    """The run's per-round rows (``metrics.jsonl``), or FileNotFoundError naming what is missing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: fedgt report needs the output folder of a fedgt run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the run's own files; its path."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    config, summary = _json(run_dir / "run_config.json"), _json(run_dir / "summary.json")
    ceiling = summary.get("ceiling") or {}
    parts = [f"<h1>fedgt run <code>{esc(run_dir.name)}</code></h1>", _status(summary, rows),
             "<h2>Quality per round</h2>", _rounds_table(rows)]
    if any(_has(r, k) for r in rows for k in ("org-em", "org-loss", "public-loss")):
        parts.append(_quality_plot(rows, ceiling))
    if any("own" in r or _tiny(r) for r in rows) or ceiling:
        parts += ["<h3>Per-organization references (means over organizations)</h3>", _references_table(rows, ceiling)]
    parts += ["<h2>Time per round</h2>", _times_table(rows)]
    parts += ["<h2>Organizations in the last round</h2>", _orgs_table(rows)]
    ledger = _ledger(rows)
    parts += ["<h2>Each organization's privacy ledger (ε spent, as it reported it)</h2>",
              _ledger_table(ledger, config.get("dp.mode"))]
    if any(v for per in ledger.values() for v in per.values()):
        parts.append(_ledger_plot(ledger))
    parts += ["<h2>Replies: what left each organization and what the server did with it</h2>", _replies(rows)]
    parts += ["<h2>Configuration</h2>",
              table(["key", "value"], [[k, config[k]] for k in sorted(config)], id="config")]
    out = run_dir / "report.html"
    out.write_text(page(f"fedgt run {run_dir.name}", parts))
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _has(row: dict, key: str) -> bool:
    v = row.get("eval", {}).get(key)
    return isinstance(v, int | float) and math.isfinite(v)


def _tiny(row: dict) -> dict:
    m = (row.get("log") or {}).get("metrics", {})
    return {k: m[k] for k in ("tiny-test-loss", "tiny-test-em") if k in m}


def _status(summary: dict, rows: list[dict]) -> str:
    done = max((r["round"] for r in rows), default=0)
    text = f"{done} of {summary.get('rounds', '?')} rounds, {summary.get('organizations', '?')} organizations"
    if summary.get("wall_s") is not None:
        text += f", {summary['wall_s']:.0f} s"
    if summary.get("stopped"):
        text += f". <span class=bad>Stopped early: {esc(summary['stopped'])}</span>"
    return f"<p id='status'>{text}</p>"


def _fate(log: dict) -> str:
    if not log:
        return "-"
    if log.get("skipped"):
        return "skipped: " + str(log["skipped"])
    return "unchanged" if log.get("llm-unchanged") else "applied"


def _rounds_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ev, log = r.get("eval", {}), r.get("log") or {}
        counts = [len(log.get(k, [])) if log else "-" for k in ("accepted", "rejected", "declined")]
        name = "0 (untuned)" if r["round"] == 0 else r["round"]
        body.append([name, fmt(ev.get("org-loss")), fmt(ev.get("org-em"), True), fmt(ev.get("lgr-em"), True),
                     fmt(ev.get("lgr"), True), fmt(ev.get("public-loss")), *counts, _fate(log)])
    return table(["round", "org test loss", "org test EM", "LGR (EM)", "LGR (loss)", "public loss", "accepted",
                  "rejected", "declined", "the shared LLM"], body, set(range(9)), id="rounds")


def _references_table(rows: list[dict], ceiling: dict) -> str:
    body = []
    for r in rows:
        if r["round"] == 0:
            continue
        own, tiny = r.get("own") or {}, _tiny(r)
        body.append([r["round"], fmt(own.get("own-loss")), fmt(own.get("own-em"), True),
                     fmt(own.get("own-on-shared-loss")), fmt(own.get("own-on-shared-em"), True),
                     fmt(tiny.get("tiny-test-loss")), fmt(tiny.get("tiny-test-em"), True),
                     fmt(ceiling.get("loss")), fmt(ceiling.get("exact_match"), True)])
    return (table(["round", "own LLM adapter loss", "EM", "own adapter on the shared LLM loss", "EM",
                   "own TinyLM loss", "EM", "ceiling loss", "EM"], body, set(range(9)), id="references")
            + "<p class=note>Own LLM adapter: the GT's image of the organization's update alone. Own TinyLM: its "
              "fine-tuned TinyLM on its test split, where its policy releases that score. Ceiling: the LLM "
              "fine-tuned directly on each organization's data (simulation only).</p>")


def _quality_plot(rows: list[dict], ceiling: dict) -> str:
    em = any(_has(r, "org-em") and r["eval"]["org-em"] > 0 for r in rows)
    key, own_key, tiny_key, ceil_key = ("org-em", "own-em", "tiny-test-em", "exact_match") if em else \
        ("org-loss", "own-loss", "tiny-test-loss", "loss")
    if not any(_has(r, key) for r in rows):  # a deployment: no organization test splits on the server
        key = "public-loss"
    ylabel = {"org-em": "organizations' test exact match", "org-loss": "organizations' test loss",
              "public-loss": "loss on public text"}[key]

    def draw(ax) -> None:
        xs = [r["round"] for r in rows if _has(r, key)]
        ax.plot(xs, [r["eval"][key] for r in rows if _has(r, key)], marker="o", label="shared LLM")
        for label, get in (("own LLM adapter", lambda r: (r.get("own") or {}).get(own_key)),
                           ("own adapter on the shared LLM", lambda r: (r.get("own") or {}).get(
                               own_key.replace("own-", "own-on-shared-"))),
                           ("own TinyLM", lambda r: _tiny(r).get(tiny_key))):
            pts = [(r["round"], get(r)) for r in rows if isinstance(get(r), int | float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", ls="--", label=label)
        if isinstance(ceiling.get(ceil_key), int | float):
            ax.axhline(ceiling[ceil_key], ls=":", color="gray", label="LLM fine-tuned directly (ceiling)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)

    return png_img(draw, "quality per round", "quality-plot")


def _times_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        log = r.get("log") or {}
        if r["round"] == 0:
            continue
        m = log.get("metrics", {})
        site = [x["seconds"] for x in log.get("received", []) if isinstance(x.get("seconds"), int | float)]
        body.append([r["round"], fmt(log.get("server_s", m.get("server-seconds"))), fmt(m.get("gt-seconds")),
                     fmt(r.get("eval_s")), fmt(statistics.median(site)) if site else "-",
                     fmt(max(site)) if site else "-"])
    return table(["round", "server s (round)", "GT + aggregation s", "evaluation s", "site s (median)", "site s (max)"],
                 body, set(range(6)), id="times") + (
        "<p class=note>Site s: from the round's request to the site's reply (its clock): queueing and its "
        "fine-tune.</p>")


def _orgs_table(rows: list[dict]) -> str:
    per = [(r["round"], r["eval"]["orgs"]) for r in rows if r.get("eval", {}).get("orgs")]
    if not per:
        return "<p>No organization test splits on the server (a deployment scores public text only).</p>"
    last = per[-1][1]
    keys = sorted({k for s in last.values() for k in s})
    metric = "exact_match" if any(s.get("exact_match") for _, orgs in per for s in orgs.values()) else "loss"
    over_rounds = table(["organization", *(f"round {k}" for k, _ in per)],
                        [[name, *(fmt(orgs.get(name, {}).get(metric)) for _, orgs in per)] for name in last],
                        set(range(1, len(per) + 1)), id="orgs-rounds")
    return (table(["organization", *keys], [[name, *(fmt(s.get(k)) for k in keys)] for name, s in last.items()],
                  set(range(1, len(keys) + 1)), id="orgs")
            + f"<h3>The shared LLM's {esc(metric)} on each organization's test split, per round</h3>" + over_rounds)


def _ledger(rows: list[dict]) -> dict[str, dict[int, float]]:
    """node (with its partition where released) -> round -> the ε total it reported."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        for reply in (r.get("log") or {}).get("received", []):
            m = reply.get("values", {}).get("metrics", {})
            if isinstance(m.get("dp-epsilon-total"), int | float):
                name = str(reply["node"]) + (f" (org {m['sim-partition-id']:g})" if "sim-partition-id" in m else "")
                out.setdefault(name, {})[r["round"]] = m["dp-epsilon-total"]
    return out


def _ledger_table(ledger: dict[str, dict[int, float]], dp_mode: str | None) -> str:
    if not ledger:
        return f"<p>No reply reported an ε spent (this run requested dp.mode = {esc(dp_mode)}).</p>"
    rounds = sorted({k for per in ledger.values() for k in per})
    return table(["node", *(f"round {k}" for k in rounds)],
                 [[name, *(fmt(per.get(k)) for k in rounds)] for name, per in sorted(ledger.items())],
                 set(range(1, len(rounds) + 1)), id="ledger")


def _ledger_plot(ledger: dict[str, dict[int, float]]) -> str:
    def draw(ax) -> None:
        for name, per in sorted(ledger.items()):
            ax.plot(sorted(per), [per[k] for k in sorted(per)], marker="o", label=name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("ε spent (total)")
        ax.legend(fontsize=7)

    return png_img(draw, "ε per organization", "ledger-plot", (6.4, 3.0))


def _replies(rows: list[dict]) -> str:
    out = []
    for r in rows:
        log = r.get("log")
        if not log:
            continue
        reasons = {x["node"]: ("rejected", x.get("reason", "")) for x in log.get("rejected", [])}
        reasons.update({x["node"]: ("declined", x.get("reason", "")) for x in log.get("declined", [])})
        body = []
        for reply in log.get("received", []):
            node = reply["node"]
            fate, why = reasons.get(node, ("transport error", "") if reply.get("error") else
                                    ("accepted", "") if node in log.get("accepted", []) else ("left out", ""))
            tensors = [(k, s) for rec in reply.get("arrays", {}).values() for k, s in rec.items()]
            size = reply.get("bytes", sum(4 * math.prod(s) for _, s in tensors))  # float32 where not logged
            shapes = Raw("<details><summary>" + esc(f"{len(tensors)} tensors") + "</summary>" + "<br>".join(
                esc(f"{k} {tuple(s)}") for k, s in tensors) + "</details>") if tensors else "-"
            values = {k: v for rec in reply.get("values", {}).values() for k, v in rec.items()}
            names = [m for names in reply.get("metrics", {}).values() for m in names]
            metrics = ", ".join(f"{m}={fmt(values[m])}" if m in values else m for m in names) or "-"
            body.append([node, Raw(f"<span class=bad>{esc(fate)}</span>" if fate != "accepted" else fate), why,
                         shapes, f"{size:,}", metrics, fmt(reply.get("seconds"))])
        if "secagg" in log:
            body.append(["all", "secure sum", f"{log['secagg'].get('participants')} organizations under SecAgg+; no "
                         "single update was readable", "-", "-", "-", "-"])
        out.append(f"<h3>Round {r['round']}</h3>" + table(["node", "fate", "reason", "tensors", "bytes",
                                                           "metrics released", "site s"], body, {4, 6}))
    return "".join(out) or "<p>No rounds ran.</p>"
