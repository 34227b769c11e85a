"""Tables and progress for people (router/console.py): a table whole with its header,
never wrapped; progress on stderr as a bar on a terminal, a few lines in a log."""

from __future__ import annotations

import io

import pytest

from bench.report import targets_table
from router.console import Progress, render, table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_table_has_its_header_once_and_rows_that_never_wrap() -> None:
    grid = table("#", "configuration", "$/h", numeric=("#", "$/h"), title="a search")
    long_label = " + ".join(f"{n}x h100 prefill" for n in range(1, 30))  # 500 characters
    grid.add_row("1", "1x h100 colocated", "6.88")
    grid.add_row("12", long_label, "1,234.50")
    lines = render(grid).splitlines()
    assert lines[0] == "a search"
    headers = [line for line in lines if "configuration" in line]
    assert len(headers) == 1
    below = lines[lines.index(headers[0]) + 2 :]  # past the rule
    assert len(below) == 2
    assert long_label in below[1]  # one line, whole
    # numbers right-aligned: the $/h column ends where the header's does
    assert below[0].endswith("6.88")
    assert below[1].endswith("1,234.50")
    assert len(below[0]) == len(below[1]) == len(headers[0])
    assert "\x1b[" not in render(grid)  # no colour codes in what a log gets


def test_the_benchs_targets_print_as_a_table() -> None:
    text = targets_table(
        {
            "added_ttft_p50_ms": {"value": 0.4321, "target": "<= 1.0", "met": True},
            "stream_ratio": {"value": 0.9, "target": ">= 0.95", "met": False},
        }
    )
    header, _rule, *rows = text.splitlines()
    assert header.split() == ["figure", "value", "target", "met"]
    assert [row.split() for row in rows] == [
        ["added_ttft_p50_ms", "0.432", "<=", "1.0", "yes"],
        ["stream_ratio", "0.9", ">=", "0.95", "NO"],
    ]
    assert targets_table({}) == "(no targets)"


def test_a_log_of_an_unknown_length_gets_lines_at_powers_of_two(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = Progress("search", None)
    for run in range(1, 12):
        progress.update(run, note=f"run {run}")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"  search: {n}" for n in (1, 2, 4, 8, 11)]
    assert lines[-1].endswith("run 11")


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    for total in (10, None):
        progress = Progress("quiet", total, quiet=True)
        progress.advance(5)
        progress.close()
    assert capsys.readouterr() == ("", "")


def test_a_terminal_gets_a_bar_that_ends_at_the_total() -> None:
    screen = Terminal()
    progress = Progress("requests", 5, file=screen)
    for _ in range(5):
        progress.advance(note="ok")
    progress.close()
    drawn = screen.getvalue()
    assert "requests" in drawn
    assert "5/5" in drawn
