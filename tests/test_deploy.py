"""The deployment kit on loopback: TLS, registered SuperNodes only, each site's own data and policy, a site lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loopback_deployment_refuses_strangers_and_outlives_a_site(toy_pair, tmp_path) -> None:
    """deploy/loopback.sh with 3 sites (TLS, registered SuperNodes only, each reading its own data-path and policy).

    Before the run an unregistered SuperNode and one without the CA are refused; site 2 is killed with SIGKILL after
    round 1 and rounds 2-3 run with the other two. In the default suite (about 3 minutes): CI runs the kit.
    """
    from peft import PeftModel

    from fedgt.core.models import load_model

    missing = [tool for tool in ("openssl", "ssh-keygen", "curl") if shutil.which(tool) is None]
    assert not missing, f"the deployment kit needs {missing} (Debian: openssl, openssh-client, curl)"
    extra = tmp_path / "rounds.toml"  # the toy GT covers few DP updates: apply them, so rounds visibly change the LLM
    extra.write_text('strategy.out-of-coverage = "apply"\nnum-server-rounds = 3\n')
    env = {**os.environ, "SITES": "3", "DROP_SITE": "2", "NEGATIVE": "1", "PORT": "18543",
           "SCENARIO": f"simulations/deployment.toml simulations/toy.toml simulations/site_dropout.toml {extra}"}
    done = subprocess.run(["bash", "deploy/loopback.sh", str(tmp_path)], cwd=ROOT, env=env, timeout=900,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["stopped"] is None
    # Refused before the run, each exiting on its own: a key never registered, and a node without the CA.
    codes = dict(line.split(" exit=") for line in (tmp_path / "negative.log").read_text().splitlines())
    assert codes.keys() == {"unregistered", "no-ca"} and all(c not in ("0", "124") for c in codes.values()), codes
    unregistered, no_ca = ((tmp_path / f"{n}.log").read_text() for n in ("unregistered", "no-ca"))
    assert "Exit Code: 305" in unregistered and "Failed to activate SuperNode" in unregistered
    assert "Exit Code: 305" in no_ca and "CERTIFICATE_VERIFY_FAILED" in no_ca
    # Round 1 with all 3 sites; site 2 vanishes; rounds 2 and 3 go on with the other 2.
    assert "SIGKILL site 2 after round 1" in (tmp_path / "faults.log").read_text()
    assert len(rows[1]["log"]["accepted"]) == 3
    for r in rows[2:]:
        assert len(r["log"]["accepted"]) == 2 and not r["log"].get("skipped") and not r["log"].get("llm-unchanged")
    # Each site granted DP-SGD within its own policy, spent from a ledger beside its data, and sent nothing else.
    for i in range(2):
        ledger = json.loads((tmp_path / "sites" / f"org-{i}" / ".fedgt-ledger" / "ledger.json").read_text())
        assert len(ledger["rounds"]) == 3 and ledger["budget"] == 24.0
    replies = [reply for r in rows[1:] for reply in r["log"]["received"]]
    assert sum(1 for reply in replies if reply.get("error")) <= 1  # at most the killed site's awaited reply
    for reply in (reply for reply in replies if not reply.get("error")):
        assert reply["configs"] == {} and reply["metrics"] == {"metrics": ["dp-epsilon-total", "num-examples"]}
    # The run's report: public loss plotted (no test splits on a deployment's server), each site's ε over rounds.
    report = (run / "report.html").read_text()
    ledger = re.search(r"<table id=ledger>(.*?)</table>", report).group(1)
    assert ledger.count("<tr>") == 4 and ledger.count("<td class=num>-</td>") == 2  # site 2: round 1 only
    assert 'id="quality-plot"' in report and "No organization test splits" in report
    PeftModel.from_pretrained(load_model(toy_pair[1])[0], str(run / "llm_adapter"))
