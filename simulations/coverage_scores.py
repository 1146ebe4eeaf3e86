"""Coverage scores of the default GT for organizations near and far from what the provider curated.

    python -m simulations.coverage_scores [--orgs 8]
Each organization fine-tunes the default TinyLM once at the run's default budget, as a site does in round 1;
its update is scored by the default GT's coverage (``fedgt.provider.coverage``). Organizations: the built-in
settings (same distribution, held-out combination, held-out family) and English text (chatterbot-corpus
categories). Prints a table and writes docs/results/coverage_scores.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedgt.core.data import DomainData, public_text_domains
from fedgt.core.org_data import simulated_organizations
from fedgt.core.run_config import from_run_config, pyproject_run_config
from fedgt.provider.provision import provide, provider_config_for, resolve_model
from fedgt.provider.shadow import LoraTuner
from fedgt.server.translator import Translator

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("same_distribution", "held_out_combination", "held_out_family")


def main() -> None:
    """Score each organization's round-1 update; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=8, help="organizations per setting")
    args = parser.parse_args()
    base = pyproject_run_config(ROOT / "pyproject.toml")
    cfg = from_run_config(base)
    translator = Translator(provide(provider_config_for(cfg), progress=False), "cpu")
    tuner = LoraTuner(resolve_model(cfg.model_names()[0]), cfg.lora_settings())
    groups: dict[str, list[DomainData]] = {
        s: list(simulated_organizations(from_run_config({**base, "data.setting": s}), args.orgs)) for s in SETTINGS}
    groups["english_text"] = public_text_domains()[:args.orgs]
    scores = {}
    for group, orgs in groups.items():
        updates = [tuner.tokens(tuner.run(list(o.train), cfg.finetune_config()).update) for o in orgs]
        scores[group] = {o.name: float(translator.coverage(u[None])[0]) for o, u in zip(orgs, updates, strict=True)}
    threshold = cfg.strategy.coverage_threshold
    print(f"| organizations | coverage score: min / median / max | outside (> {threshold:g}) |\n|---|---|---|")
    for group, by_org in scores.items():
        v = sorted(by_org.values())
        print(f"| {group} | {v[0]:.2f} / {statistics.median(v):.2f} / {v[-1]:.2f} | "
              f"{sum(x > threshold for x in v)} of {len(v)} |")
    out = ROOT / "docs" / "results" / "coverage_scores.json"
    out.write_text(json.dumps({"threshold": threshold, "reference": translator.coverage.reference,
                               "curated": len(translator.coverage.keys), "scores": scores}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
