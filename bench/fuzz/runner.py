"""``python -m bench.fuzz.runner TARGET REPORT CRASH_DIR [LIBFUZZER_ARGS...]``: one target
under atheris.

The project's modules (and PyYAML's) are imported inside atheris' instrumentation, so
libFuzzer sees their coverage. An input whose one-input function raises is a crash: it
is counted, and the first input of each kind of crash (exception type and the innermost
project line it came from) is written to ``CRASH_DIR/<target>-<hash>``; fuzzing goes on.
libFuzzer ends the process without running ``atexit``, so what was found is written to
``REPORT`` (JSON) as it happens and every :data:`FLUSH_EVERY` inputs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from bench.fuzz import INSTALL_HINT, OneInput, load_target

FLUSH_EVERY = 500
_PROJECT_PREFIX = f"{Path(__file__).resolve().parents[2]}/"
# The project's own code (a virtual environment inside the checkout is not).
_PROJECT_CODE = tuple(
    f"{_PROJECT_PREFIX}{part}/" for part in ("router", "backends", "bench", "tests")
)
_INSTRUMENTED = ["router", "backends", "bench.fuzz", "yaml"]
_EXCERPT_CHARS = 200


def crash_signature(error: BaseException) -> str:
    """The kind of a crash: its exception type and the innermost project line it passed.

    Walks the frames without reading source lines: a RecursionError has a thousand.
    """
    where: tuple[str, int] | None = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        filename = frame.f_code.co_filename
        if where is None or filename.startswith(_PROJECT_CODE):
            where = (filename, line)
    if where is None:
        return type(error).__name__
    filename, line = where
    return f"{type(error).__name__} at {filename.removeprefix(_PROJECT_PREFIX)}:{line}"


def _describe(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # noqa: BLE001  # an exception whose str() fails still gets reported
        text = "(no message)"
    return f"{type(error).__name__}: {text[:_EXCERPT_CHARS]}"


class CrashRecorder:
    """Runs the one-input function and keeps what its crashes were."""

    def __init__(self, target: str, one_input: OneInput, report: Path, crash_dir: Path) -> None:
        self._target = target
        self._one_input = one_input
        self._report = report
        self._crash_dir = crash_dir
        self.runs = 0
        self.crashes = 0
        self.kinds: dict[str, dict[str, Any]] = {}

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        try:
            self._one_input(data)
        except Exception as error:  # noqa: BLE001  # any exception a target lets out is a crash
            self._record(data, error)
        if self.runs % FLUSH_EVERY == 0:
            self.flush()

    def _record(self, data: bytes, error: Exception) -> None:
        self.crashes += 1
        signature = crash_signature(error)
        kind = self.kinds.get(signature)
        if kind is not None:
            kind["count"] += 1
            return
        self._crash_dir.mkdir(parents=True, exist_ok=True)
        path = self._crash_dir / f"{self._target}-{hashlib.sha1(data).hexdigest()[:16]}"
        path.write_bytes(data)
        self.kinds[signature] = {
            "signature": signature,
            "exception": _describe(error),
            "input": str(path),
            "count": 1,
        }
        self.flush()

    def flush(self) -> None:
        report = {"runs": self.runs, "crashes": self.crashes, "kinds": list(self.kinds.values())}
        partial = self._report.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(self._report)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    target, report, crash_dir, *fuzzer_args = argv
    try:
        import atheris  # noqa: PLC0415  # in the bench extra only; this is its one user
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 3
    with atheris.instrument_imports(include=_INSTRUMENTED):
        one_input = load_target(target)
    recorder = CrashRecorder(target, one_input, Path(report), Path(crash_dir))
    recorder.flush()
    atheris.Setup([sys.argv[0], *fuzzer_args], recorder)
    atheris.Fuzz()  # libFuzzer exits the process when its runs are done
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
