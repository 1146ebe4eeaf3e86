"""Gain-recovered metrics of the benchmark: LGR (vs the untuned LLM) and the paper's PGR (vs the tuned TinyLM).

For a performance P (exact match, or loss — where lower is better the ratio is the same, signs cancel):
    LGR = (P - P_llm_base) / (P_llm_ft - P_llm_base)      PGR = (P - P_tiny_ft) / (P_llm_ft - P_tiny_ft)
Pooled over domains, numerators and denominators are summed first (a domain where fine-tuning gained
little weighs little), as in the calibration reports. Undefined ratios (zero denominator) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def gain_ratio(p: float, floor: float, ceiling: float) -> float:
    """(p - floor) / (ceiling - floor); NaN when the ceiling equals the floor."""
    den = ceiling - floor
    return (p - floor) / den if den != 0 else math.nan


def pooled_ratio(ps: Sequence[float], floors: Sequence[float], ceilings: Sequence[float]) -> float:
    """sum(p - floor) / sum(ceiling - floor) over domains."""
    den = sum(c - f for c, f in zip(ceilings, floors, strict=True))
    num = sum(p - f for p, f in zip(ps, floors, strict=True))
    return num / den if den != 0 else math.nan


def summarize(domains: Mapping[str, Mapping[str, Mapping[str, float]]], methods: Sequence[str]) -> dict:
    """Per-method pooled LGR/PGR in loss and accuracy from ``domains[domain][method] = {"loss", "exact_match"}``.

    Each domain needs ``llm_base``, ``llm_ft`` and ``tiny_ft`` rows. Returns ``{method: {"lgr", "pgr",
    "lgr_acc", "pgr_acc", "loss", "acc"}}`` (``loss``/``acc``: plain means over domains).
    """
    out = {}
    names = list(domains)
    for m in methods:
        rows = [domains[d] for d in names if m in domains[d]]
        if not rows:
            continue
        entry = {}
        for key, metric in (("", "loss"), ("_acc", "exact_match")):
            usable = [r for r in rows if all(metric in r[x] for x in (m, "llm_base", "llm_ft", "tiny_ft"))]
            p = [r[m][metric] for r in usable]
            entry["lgr" + key] = pooled_ratio(p, [r["llm_base"][metric] for r in usable],
                                              [r["llm_ft"][metric] for r in usable]) if usable else math.nan
            entry["pgr" + key] = pooled_ratio(p, [r["tiny_ft"][metric] for r in usable],
                                              [r["llm_ft"][metric] for r in usable]) if usable else math.nan
            entry["acc" if key else "loss"] = sum(p) / len(p) if p else math.nan
        out[m] = entry
    return out


def per_domain(row: Mapping[str, Mapping[str, float]], method: str) -> dict[str, float]:
    """LGR/PGR of one method on one domain, in loss and accuracy."""
    out = {}
    for key, metric in (("", "loss"), ("_acc", "exact_match")):
        if all(metric in row.get(x, {}) for x in (method, "llm_base", "llm_ft", "tiny_ft")):
            p = row[method][metric]
            out["lgr" + key] = gain_ratio(p, row["llm_base"][metric], row["llm_ft"][metric])
            out["pgr" + key] = gain_ratio(p, row["tiny_ft"][metric], row["llm_ft"][metric])
    return out
