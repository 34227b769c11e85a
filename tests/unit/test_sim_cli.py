"""``hetero-router simulate`` and ``plan`` end to end, in process."""

from __future__ import annotations

import csv
import importlib.util
import json
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


def test_simulate_prints_the_figures_and_writes_results(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = simulate(
        cluster_file, "--rate", "4", "--requests", "40", "--seed", "3", "--out", str(out)
    )
    assert code == 0
    printed = capsys.readouterr().out
    for figure in ("TTFT ms", "TPOT ms", "goodput", "per million output tokens", "shed"):
        assert figure in printed
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
    assert "requests    2: 2 ok" in capsys.readouterr().out


def test_the_packaged_pool_file_simulates(capsys: pytest.CaptureFixture[str]) -> None:
    from router.settings import default_pool_path  # noqa: PLC0415  # the test's own subject

    assert simulate(default_pool_path(), "--rate", "2", "--requests", "10") == 0
    assert "2x h100 prefill + 2x groq-lpu decode" in capsys.readouterr().out


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
    assert "recommended: 1x h100 colocated" in captured.out
    assert "1x h100 colocated" in captured.err  # the progress line of its run
    document = json.loads((out / "plan.json").read_text())
    assert document["recommended"]["configuration"] == "1x h100 colocated"
    cluster = load_cluster(out / "recommended-cluster.yaml")
    assert [d.profile for d in cluster.devices] == ["h100"]


def test_plan_needs_an_slo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [RequestSpec(0.0, 100, 10)])
    assert main(["plan", "--model", "llama-3.1-8b", "--trace", str(trace)]) == 2
    assert "plan needs an SLO" in capsys.readouterr().err
