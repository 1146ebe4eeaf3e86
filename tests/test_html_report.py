"""report.html: one self-contained page per run, read from the run folder's own files."""

from __future__ import annotations

import json
import re

from fedgt.run.cli import main
from fedgt.server.html_report import write_report


def _run_folder(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        {"round": 0, "eval": {"org-loss": 2.0, "org-em": 0.1, "public-loss": 1.5, "orgs": {}}},
        {"round": 1, "eval_s": 0.5,
         "eval": {"org-loss": 1.5, "org-em": 0.3, "lgr-em": 0.4, "lgr": 0.5, "public-loss": 1.4,
                  "orgs": {"org-a": {"loss": 1.4, "exact_match": 0.5}, "org-b": {"loss": 1.6, "exact_match": 0.1}}},
         "log": {"round": 1, "accepted": [11], "server_s": 0.2,
                 "rejected": [{"node": 12, "code": "bad-norm", "reason": "global L2 norm 1e9 > <script>x</script>"}],
                 "declined": [{"node": 13, "reason": "privacy budget exhausted"}],
                 "metrics": {"tiny-test-em": 0.25, "gt-seconds": 0.1},
                 "received": [{"node": 11, "arrays": {"arrays": {"q.lora_A": [2, 32], "q.lora_B": [32, 2]}},
                               "metrics": {"metrics": ["dp-epsilon-total", "num-examples"]}, "configs": {},
                               "values": {"metrics": {"dp-epsilon-total": 2.5, "num-examples": 64}}, "seconds": 7.25},
                              {"node": 12, "arrays": {"arrays": {"q.lora_A": [2, 32]}}, "metrics": {}, "configs": {}},
                              {"node": 13, "arrays": {}, "metrics": {"metrics": ["declined"]}, "configs": {},
                               "values": {"metrics": {"declined": 1.0, "dp-epsilon-total": 24.0}}},
                              {"node": 14, "error": True}]},
         "own": {"own-em": 0.45, "own-loss": 1.2}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run_config.json").write_text(json.dumps({"train.lr": 0.01, "strategy.aggregator": "distill"}))
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 2, "organizations": 4, "wall_s": 12.0,
                                                       "ceiling": {"loss": 1.1, "exact_match": 0.6},
                                                       "stopped": "round 2: 1 organization(s) connected"}))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [2.0, 1.5])
    fig.savefig(tmp_path / "metrics.png")
    plt.close(fig)
    return tmp_path


def test_the_report_shows_every_reply_s_fate_and_is_self_contained(tmp_path) -> None:
    page = write_report(_run_folder(tmp_path)).read_text()
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing loaded from the network
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page  # a reply's text is escaped
    for text in ("Stopped early: round 2", "privacy budget exhausted", "transport error", "declined",
                 "dp-epsilon-total=2.5, num-examples=64", "512", "org-a", "strategy.aggregator", "40.0%",
                 "45.0%", "25.0%", "60.0%", "7.25"):  # own adapter, own TinyLM, ceiling EM; a site's seconds
        assert text in page, text
    per_round = re.search(r"<table id=orgs-rounds>(.*?)</table>", page).group(1)
    assert "<th>round 1</th>" in per_round and "round 0" not in per_round  # round 0 scored no organization
    assert "<td>org-a</td><td class=num>0.5</td>" in per_round and "<td>org-b</td><td class=num>0.1</td>" in per_round
    ledger = re.search(r"<table id=ledger>(.*?)</table>", page).group(1)
    assert "<td>11</td><td class=num>2.5</td>" in ledger and "<td>13</td><td class=num>24</td>" in ledger
    assert page.count('src="data:image/png;base64,') == 2  # quality and ε plots
    # bytes that left node 11: two float32 tensors of 2 x 32
    assert re.search(r"<td class=num>512</td>", page)


def test_fedgt_report_rewrites_it_and_names_a_wrong_folder(tmp_path, capsys) -> None:
    (tmp_path / "run").mkdir()
    folder = _run_folder(tmp_path / "run")
    assert main(["report", str(folder)]) == 0 and (folder / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_several_runs_give_one_comparison_page(tmp_path) -> None:
    a, b = _run_folder(_mkdir(tmp_path / "a")), _run_folder(_mkdir(tmp_path / "b"))
    (b / "run_config.json").write_text(json.dumps({"train.lr": 0.02, "strategy.aggregator": "distill"}))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp.html")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    differ = re.search(r"<table id=differ>(.*?)</table>", page).group(1)
    assert "train.lr" in differ and "strategy.aggregator" not in differ  # only the settings that differ
    assert "<td>a</td><td class=num>1</td><td class=num>40.0%</td>" in page  # LGR (EM) after the last round
    assert 'id="plot-lgr-em"' in page and not re.search(r"(src|href)=['\"]?https?:", page)


def test_a_bench_strategies_result_gives_a_comparison_with_its_spread(tmp_path) -> None:
    stat = lambda m, sd: {"mean": m, "std": sd, "n": 3}  # noqa: E731
    results = {"command": "python -m simulations.bench_strategies --quick", "machine": "2 cores", "date": "today",
               "seeds": {"0": {}, "1": {}, "2": {}},
               "summary": {"references": {"tiny_ft_round1": {"lgr-em": stat(0.3, 0.1)}},
                           "runs": {"mean/x": [{"lgr-em": stat(0.1, 0.05)}, {"lgr-em": stat(0.2, 0.05)}],
                                    "distill/x": [{"lgr-em": stat(0.5, 0.1)}, {"lgr-em": stat(0.6, 0.1)}]}}}
    (tmp_path / "s.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path / "s.json")]) == 0
    page = (tmp_path / "s.html").read_text()
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=num>2</td><td class=num>([^<]+)</td>", page)
    assert rows == [("distill/x", "60.0% ± 10.0%"), ("mean/x", "20.0% ± 5.0%")]  # best first, mean ± std
    assert "tiny_ft_round1" in page and "--quick" in page
    (tmp_path / "bad.json").write_text("{}")
    assert main(["report", str(tmp_path / "bad.json")]) == 2


def _mkdir(path):
    path.mkdir()
    return path
