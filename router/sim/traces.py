"""Request traces as they are published, read into the simulator's requests.

Four formats, told apart by the file's extension and first line (or named):

``hetero``
    The project's own JSONL (:func:`router.sim.workload.save_trace`): ``arrival_s``,
    ``prompt_tokens``, ``output_tokens``, optionally ``prefix_group`` and
    ``prefix_tokens`` or ``block_hashes`` and ``block_tokens``. Arrivals are kept as
    written.
``mooncake``
    Mooncake's FAST'25 release (kvcache-ai/Mooncake, ``FAST25-release/traces/*.jsonl``
    and its README): one JSON object a line, ``timestamp`` (ms), ``input_length``,
    ``output_length`` and ``hash_ids``, one id per 512-token block of the prompt, the
    ids prefix-chained (an id recurs only after the same leading ids), the last block
    cut short by the prompt's end (``conversation_trace.jsonl`` has ``ceil(input_length
    / 512)`` ids a line). The ids become the request's block hash chain.
``azure``
    The Azure LLM inference traces (Azure/AzurePublicDataset,
    ``AzureLLMInferenceDataset2023.md``: ``data/AzureLLMInferenceTrace_code.csv`` and
    ``_conv.csv``; the 2024 week-long files share the header): CSV with header
    ``TIMESTAMP,ContextTokens,GeneratedTokens``, the time as ``2023-11-16
    18:15:46.6805900`` (seven fractional digits, read here digit by digit).
``burstgpt``
    BurstGPT (HPMLL/BurstGPT, README: ``data/BurstGPT_1.csv``, ...): CSV with header
    ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``, the time in
    seconds from the trace's start. Rows with 0 response tokens are failed requests.

A row of a public trace with no input or no output tokens (BurstGPT's failures) is
skipped and counted in :attr:`Trace.skipped`; a malformed one is a ValueError naming
the file and line (``trace.jsonl:17: ...``). Public traces' arrivals are offsets from
their first request, which arrives at 0.
"""

from __future__ import annotations

import calendar
import csv
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from backends.config_files import load_json
from backends.errors import shown
from router.sim.workload import RequestSpec, integer_list, parse_trace_line

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "TRACE_FORMATS",
    "Trace",
    "TraceFormat",
    "detect_format",
    "read_trace",
]

TraceFormat = Literal["auto", "hetero", "mooncake", "azure", "burstgpt"]
TRACE_FORMATS: tuple[str, ...] = get_args(TraceFormat)

# Tokens per hash id in Mooncake's traces (the FAST'25 paper's KV block).
MOONCAKE_BLOCK_TOKENS = 512

# A public trace's request before its arrival is made an offset from the first's:
# (arrival s, prompt tokens, output tokens, block hash chain).
_Row = tuple[float, int, int, tuple[int, ...]]

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
# 2023-11-16 18:15:46.6805900, optionally with a T, a zone (Z, +00:00) or no fraction.
_AZURE_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d{2}:?\d{2})?"
)


@dataclass(frozen=True)
class Trace:
    """What a trace file held: its requests, sorted by arrival, and what was left out."""

    path: Path
    format: str
    requests: list[RequestSpec]
    skipped: int = 0  # rows with no input or no output tokens (failed requests)

    def mean_prompt_tokens(self) -> float:
        return _mean([spec.prompt_tokens for spec in self.requests])

    def mean_output_tokens(self) -> float:
        return _mean([spec.output_tokens for spec in self.requests])

    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    def describe(self) -> str:
        """One line for a person: the format, the counts, the mean lengths."""
        line = (
            f"trace {self.path} ({self.format}): {len(self.requests):,} requests over "
            f"{self.duration_s():,.1f} s, mean input {self.mean_prompt_tokens():,.1f} tokens, "
            f"mean output {self.mean_output_tokens():,.1f} tokens"
        )
        if self.skipped:
            rows = "row" if self.skipped == 1 else "rows"
            line += f"; {self.skipped:,} {rows} with no input or output tokens (failed) skipped"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": str(self.path),
            "trace_format": self.format,
            "trace_requests": len(self.requests),
            "trace_skipped": self.skipped,
            "mean_prompt_tokens": self.mean_prompt_tokens(),
            "mean_output_tokens": self.mean_output_tokens(),
        }


