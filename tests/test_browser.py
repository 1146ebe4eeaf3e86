"""The run report in a real browser: a toy federation's report.html opened in headless Chromium (Debian's).

Slow (about 2 minutes): a real ``flwr run`` writes the report, Chromium renders it offline, and the test reads the
page as the browser built it (``--dump-dom``) and looks at its screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedgt.core.run_config import load_toml, pyproject_run_config, to_run_config
from fedgt.run.flwr_runner import run_federation
from fedgt.server.compare_report import compare

ROOT = Path(__file__).resolve().parents[1]
C0 = np.array([31, 119, 180])  # matplotlib's first line colour: the shared LLM's line, the first ε line


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("this test needs Debian's chromium (apt-get install chromium) or CHROMIUM=/path/to/chrome")
    return path


def browse(page: Path, out: Path, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file with the network cut off (nothing may load from it)."""
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,3000",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={out / 'profile'}", *mode]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to sandbox itself as root (CI containers)
    return subprocess.run([chromium(), *flags, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, check=True, cwd=out)


def blue_pixels(png: Path) -> int:
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(img - C0).sum(axis=-1) < 30).sum())


@pytest.mark.slow
def test_a_toy_run_s_report_renders_in_chromium_with_its_plots(toy_pair, tmp_path) -> None:
    out = tmp_path / "run"
    toy = to_run_config(load_toml(ROOT / "simulations" / "toy.toml", pyproject_run_config(ROOT / "pyproject.toml")))
    overrides = {**toy, "output.dir": str(out), "dp.mode": "update", "dp.epsilon": 4.0}  # sites report ε spent
    assert run_federation(ROOT, overrides, tmp_path / "flwr-home", timeout=600) == 0
    report = out / "report.html"
    assert report.is_file()

    dom = browse(report, tmp_path, "--dump-dom").stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    for words in ("2 of 2 rounds, 2 organizations", "Quality per round", "Time per round",
                  "privacy ledger", "what left each organization", "num-examples=", "dp-epsilon-total=",
                  "strategy.aggregator"):
        assert words in text, words
    ledger = re.search(r'<table id="ledger">(.*?)</table>', dom, re.S).group(1)
    assert ledger.count("<tr>") == 3  # the header and both organizations
    images = re.findall(r'<img id="([^"]+)" alt="[^"]*" src="data:image/png;base64,', dom)
    assert images == ["quality-plot", "ledger-plot"]

    browse(report, tmp_path, f"--screenshot={tmp_path / 'report.png'}")
    assert blue_pixels(tmp_path / "report.png") > 200  # the plots were decoded and drawn, not just embedded

    # The comparison page of two runs (here the same one twice) renders too, with its plots.
    page = compare([out, out], tmp_path / "comparison.html")
    browse(page, tmp_path, f"--screenshot={tmp_path / 'comparison.png'}")
    assert "LGR (loss)" in browse(page, tmp_path, "--dump-dom").stdout
    assert blue_pixels(tmp_path / "comparison.png") > 200
