"""SUMMARY.md lists each scenario's result, and only those."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import write_summary


def test_the_summary_lists_scenario_results_and_skips_other_json(tmp_path: Path) -> None:
    scenario = {
        "scenario": "peers",
        "mode": "full",
        "headline": {"req/s vs vllm-router": 0.663},
        "targets": {"a": {"met": True}, "b": {"met": False}},
    }
    (tmp_path / "peers.json").write_text(json.dumps(scenario))
    (tmp_path / "peers.png").write_bytes(b"")
    (tmp_path / "frontier-chatbot.json").write_text(json.dumps({"command": "plan --frontier"}))

    summary = write_summary(tmp_path).read_text()

    rows = [line for line in summary.splitlines() if line.startswith("| [")]
    assert rows == [
        "| [peers](peers.json) ([plot](peers.png)) | full | req/s vs vllm-router 0.663 | 1/2 |"
    ]
