"""The chaos run over time, for its plot: per-second series of both runs, and each
request of the chaos run. Written beside the result as two CSV files (the result's
JSON stays small), and read back to draw the plot again without running anything.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.chaos.verdicts import Delivery, per_bin

PER_SECOND = "chaos-timeline.csv"
REQUESTS = "chaos-requests.csv"
_SERIES = (
    "tokens_fault_free",
    "tokens_chaos",
    "completed_fault_free",
    "completed_chaos",
    "errors_chaos",
    "lost_chaos",
)
_REQUEST_FIELDS = ("start_s", "ttft_s", "elapsed_s", "ending")


@dataclass(frozen=True)
class RequestPoint:
    start_s: float  # offset of its send from the load's start
    ttft_s: float | None  # None: no token came
    elapsed_s: float  # until it ended
    ending: str


@dataclass(frozen=True)
class Timeline:
    bin_s: float
    series: dict[str, list[int]]  # _SERIES, one count per bin
    requests: list[RequestPoint]

    @property
    def span_s(self) -> float:
        return len(self.series["tokens_chaos"]) * self.bin_s

    def write(self, out_dir: Path) -> None:
        with (out_dir / PER_SECOND).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["start_s", *_SERIES])
            for index, row in enumerate(zip(*(self.series[s] for s in _SERIES), strict=True)):
                writer.writerow([round(index * self.bin_s, 3), *row])
        with (out_dir / REQUESTS).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(_REQUEST_FIELDS)
            for point in self.requests:
                ttft = "" if point.ttft_s is None else round(point.ttft_s, 4)
                writer.writerow(
                    [round(point.start_s, 3), ttft, round(point.elapsed_s, 4), point.ending]
                )

    @classmethod
    def read(cls, out_dir: Path) -> Timeline:
        with (out_dir / PER_SECOND).open(newline="") as file:
            rows = list(csv.DictReader(file))
        bin_s = float(rows[1]["start_s"]) - float(rows[0]["start_s"]) if len(rows) > 1 else 1.0
        series = {name: [int(row[name]) for row in rows] for name in _SERIES}
        with (out_dir / REQUESTS).open(newline="") as file:
            requests = [
                RequestPoint(
                    float(row["start_s"]),
                    float(row["ttft_s"]) if row["ttft_s"] else None,
                    float(row["elapsed_s"]),
                    row["ending"],
                )
                for row in csv.DictReader(file)
            ]
        return cls(bin_s, series, requests)


def timeline_of(
    fault_free: Sequence[Delivery],
    fault_free_started: float,
    chaos: Sequence[Delivery],
    chaos_started: float,
    bin_s: float,
) -> Timeline:
    """Both runs binned from their own start, over the longer of the two."""
    span = max(
        [(d.end_s or d.start_s) - fault_free_started for d in fault_free]
        + [(d.end_s or d.start_s) - chaos_started for d in chaos]
        + [bin_s]
    )

    def binned(deliveries: Sequence[Delivery], started: float, ending: str | None) -> list[int]:
        return per_bin(
            [
                (d.end_s or d.start_s) - started
                for d in deliveries
                if ending is None or d.ending.startswith(ending)
            ],
            span,
            bin_s,
        )

    def tokens(deliveries: Sequence[Delivery], started: float) -> list[int]:
        return per_bin([t - started for d in deliveries for t in d.token_times_s], span, bin_s)

    series = {
        "tokens_fault_free": tokens(fault_free, fault_free_started),
        "tokens_chaos": tokens(chaos, chaos_started),
        "completed_fault_free": binned(fault_free, fault_free_started, "complete"),
        "completed_chaos": binned(chaos, chaos_started, "complete"),
        "errors_chaos": binned(chaos, chaos_started, "error"),
        "lost_chaos": binned(chaos, chaos_started, "lost"),
    }
    points = [
        RequestPoint(
            d.start_s - chaos_started,
            None if d.first_token_s is None else d.first_token_s - d.start_s,
            (d.end_s or d.start_s) - d.start_s,
            d.ending,
        )
        for d in chaos
    ]
    return Timeline(bin_s, series, points)