def read_trace(path: Path, trace_format: str = "auto") -> Trace:
    """The requests of ``path`` in ``trace_format`` (``auto``: :func:`detect_format`)."""
    if trace_format not in TRACE_FORMATS:
        raise ValueError(
            f"unknown trace format {trace_format!r}; known: {', '.join(TRACE_FORMATS)}"
        )
    chosen = detect_format(path) if trace_format == "auto" else trace_format
    try:
        with path.open("rb") as raw:
            if chosen == "hetero":
                specs = _read_hetero(path, raw)
                return Trace(path, chosen, sorted(specs, key=lambda spec: spec.arrival_s))
            rows, skipped = _PUBLIC_READERS[chosen](path, raw)
    except OSError as error:
        raise ValueError(f"cannot read trace {path}: {error.strerror}") from None
    rows.sort(key=lambda row: row[0])  # stable: ties keep the file's order
    start = rows[0][0] if rows else 0.0
    block_tokens = MOONCAKE_BLOCK_TOKENS if chosen == "mooncake" else 0
    specs = [
        RequestSpec(
            arrival - start,
            prompt,
            output,
            block_hashes=chain,
            block_tokens=block_tokens if chain else 0,
        )
        for arrival, prompt, output, chain in rows
    ]
    return Trace(path, chosen, specs, skipped)


def detect_format(path: Path) -> str:
    """The format of ``path``: JSON lines or CSV by extension (else by the first
    character), then which one by the first line's keys or the header's columns."""
    number, first = _first_line(path)
    suffix = path.suffix.lower()
    as_json = suffix in {".jsonl", ".json", ".ndjson"} or (
        suffix != ".csv" and first.lstrip().startswith("{")
    )
    if as_json:
        try:
            obj = load_json(first)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        keys = set(obj) if isinstance(obj, dict) else set()
        if {"hash_ids", "input_length"} & keys:
            return "mooncake"
        if {"arrival_s", "prompt_tokens"} & keys:
            return "hetero"
        raise ValueError(
            f"{path}:{number}: cannot tell the trace format from its keys "
            f"({', '.join(sorted(keys)) or 'none'}); name it with --trace-format"
        )
    columns = {name.strip() for name in next(csv.reader([first]), [])}
    if {"ContextTokens", "GeneratedTokens"} <= columns:
        return "azure"
    if {"Request tokens", "Response tokens"} <= columns:
        return "burstgpt"
    raise ValueError(
        f"{path}:{number}: cannot tell the trace format from its header {shown(first.strip())}; "
        "name it with --trace-format"
    )


def _first_line(path: Path) -> tuple[int, str]:
    try:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{number}: not UTF-8 text") from None
                if line.strip():
                    return number, line
    except OSError as error:
        raise ValueError(f"cannot read trace {path}: {error.strerror}") from None
    raise ValueError(f"{path}: the trace is empty")


# ------------------------------------------------------------------ JSON lines


