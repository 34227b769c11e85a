"""The fuzz targets of bench/fuzz tell an expected refusal from a crash, without atheris.

Every seed corpus file goes through its target's one-input function: valid and
near-valid inputs are accepted or refused, never a crash. Files named ``crash-*`` are
inputs that crashed a parser when fuzzing found them; they stay in the corpus so that
every run tries them, and are expected to pass once that parser is fixed. The runner's
crash bookkeeping and the scenario's reading of libFuzzer's output are checked here too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from backends import vllm
from backends.errors import BackendError
from bench.fuzz import (
    TARGETS,
    OneInput,
    backend_replies,
    config_files,
    corpus_files,
    grpc_request,
    load_target,
    openai_body,
)
from bench.fuzz.runner import CrashRecorder, crash_signature, main
from bench.scenarios import fuzz
from router.errors import ConfigError, InvalidRequestError


def corpus_cases() -> list[object]:
    return [
        pytest.param(name, path, id=f"{name}/{path.name}")
        for name in TARGETS
        for path in corpus_files(name)
    ]


def test_every_target_has_a_seed_corpus_of_small_files() -> None:
    for name in TARGETS:
        files = corpus_files(name)
        assert len([path for path in files if not path.name.startswith("crash-")]) >= 3, name
        assert all(path.stat().st_size <= fuzz.MAX_INPUT_BYTES for path in files), name


@pytest.mark.parametrize(("name", "path"), corpus_cases())
def test_corpus_inputs_are_accepted_or_refused(name: str, path: Path) -> None:
    crashed = None
    try:
        load_target(name)(path.read_bytes())
    except Exception as error:
        if not path.name.startswith("crash-"):
            raise
        crashed = type(error).__name__
    if crashed is not None:
        # Outside the except block: a RecursionError's traceback takes seconds to render.
        pytest.xfail(f"{crashed}: a crash fuzzing found, not fixed yet")


def raising(error: Exception) -> object:
    def parse(*args: object, **kwargs: object) -> object:
        raise error

    return parse


VALID_COMPLETION = b'{"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 4}'


@pytest.mark.parametrize("body", [b"\xbc", b"{", b"[1]", b'"text"', b"1e999999"])
def test_openai_body_that_is_no_json_object_is_a_refusal(body: bytes) -> None:
    openai_body.one_input(body)


def test_openai_body_refusal_is_no_crash_and_anything_else_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openai_body, "parse_body", raising(InvalidRequestError("no")))
    openai_body.one_input(VALID_COMPLETION)
    monkeypatch.setattr(openai_body, "parse_body", raising(KeyError("prompt")))
    with pytest.raises(KeyError):
        openai_body.one_input(VALID_COMPLETION)


def test_grpc_request_that_does_not_decode_is_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(grpc_request, "validate_generate", raising(TypeError("reached")))
    grpc_request.one_input(b"\xff\xff\xff")  # a truncated varint: DecodeError, never validated
    with pytest.raises(TypeError):
        grpc_request.one_input(b"\x1a\x02hi")  # prompt "hi": decoded, then validated


def test_grpc_request_refusal_is_no_crash_and_anything_else_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grpc_request.one_input(b"")  # no prompt: InvalidRequestError
    monkeypatch.setattr(grpc_request, "validate_service", raising(ZeroDivisionError()))
    with pytest.raises(ZeroDivisionError):
        grpc_request.one_input(b"\x1a\x02hi")


@pytest.mark.parametrize(
    ("loader", "one_input", "refusal"),
    [
        ("load_pool", config_files.one_input_pool_file, ConfigError("bad")),
        ("load_policy", config_files.one_input_policy_file, ConfigError("bad")),
        ("load_catalog", config_files.one_input_profiles_file, ValueError("bad")),
    ],
)
def test_file_reader_refusal_is_no_crash_and_anything_else_is(
    monkeypatch: pytest.MonkeyPatch, loader: str, one_input: OneInput, refusal: Exception
) -> None:
    monkeypatch.setattr(config_files, loader, raising(refusal))
    one_input(b"backends: []\n")
    monkeypatch.setattr(config_files, loader, raising(AttributeError("x")))
    with pytest.raises(AttributeError):
        one_input(b"backends: []\n")


def test_file_readers_are_given_a_file_of_the_input_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bytes] = []
    monkeypatch.setattr(config_files, "load_pool", lambda path: seen.append(path.read_bytes()))
    config_files.one_input_pool_file(b"backends: \xff\n")
    assert seen == [b"backends: \xff\n"]


PREFILL_ANSWER = bytes([4]) + b'{"kv_transfer_params": {"a": 1}}'


def test_backend_reply_refusal_is_no_crash_and_anything_else_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend_replies.one_input(PREFILL_ANSWER)
    backend_replies.one_input(bytes([4]) + b"[" * 5000)  # a BackendError: not JSON
    monkeypatch.setattr(vllm, "prefill_answer", raising(BackendError("b", "x")))
    backend_replies.one_input(PREFILL_ANSWER)
    monkeypatch.setattr(vllm, "prefill_answer", raising(IndexError()))
    with pytest.raises(IndexError):
        backend_replies.one_input(PREFILL_ANSWER)


def test_an_error_message_no_client_can_be_sent_is_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vllm, "prefill_answer", raising(BackendError("b", "\ud800")))
    with pytest.raises(backend_replies.PropertyViolationError):
        backend_replies.one_input(PREFILL_ANSWER)


def test_every_reply_parser_is_reachable_from_the_first_byte() -> None:
    for choice in range(256):
        backend_replies.one_input(bytes([choice]) + b"data: [DONE]\n\n")


# --- the runner and the scenario ---------------------------------------------------------


def crashes_on_x(data: bytes) -> None:
    if data.startswith(b"x"):
        raise KeyError(data)


def test_recorder_counts_crashes_and_keeps_the_first_input_of_each_kind(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    recorder = CrashRecorder("demo", crashes_on_x, report, tmp_path / "crashes")
    for data in (b"a", b"x1", b"b", b"x2"):
        recorder(data)
    recorder.flush()  # libFuzzer's exit runs no atexit: the runner flushes as it goes
    found = json.loads(report.read_text())
    assert (found["crashes"], recorder.runs) == (2, 4)
    [kind] = found["kinds"]
    assert kind["signature"].startswith("KeyError at tests/unit/test_bench_fuzz.py:")
    assert Path(kind["input"]).read_bytes() == b"x1"
    assert Path(kind["input"]).name.startswith("demo-")
    assert [path.name for path in (tmp_path / "crashes").iterdir()] == [Path(kind["input"]).name]


def test_crash_signature_names_the_innermost_project_line() -> None:
    try:
        crashes_on_x(b"x")
    except KeyError as error:
        signature = crash_signature(error)
    assert signature.startswith("KeyError at tests/unit/test_bench_fuzz.py:")


LIBFUZZER_OUTPUT = """\
INFO: Seed: 1
#12	INITED cov: 80 ft: 90 corp: 10/1500b exec/s: 0 rss: 70Mb
#4096	pulse  cov: 120 ft: 300 corp: 30/3000b lim: 4096 exec/s: 2048 rss: 80Mb
#5000	DONE   cov: 125 ft: 310 corp: 31/3100b lim: 4096 exec/s: 1666 rss: 81Mb
Done 5000 runs in 3 second(s)
stat::number_of_executed_units: 5000
stat::average_exec_per_sec:     1666
stat::new_units_added:          21
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              81
"""


def test_libfuzzer_output_gives_runs_coverage_and_rate() -> None:
    figures = fuzz.parse_libfuzzer(LIBFUZZER_OUTPUT)
    assert figures["number_of_executed_units"] == 5000
    assert (figures["coverage_edges"], figures["coverage_features"]) == (125, 310)
    assert (figures["average_exec_per_sec"], figures["new_units_added"]) == (1666, 21)


def test_libfuzzer_output_cut_short_still_gives_the_last_status() -> None:
    figures = fuzz.parse_libfuzzer(LIBFUZZER_OUTPUT.split("#5000", maxsplit=1)[0])
    assert figures["number_of_executed_units"] == 4096
    assert figures["coverage_edges"] == 120


async def test_the_scenario_says_how_to_install_atheris(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'"):
        await fuzz.run(True, tmp_path)


def test_the_runner_says_how_to_install_atheris(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "atheris", None)  # import atheris: ImportError
    assert main(["openai_body", str(tmp_path / "r.json"), str(tmp_path)]) == 3
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
