"""Public trace formats read as published: Mooncake, Azure, BurstGPT and the project's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import load
from router.cli import main
from router.sim.traces import MOONCAKE_BLOCK_TOKENS, detect_format, read_trace
from router.sim.workload import RequestSpec, load_trace, save_trace

MOONCAKE = (
    '{"timestamp": 27482, "input_length": 6955, "output_length": 52, '
    '"hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353, 2354]}\n'
    '{"timestamp": 30535, "input_length": 6472, "output_length": 26, '
    '"hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2366]}\n'
    '{"timestamp": 30535, "input_length": 700, "output_length": 0, "hash_ids": [46, 58]}\n'
)
AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:16:46.6805900,2000,500\n"
)
BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45,ChatGPT,1087,230,1317,Conversation log\n"
    "118,GPT-4,417,276,693,Conversation log\n"
    "120,GPT-4,300,0,300,API log\n"
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_mooncake_trace_reads_its_block_chains_and_starts_at_zero(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "conversation_trace.jsonl", MOONCAKE))
    assert trace.format == "mooncake"
    assert trace.skipped == 1  # no output tokens
    first, second = trace.requests
    assert (first.arrival_s, first.prompt_tokens, first.output_tokens) == (0.0, 6955, 52)
    assert second.arrival_s == pytest.approx(3.053)
    assert first.block_tokens == MOONCAKE_BLOCK_TOKENS
    assert first.block_hashes[:12] == second.block_hashes[:12] == tuple(range(46, 58))
    assert first.prefix_chain() == (first.block_hashes, 512)
    assert trace.mean_prompt_tokens() == (6955 + 6472) / 2
    assert trace.mean_output_tokens() == (52 + 26) / 2
    assert "2 requests" in trace.describe()
    assert "1 row with no input or output tokens (failed) skipped" in trace.describe()


def test_an_azure_trace_reads_seven_fractional_digits(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "AzureLLMInferenceTrace_conv.csv", AZURE))
    assert trace.format == "azure"
    assert [spec.arrival_s for spec in trace.requests] == pytest.approx(
        [0.0, 4.314579, 60.0], abs=1e-9
    )
    assert [spec.prompt_tokens for spec in trace.requests] == [374, 396, 2000]
    assert [spec.output_tokens for spec in trace.requests] == [44, 109, 500]
    assert trace.skipped == 0


def test_an_azure_time_zone_and_a_missing_fraction_are_understood(tmp_path: Path) -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:01+00:00,10,2\n"
        "2024-05-10T02:00:00.5+02:00,20,2\n"  # half a second before the row above
    )
    trace = read_trace(write(tmp_path, "week.csv", text))
    assert [spec.prompt_tokens for spec in trace.requests] == [20, 10]
    assert [spec.arrival_s for spec in trace.requests] == pytest.approx([0.0, 0.5], abs=1e-9)


def test_a_burstgpt_trace_skips_and_counts_its_failures(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "BurstGPT_1.csv", BURSTGPT))
    assert trace.format == "burstgpt"
    assert trace.skipped == 1
    assert [spec.arrival_s for spec in trace.requests] == [0.0, 40.0, 113.0]
    assert [spec.prompt_tokens for spec in trace.requests] == [472, 1087, 417]
    assert trace.mean_output_tokens() == pytest.approx((18 + 230 + 276) / 3)


def test_the_projects_own_trace_keeps_its_arrivals_and_chains(tmp_path: Path) -> None:
    specs = [
        RequestSpec(0.5, 700, 4, block_hashes=(1, 2), block_tokens=512),
        RequestSpec(1.0, 300, 5, 3, 128),
    ]
    path = tmp_path / "trace.jsonl"
    save_trace(path, specs)
    assert json.loads(path.read_text().splitlines()[0])["block_hashes"] == [1, 2]
    trace = read_trace(path)
    assert trace.format == "hetero"
    assert trace.requests == specs
    assert load_trace(path) == specs  # the entry the rest of the project calls


def test_the_format_can_be_named_whatever_the_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "export.txt", BURSTGPT)
    assert detect_format(path) == "burstgpt"
    assert read_trace(path, "burstgpt").format == "burstgpt"
    with pytest.raises(ValueError, match=r"export\.txt:1: an? azure trace has columns"):
        read_trace(path, "azure")
    with pytest.raises(ValueError, match="unknown trace format 'csv'"):
        read_trace(path, "csv")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.jsonl", '{"ts": 1, "n": 2}\n', r"t\.jsonl:1: cannot tell the trace format"),
        ("t.csv", "a,b,c\n1,2,3\n", r"t\.csv:1: cannot tell the trace format from its header"),
        ("t.jsonl", "\n\n", r"t\.jsonl: the trace is empty"),
        ("t.jsonl", "\n{oops\n", r"t\.jsonl:2: is not valid JSON"),
    ],
)
def test_a_trace_of_no_known_format_says_so(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        read_trace(write(tmp_path, name, text))


GOOD_MOONCAKE = {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"timestamp": 1, "input_length": 600, "output_length": 3}', "missing hash_ids"),
        ({"timestamp": "noon"}, "timestamp"),
        ({"input_length": 6.5}, "input_length"),
        ({"output_length": -3}, "output_length"),
        ({"hash_ids": [1, "a"]}, "hash_ids"),
        ({"hash_ids": [-1]}, "hash_ids"),
        ({"hash_ids": [0, 1, 2]}, "3 hash_ids"),
    ],
)
def test_a_malformed_mooncake_line_names_the_file_and_line(
    tmp_path: Path, bad_line: str | dict[str, object], problem: str
) -> None:
    if isinstance(bad_line, dict):
        bad_line = json.dumps({**GOOD_MOONCAKE, **bad_line})
    good = json.dumps(GOOD_MOONCAKE)
    path = write(tmp_path, "trace.jsonl", f"{good}\n\n{good}\n{bad_line}\n")
    with pytest.raises(ValueError, match=r"trace\.jsonl:4: ") as caught:
        read_trace(path)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "bad_row", "problem"),
    [
        (AZURE, "2023-11-16 18:15:46,374", "expected 3 fields, got 2"),
        (AZURE, "16/11/2023 18:15,374,44", "TIMESTAMP must read like"),
        (AZURE, "2023-13-16 18:15:46.1,374,44", "not a valid time"),
        (AZURE, "2023-11-16 18:15:46.1,many,44", "ContextTokens"),
        (AZURE, "2023-11-16 18:15:46.1,374,4.5", "GeneratedTokens"),
        (BURSTGPT, "soon,ChatGPT,1,2,3,Conversation log", "Timestamp"),
        (BURSTGPT, "7,ChatGPT,-1,2,1,Conversation log", "Request tokens must be >= 0"),
        (BURSTGPT, "7,ChatGPT,1,2,3", "expected 6 fields, got 5"),
    ],
)
def test_a_malformed_csv_row_names_the_file_and_line(
    tmp_path: Path, header: str, bad_row: str, problem: str
) -> None:
    lines = header.splitlines()
    path = write(tmp_path, "trace.csv", "\n".join([*lines[:3], bad_row, *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"trace\.csv:4: ") as caught:
        read_trace(path)
    assert problem in str(caught.value)


def test_a_csv_trace_missing_a_column_says_which(tmp_path: Path) -> None:
    path = write(tmp_path, "trace.csv", "Timestamp,Model,Request tokens\n1,ChatGPT,5\n")
    with pytest.raises(ValueError, match=r"trace\.csv:1: .*missing Response tokens"):
        read_trace(path, "burstgpt")


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes(AZURE.encode() + b"2023-11-16 18:15:46.1,\xff\xfe,4\n")
    with pytest.raises(ValueError, match=r"trace\.csv:5: not UTF-8 text"):
        read_trace(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_hashes": (1,)}, "set together"),
        ({"block_tokens": 512}, "set together"),
        ({"block_hashes": (1, 2, 3), "block_tokens": 512}, "more than a prompt of 1000"),
        ({"block_hashes": (-1,), "block_tokens": 512}, ">= 0"),
        (
            {"block_hashes": (1,), "block_tokens": 512, "prefix_group": 1, "prefix_tokens": 9},
            "not both",
        ),
    ],
)
def test_a_request_spec_checks_its_chain(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RequestSpec(0.0, 1000, 1, **kwargs)  # type: ignore[arg-type]  # the bad values under test


def test_a_prefix_group_is_a_one_block_chain() -> None:
    assert RequestSpec(0.0, 100, 1, 7, 60).prefix_chain() == ((7,), 60)
    assert RequestSpec(0.0, 100, 1).prefix_chain() == ((), 0)


CLUSTER = "model: llama-3.1-8b\ngroups:\n  - {name: c, profile: h100, role: both, count: 1}\n"


def test_simulate_says_what_the_trace_held(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = write(tmp_path, "cluster.yaml", CLUSTER)
    trace = write(tmp_path, "export.txt", BURSTGPT)
    flags = ["--trace", str(trace), "--trace-format", "burstgpt", "--out", str(tmp_path / "o")]
    assert main(["simulate", "--cluster", str(cluster), *flags]) == 0
    error = capsys.readouterr().err
    assert f"trace {trace} (burstgpt): 3 requests over 113.0 s" in error
    assert "mean input 658.7 tokens, mean output 174.7 tokens" in error
    assert "1 row with no input or output tokens (failed) skipped" in error
    workload = json.loads((tmp_path / "o" / "results.json").read_text())["workload"]
    assert workload["trace_format"] == "burstgpt"
    assert workload["trace_skipped"] == 1


@pytest.mark.parametrize("command", ["simulate", "plan", "load"])
def test_a_malformed_trace_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    cluster = write(tmp_path, "cluster.yaml", CLUSTER)
    trace = write(tmp_path, "trace.csv", AZURE + "2023-11-16 18:17:00.1,12\n")
    if command == "simulate":
        code = main(["simulate", "--cluster", str(cluster), "--trace", str(trace)])
    elif command == "plan":
        code = main(["plan", "--model", "llama-3.1-8b", "--trace", str(trace), "--slo", "chatbot"])
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["bench.load", "--trace", str(trace)])
            code = load.main()
    assert code == 2
    error = capsys.readouterr().err
    assert f"{trace}:5: expected 3 fields, got 2" in error
    assert len(error.strip().splitlines()) == 1
    assert "Traceback" not in error
