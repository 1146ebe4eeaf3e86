"""The deployment kit on loopback: TLS, registered SuperNodes only, each site's own data and policy."""

from __future__ import annotations


def _adapter_loads(run, llm_dir) -> None:
    from peft import PeftModel

    from fedgt.core.models import load_model

    PeftModel.from_pretrained(load_model(llm_dir)[0], str(run / "llm_adapter"))


def test_loopback_deployment_with_tls_and_supernode_auth(toy_pair, tmp_path) -> None:
    """deploy/loopback.sh: SuperLink (TLS, registered SuperNodes only) + 2 sites reading their data-path.

    Runs in the default suite (about 2 minutes): the deployment kit's negative checks are part of CI.
    """
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path

    missing = [tool for tool in ("openssl", "ssh-keygen", "curl") if shutil.which(tool) is None]
    assert not missing, f"the deployment kit needs {missing} (Debian: openssl, openssh-client, curl)"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SCENARIO": "simulations/deployment.toml simulations/toy.toml", "SITES": "2",
           "PORT": "18543", "NEGATIVE": "1"}
    done = subprocess.run(["bash", "deploy/loopback.sh", str(tmp_path)], cwd=root, env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len(rows[1]["log"]["accepted"]) == 2 and "public-loss" in rows[2]["eval"]
    _adapter_loads(tmp_path / "run", toy_pair[1])
    # Refused before the run, each exiting on its own: a key never registered, and a node without the CA.
    assert (tmp_path / "negative.log").read_text().split() == ["unregistered", "exit=305", "no-ca", "exit=305"]
    assert "Failed to activate SuperNode" in (tmp_path / "unregistered.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "no-ca.log").read_text()
    # Each site granted DP-SGD within its own policy, spent from a ledger beside its data, and sent nothing else.
    for i in range(2):
        ledger = json.loads((tmp_path / "sites" / f"org-{i}" / ".fedgt-ledger" / "ledger.json").read_text())
        assert len(ledger["rounds"]) == 2 and ledger["budget"] == 24.0
    for r in rows[1]["log"]["received"] + rows[2]["log"]["received"]:
        assert r["metrics"] == {"metrics": ["dp-epsilon-total", "num-examples"]} and r["configs"] == {}
