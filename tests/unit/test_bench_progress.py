"""Progress of a bench run as it reads in a log (stderr is no terminal under pytest)."""

from __future__ import annotations

import pytest

from bench.progress import Progress


def test_a_log_gets_a_line_about_every_tenth_of_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = Progress("requests", 25)
    for _ in range(25):
        progress.advance()
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        f"  requests: {done}/25" for done in (0, 3, 6, 9, 12, 15, 18, 21, 24, 25)
    ]
    assert "\r" not in "".join(lines)


def test_an_empty_run_still_closes_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress("nothing", 0)
    progress.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith("  nothing: 0/1")