def _json_lines(path: Path, raw: Any) -> Iterator[tuple[int, str]]:
    for number, line_bytes in enumerate(raw, start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: not UTF-8 text") from None
        if line.strip():
            yield number, line


def _read_hetero(path: Path, raw: Any) -> list[RequestSpec]:
    specs = []
    for number, line in _json_lines(path, raw):
        try:
            specs.append(parse_trace_line(line))
        except ValueError as error:  # DocumentError too
            raise ValueError(f"{path}:{number}: {error}") from None
    return specs


def _read_mooncake(path: Path, raw: Any) -> tuple[list[_Row], int]:
    rows, skipped = [], 0
    for number, line in _json_lines(path, raw):
        try:
            row = _mooncake_row(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped


def _mooncake_row(line: str) -> _Row | None:
    obj = load_json(line)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in _MOONCAKE_KEYS if key not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    timestamp = obj["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"timestamp must be a number of milliseconds, got {shown(timestamp)}")
    prompt = _count(obj["input_length"], "input_length")
    output = _count(obj["output_length"], "output_length")
    chain = integer_list(obj["hash_ids"], "hash_ids")
    if any(value < 0 for value in chain):
        raise ValueError("hash_ids must be >= 0")
    if len(chain) > -(-prompt // MOONCAKE_BLOCK_TOKENS):
        raise ValueError(
            f"{len(chain)} hash_ids of {MOONCAKE_BLOCK_TOKENS} tokens are more than "
            f"input_length {prompt} holds"
        )
    if not prompt or not output:
        return None
    return _arrival(timestamp / 1000.0), prompt, output, chain


# ------------------------------------------------------------------ CSV


def _csv_rows(
    path: Path, raw: Any, columns: tuple[str, ...], name: str
) -> Iterator[tuple[int, list[str]]]:
    """The rows of a CSV file as the listed columns, with their line numbers."""
    text = (line.decode("utf-8-sig") for line in raw)
    reader = csv.reader(text)
    try:
        header = [cell.strip() for cell in next(reader, [])]
        positions = [header.index(column) if column in header else -1 for column in columns]
        if -1 in positions:
            missing = [c for c, at in zip(columns, positions, strict=True) if at < 0]
            raise ValueError(
                f"{path}:1: a {name} trace has columns {', '.join(columns)}; "
                f"missing {', '.join(missing)}"
            )
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}"
                )
            yield reader.line_num, [row[at].strip() for at in positions]
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{reader.line_num + 1}: not UTF-8 text") from None
    except csv.Error as error:
        raise ValueError(f"{path}:{reader.line_num}: {error}") from None


def _read_azure(path: Path, raw: Any) -> tuple[list[_Row], int]:
    rows: list[_Row] = []
    skipped = 0
    base: int | None = None
    for number, (stamp, context, generated) in _csv_rows(path, raw, _AZURE_COLUMNS, "azure"):
        try:
            whole, fraction = _azure_time(stamp)
            prompt = _count(context, "ContextTokens")
            output = _count(generated, "GeneratedTokens")
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        if base is None:
            base = whole
        if not prompt or not output:
            skipped += 1
            continue
        # Whole seconds are subtracted as integers: a float of 1.7e9 s keeps only 0.2 us.
        rows.append((float(whole - base) + fraction, prompt, output, ()))
    return rows, skipped


def _azure_time(text: str) -> tuple[int, float]:
    """Whole seconds since the epoch (UTC unless a zone says otherwise), and the fraction."""
    match = _AZURE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"TIMESTAMP must read like 2023-11-16 18:15:46.6805900, got {shown(text)}")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    digits, zone = match.group(7) or "", match.group(8) or "Z"
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise ValueError(f"TIMESTAMP is not a valid time: {shown(text)}")
    whole = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        offset = zone[1:].replace(":", "")
        whole -= sign * (int(offset[:2]) * 3600 + int(offset[2:]) * 60)
    return whole, int(digits) / 10 ** len(digits) if digits else 0.0


def _read_burstgpt(path: Path, raw: Any) -> tuple[list[_Row], int]:
    rows: list[_Row] = []
    skipped = 0
    columns = _BURSTGPT_COLUMNS
    for number, (stamp, request, response) in _csv_rows(path, raw, columns, "burstgpt"):
        try:
            arrival = _arrival(_seconds(stamp, "Timestamp"))
            prompt = _count(request, "Request tokens")
            output = _count(response, "Response tokens")
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        if not prompt or not output:
            skipped += 1
            continue
        rows.append((arrival, prompt, output, ()))
    return rows, skipped


# ------------------------------------------------------------------ fields


def _count(value: object, name: str) -> int:
    """A token count: a JSON integer, or a CSV cell of digits (``12`` or ``12.0``)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(
                f"{name} must be a whole number of tokens, got {shown(value)}"
            ) from None
        if not number.is_integer():
            raise ValueError(f"{name} must be a whole number of tokens, got {shown(value)}")
        value = int(number)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number of tokens, got {shown(value)}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _seconds(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {shown(text)}") from None


def _arrival(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"the arrival time must be finite, got {seconds!r}")
    return seconds


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else math.nan


_PUBLIC_READERS: dict[str, Callable[[Path, Any], tuple[list[_Row], int]]] = {
    "mooncake": _read_mooncake,
    "azure": _read_azure,
    "burstgpt": _read_burstgpt,
}
