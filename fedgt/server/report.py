"""The federation's results table and plot, from the ServerApp's per-round rows."""

from __future__ import annotations

from pathlib import Path


def _mean(rows: list[dict] | None, key: str) -> float | None:
    vals = [r[key] for r in rows or [] if key in r]
    return sum(vals) / len(vals) if vals else None


def mean_scores(scores: list[dict] | None) -> dict[str, float]:
    """The mean of each score over organizations (e.g. the ceiling's loss and exact match); {} for none."""
    return {k: v for k in ("loss", "exact_match") if (v := _mean(scores, k)) is not None}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:  # missing or NaN (e.g. LGR when the ceiling does not move)
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def results_table(rows: list[dict], base: list[dict] | None, ceiling: list[dict] | None, wall_s: float, cfg) -> str:
    """Markdown: the LLM after each round on the organizations' test splits, with the references."""
    s = cfg.strategy
    lines = [f"## Federation: {cfg.federation.num_organizations} organizations, {cfg.federation.num_server_rounds} "
             f"rounds, {s.mode}, {s.aggregator}, rounds={s.rounds}, dp={cfg.dp.mode}"
             + (f" (ε={cfg.dp.epsilon:g}/round)" if cfg.dp.mode != "none" else "")
             + (", central DP" if s.central_dp else ""), "",
             "| LLM after round | org test loss | org test EM | LGR (EM) | LGR (loss) | public loss | accepted | "
             "rejected | declined | server s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, m, trained = r["eval"], r["log"].get("metrics", {}), r["round"] > 0
        name = str(r["round"]) if trained else "0 (untuned LLM)"
        counts = " | ".join(str(m.get(k, "-")) if trained else "-" for k in ("accepted", "rejected", "declined"))
        lines.append(f"| {name} | {_fmt(e.get('org-loss'))} | {_fmt(e.get('org-em'), True)} | "
                     f"{_fmt(e.get('lgr-em'), True)} | {_fmt(e.get('lgr'), True)} | {_fmt(e.get('public-loss'))} | "
                     f"{counts} | {_fmt(m.get('server-seconds')) if trained else '-'} |")
    last = next((r["log"].get("metrics", {}) for r in reversed(rows) if r["round"] > 0), {})
    first = next((r["log"].get("metrics", {}) for r in rows if r["round"] > 0), {})
    own = next((r["own"] for r in reversed(rows) if "own" in r), None)
    references = []
    if "tiny-test-loss" in first:  # only where the sites' policies release their scores
        references.append(f"| each organization's own TinyLM (round 1: one fine-tune from the base, the ceiling's "
                          f"budget) | {_fmt(first.get('tiny-test-loss'))} | {_fmt(first.get('tiny-test-em'), True)} | "
                          "- |")
    if own is not None:
        references.append(f"| each organization's own LLM adapter (the GT's image of its last update; simulation "
                          f"scores it) | {_fmt(own.get('own-loss'))} | {_fmt(own.get('own-em'), True)} | "
                          f"{_fmt(own.get('own-lgr-em'), True)} |")
        references.append(f"| its own adapter on top of the shared LLM | {_fmt(own.get('own-on-shared-loss'))} | "
                          f"{_fmt(own.get('own-on-shared-em'), True)} | "
                          f"{_fmt(own.get('own-on-shared-lgr-em'), True)} |")
    if ceiling:
        references.append(f"| LLM fine-tuned directly on each organization's data (ceiling; simulation only; one "
                          f"fine-tune from the base) | {_fmt(_mean(ceiling, 'loss'))} | "
                          f"{_fmt(_mean(ceiling, 'exact_match'), True)} | 100.0% |")
    if references:
        lines += ["", "| reference | org test loss | org test EM | LGR (EM) |", "|---|---|---|---|", *references]
    if "dp-epsilon-total-max" in last:
        lines.append(f"\nprivacy: largest ε spent by an organization {last['dp-epsilon-total-max']:.2f} "
                     f"(as each reported it at its own δ; each site keeps its own budget)")
    if "dp-central-run-epsilon" in last:
        lines.append(f"\ncentral DP: run ε {last['dp-central-run-epsilon']:.2f} (δ={cfg.dp.delta:g})")
    lines.append(f"\nLGR = (P - P_untuned_LLM) / (P_LLM_fine-tuned - P_untuned_LLM), pooled over organizations. "
                 f"Federation wall time {wall_s:.0f} s.")
    return "\n".join(lines)


def plot_rounds(rows: list[dict], ceiling: list[dict] | None, path: Path) -> None:
    """Organizations' test EM (or loss) of the LLM per round, with the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "org-em" if all("org-em" in r["eval"] for r in rows) else "org-loss"
    xs = [r["round"] for r in rows if key in r["eval"]]
    if not xs:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [r["eval"][key] for r in rows if key in r["eval"]], marker="o", label="shared LLM")
    ref = _mean(ceiling, "exact_match" if key == "org-em" else "loss")
    if ref is not None:
        ax.axhline(ref, ls="--", color="gray", label="LLM fine-tuned directly")
    ax.set_xlabel("round")
    ax.set_ylabel("organizations' test " + ("exact match" if key == "org-em" else "loss"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
