"""The simulator-speed command (python -m bench.sim_scale), on tiny fleets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.base import Role
from bench import sim_scale
from bench.sim_scale import FLEETS, Run, main, steady_cpu_s_per_sim_s


@pytest.mark.parametrize("devices", [4, 16, 1000])
def test_every_fleet_has_its_size_and_its_roles(devices: int) -> None:
    for fleet in FLEETS.values():
        cluster = fleet.build(devices)
        assert len(cluster.devices) == devices
        roles = {device.role for device in cluster.devices}
        assert roles in ({Role.PREFILL, Role.DECODE}, {Role.BOTH})


def test_the_rate_grows_with_the_fleet_and_meets_the_issue_at_both_ends() -> None:
    assert FLEETS["h100-8b"].rate_per_device * 16 == 100  # the scheduling scenario's figure
    assert FLEETS["h100-wse3-70b"].rate_per_device * 1000 == 1000


def test_the_steady_cost_leaves_out_what_both_windows_share() -> None:
    def run(window_s: float, cpu_s: float) -> Run:
        return Run("f", 16, 16.0, window_s, 0, 1.0, window_s, cpu_s)

    # 2 s of ramp-up and drain in both, 0.1 s per simulated second beyond.
    assert steady_cpu_s_per_sim_s(run(10.0, 3.0), run(30.0, 5.0)) == pytest.approx(0.1)


def test_the_command_prints_each_window_the_steady_cost_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scale.json"
    argv = ["--fleet", "h100-8b", "--devices", "4", "--window", "1", "--window", "3"]
    assert main([*argv, "--json", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].startswith("h100-8b: ")  # the fleet's table, titled
    assert lines[1].split()[:3] == ["devices", "req/s", "window"]
    rows = [line.split() for line in lines[3:5]]
    assert [row[:3] for row in rows] == [["4", "25", "1"], ["4", "25", "3"]]
    assert lines[5].split()[0] == "steady"
    assert len(lines) == 6  # the target fleet did not run: no verdict
    document = json.loads(out.read_text())
    assert [run["window_s"] for run in document["runs"]] == [1.0, 3.0]
    assert all(run["requests"] > 10 and run["cpu_s"] > 0 for run in document["runs"])
    assert set(document["steady_cpu_s_per_sim_s"]) == {"h100-8b/4"}


def test_the_target_fleet_gets_a_verdict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sim_scale, "TARGET", ("h100-70b", 2))
    assert main(["--fleet", "h100-70b", "--devices", "2", "--window", "2"]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("h100-70b, 2 devices at 2 requests/s: ")
    assert verdict.endswith("target <= 600: met")


def test_profiling_prints_the_top_entries(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--fleet", "h100-70b", "--devices", "2", "--window", "1", "--profile", "5"]) == 0
    out = capsys.readouterr().out
    assert "h100-70b, 2 devices, 1 s window" in out
    assert "cumulative" in out
