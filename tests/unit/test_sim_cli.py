"""``hetero-router simulate`` and ``plan`` end to end, in process."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import router.sim
from router.cli import main
from router.sim.cluster import load_cluster
from router.sim.workload import RequestSpec, save_trace

CLUSTER = """
model: llama-3.1-8b
groups:
  - {name: p, profile: h100, role: prefill, count: 1}
  - {name: d, profile: h100, role: decode, count: 1}
"""


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


def simulate(cluster: Path, *extra: str) -> int:
    return main(["simulate", "--cluster", str(cluster), "--quiet", *extra])


def printed_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the one table in ``text``: the header is the line above
    the rule, a row a line below it (up to a blank line), cells apart by 2+ spaces.
    Fails unless exactly one table (one rule) is printed."""
    lines = text.splitlines()
    rules = [n for n, line in enumerate(lines) if line.strip() and set(line.strip()) <= {"─", "-"}]
    assert len(rules) == 1, f"{len(rules)} tables printed:\n{text}"
    header = re.split(r"\s{2,}", lines[rules[0] - 1].strip())
    rows = []
    for line in lines[rules[0] + 1 :]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip(), maxsplit=len(header) - 1))
    return header, rows


def test_simulate_prints_the_figures_and_writes_results(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = simulate(
        cluster_file, "--rate", "4", "--requests", "40", "--seed", "3", "--out", str(out)
    )
    assert code == 0
    header, printed = printed_table(capsys.readouterr().out)
    assert header == ["figure", "value"]
    figures = dict(printed)
    for figure in ("cluster", "requests", "TTFT ms", "TPOT ms", "goodput", "cost", "shed"):
        assert figure in figures
    assert figures["requests"].startswith("40: 40 ok")
    assert figures["cost"].endswith("per million output tokens")
    document = json.loads((out / "results.json").read_text())
    assert document["summary"]["requests"] == 40
    assert document["summary"]["slo"] == "chatbot"
    assert document["cluster"]["model"] == "llama-3.1-8b"
    assert document["workload"]["rate_per_s"] == 4.0
    with (out / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40
    assert {row["outcome"] for row in rows} == {"ok"}
    assert {row["prefill_backend"] for row in rows} <= {"p-0", "d-0"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").stat().st_size > 0
        assert (out / "timeline.png").stat().st_size > 0


def test_simulate_without_matplotlib_writes_the_rest_and_says_how_to_plot(
    cluster_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None: an import of it fails
    monkeypatch.delitem(sys.modules, "router.sim.plots", raising=False)
    monkeypatch.delattr(router.sim, "plots", raising=False)
    out = tmp_path / "out"
    assert simulate(cluster_file, "--rate", "4", "--requests", "10", "--out", str(out)) == 0
    assert "pip install 'hetero-router[plots]'" in capsys.readouterr().err
    assert (out / "results.json").exists()
    assert (out / "requests.csv").exists()
    assert not list(out.glob("*.png"))


def test_simulate_is_deterministic_per_seed(cluster_file: Path, tmp_path: Path) -> None:
    def requests_csv(name: str) -> str:
        out = tmp_path / name
        flags = ["--rate", "8", "--duration", "5", "--seed", "7", "--arrivals", "bursty"]
        assert simulate(cluster_file, *flags, "--out", str(out)) == 0
        return (out / "requests.csv").read_text()

    assert requests_csv("a") == requests_csv("b")


def test_simulate_replays_a_trace(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [RequestSpec(0.0, 100, 10), RequestSpec(0.5, 2000, 20, 1, 1024)])
    code = simulate(cluster_file, "--trace", str(trace), "--slo-ttft-ms", "500")
    assert code == 0
    _, rows = printed_table(capsys.readouterr().out)
    assert dict(rows)["requests"].startswith("2: 2 ok")


def test_the_packaged_pool_file_simulates(capsys: pytest.CaptureFixture[str]) -> None:
    from router.settings import default_pool_path  # noqa: PLC0415  # the test's own subject

    assert simulate(default_pool_path(), "--rate", "2", "--requests", "10") == 0
    _, rows = printed_table(capsys.readouterr().out)
    assert dict(rows)["cluster"].startswith("2x h100 prefill + 2x groq-lpu decode")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "1", "--cluster-override"], None),
        ([], "--rate is needed"),
        (["--rate", "0"], "rate_per_s must be finite and > 0"),
        (["--rate", "1", "--requests", "0"], "--requests must be >= 1"),
        (["--rate", "1", "--policy", "/nonexistent/policy.yaml"], "policy file"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    cluster_file: Path,
    flags: list[str],
    message: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if message is None:  # an unknown flag: argparse's own exit
        with pytest.raises(SystemExit) as exited:
            simulate(cluster_file, *flags)
        assert exited.value.code == 2
        return
    assert simulate(cluster_file, *flags) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_a_broken_cluster_file_is_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: llama-3.1-8b\ngroups: [{name: a, profile: h999, role: both}]\n")
    assert simulate(path, "--rate", "1") == 2
    error = capsys.readouterr().err
    assert f"{path}: groups[0].profile: unknown profile 'h999'" in error
    assert simulate(tmp_path / "absent.yaml", "--rate", "1") == 2


def test_a_trace_replays_its_own_arrivals(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [RequestSpec(0.0, 100, 10)])
    assert simulate(cluster_file, "--trace", str(trace), "--rate", "3") == 2
    assert "replays its own arrivals" in capsys.readouterr().err


def test_plan_recommends_and_writes_the_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan"
    code = main(
        [
            "plan",
            "--model",
            "llama-3.1-8b",
            "--profiles",
            "h200,h100",
            "--max-devices",
            "1",
            "--no-split",
            "--workload",
            "code",
            "--rate",
            "2",
            "--requests",
            "30",
            "--slo-ttft-ms",
            "5000",
            "--slo-tpot-ms",
            "1000",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    header, rows = printed_table(captured.out)
    assert header == [
        "#",
        "configuration",
        "$/h",
        "attainment",
        "TTFT p99 ms",
        "TPOT p99 ms",
        "status",
    ]
    assert [row[1] for row in rows] == ["1x h100 colocated"]
    assert rows[0][0] == "1"
    assert rows[0][-1] == "met"
    assert "recommended: 1x h100 colocated" in captured.out
    # stderr has the search's progress, naming its run, and no table (no header, no rows)
    assert "1x h100 colocated" in captured.err
    assert "TTFT p99 ms" not in captured.err
    assert "─" not in captured.err
    assert all(line.startswith(("  plan: ", "plan in ")) for line in captured.err.splitlines())
    document = json.loads((out / "plan.json").read_text())
    assert document["recommended"]["configuration"] == "1x h100 colocated"
    cluster = load_cluster(out / "recommended-cluster.yaml")
    assert [d.profile for d in cluster.devices] == ["h100"]


def test_plan_prints_every_run_once_under_one_header_and_quiet_prints_no_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan"
    flags = ["--model", "llama-3.1-8b", "--profiles", "h100", "--max-devices", "4"]
    flags += ["--workload", "chatbot", "--rate", "150", "--requests", "300", "--max-runs", "5"]
    flags += ["--slo", "chatbot", "--quiet", "--out", str(out)]
    assert main(["plan", *flags]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"plan in {out}\n"
    header, rows = printed_table(captured.out)
    assert header[:2] == ["#", "configuration"]
    trials = json.loads((out / "plan.json").read_text())["trials"]
    assert len(trials) == 5  # none meets the SLO: the search runs until --max-runs
    assert [row[0] for row in rows] == [str(n) for n in range(1, len(trials) + 1)]
    assert [row[1] for row in rows] == [trial["configuration"] for trial in trials]
    assert [row[-1] for row in rows] == [trial["status"] for trial in trials]


def test_plan_needs_an_slo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [RequestSpec(0.0, 100, 10)])
    assert main(["plan", "--model", "llama-3.1-8b", "--trace", str(trace)]) == 2
    assert "plan needs an SLO" in capsys.readouterr().err
