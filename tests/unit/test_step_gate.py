"""The engines tier's gate on a vLLM engine's steps (bench/engines/engine_site)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.engines.engine_site import step_gate
from bench.engines.engine_site.step_gate import StepGate, granted


def test_an_ungated_engine_and_a_gate_with_no_file_let_every_step_through(
    tmp_path: Path,
) -> None:
    assert all(StepGate(None).admits() for _ in range(100))
    assert all(StepGate(tmp_path / "gate").admits() for _ in range(100))


def test_a_file_grants_its_steps_then_holds_until_it_changes_or_goes(tmp_path: Path) -> None:
    path = tmp_path / "gate"
    gate = StepGate(path)
    path.write_text("2 first\n")
    assert [gate.admits() for _ in range(4)] == [True, True, False, False]
    path.write_text("1 second\n")  # new text: a new grant, counted afresh
    assert [gate.admits() for _ in range(3)] == [True, False, False]
    path.unlink()
    assert gate.admits()
    path.write_text("1 second\n")  # the same text as before, after a release: afresh too
    assert [gate.admits() for _ in range(2)] == [True, False]


@pytest.mark.parametrize("text", ["", "x 1", "-3 x", "\n"])
def test_a_file_that_says_no_number_of_steps_holds(text: str) -> None:
    assert granted(text) == 0


def test_wait_returns_once_the_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "gate"
    path.write_text("0 held\n")
    polls: list[float] = []

    def sleep(seconds: float) -> None:  # the test removes the file at the third poll
        polls.append(seconds)
        if len(polls) == 3:
            path.unlink()

    StepGate(path).wait(sleep)
    assert polls == [step_gate.POLL_S] * 3


def test_the_server_writes_what_the_gate_reads(tmp_path: Path) -> None:
    from bench.engines import servers  # noqa: PLC0415  # only this test needs the servers

    server = servers.vllm_server("decode", tmp_path / "model", tmp_path, gated=True)
    gate = StepGate(server.gate_path())
    server.hold_after(3)
    assert [gate.admits() for _ in range(4)] == [True, True, True, False]
    server.hold_after(1)
    assert [gate.admits() for _ in range(2)] == [True, False]
    server.release()
    assert gate.admits()
    assert "step_gate:StepGateProcessor" in server.argv
    ungated = servers.vllm_server("plain", tmp_path / "model", tmp_path)
    with pytest.raises(ValueError, match="not started gated"):
        ungated.hold_after(1)
