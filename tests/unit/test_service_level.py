"""SLO, priority and SLO class: validation, and how a partial SLO is completed."""

from __future__ import annotations

import pytest

from backends._gen.hetero.router.v1 import router_pb2
from router.api.validation import validate_service
from router.cli import build_parser
from router.client import build_request
from router.errors import InvalidRequestError
from router.scheduling.service_level import FALLBACK_SLO, ServiceLevel
from router.scheduling.slo import Slo

CLASSES = frozenset({"default", "interactive", "batch"})


def message(**fields: object) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(prompt="hi", **fields)  # type: ignore[arg-type]  # any field, to test checks


def test_nothing_set_is_the_default_class_at_priority_zero() -> None:
    assert validate_service(message(), CLASSES) == ServiceLevel(None, None, 0, "default")


def test_values_within_bounds_are_kept() -> None:
    service = validate_service(
        message(
            slo=router_pb2.Slo(ttft_ms=1, tpot_ms=3_600_000), priority=9, slo_class="interactive"
        ),
        CLASSES,
    )
    assert service == ServiceLevel(1, 3_600_000, 9, "interactive")


def test_one_target_may_be_set_alone() -> None:
    service = validate_service(message(slo=router_pb2.Slo(tpot_ms=40)), CLASSES)
    assert (service.ttft_ms, service.tpot_ms) == (None, 40)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"slo": router_pb2.Slo(ttft_ms=0)}, "slo.ttft_ms must be between 1 and 3600000"),
        ({"slo": router_pb2.Slo(ttft_ms=3_600_001)}, "got 3600001; leave it unset"),
        ({"slo": router_pb2.Slo(tpot_ms=0)}, "slo.tpot_ms must be between 1 and 3600000"),
        ({"priority": 10}, "priority must be between 0 and 9 (larger is more urgent), got 10"),
        ({"slo_class": "gold"}, "unknown slo_class 'gold'; known: batch, default, interactive"),
        ({"slo_class": "x" * 500}, "unknown slo_class '" + "x" * 64 + "...'"),
    ],
)
def test_bad_values_are_refused_with_a_reason(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        validate_service(message(**fields), CLASSES)
    assert reason in raised.value.message


def test_a_partial_slo_is_completed_from_the_class_and_else_from_the_fallback() -> None:
    interactive = Slo(ttft_s=0.3, tpot_s=0.03)
    assert ServiceLevel().own_slo(interactive) is None
    assert ServiceLevel().effective_slo(interactive) == interactive
    assert ServiceLevel().effective_slo(None) is None
    assert ServiceLevel(ttft_ms=500).own_slo(interactive) == Slo(0.5, 0.03)
    assert ServiceLevel(tpot_ms=10).own_slo(interactive) == Slo(0.3, 0.01)
    assert ServiceLevel(ttft_ms=500).own_slo(None) == Slo(0.5, FALLBACK_SLO.tpot_s)
    assert ServiceLevel(ttft_ms=500, tpot_ms=20).effective_slo(interactive) == Slo(0.5, 0.02)


def test_the_sdk_sets_only_the_targets_it_is_given() -> None:
    plain = build_request("hi")
    assert not plain.HasField("slo")
    assert (plain.priority, plain.slo_class) == (0, "")
    full = build_request("hi", slo_ttft_ms=250, priority=7, slo_class="interactive")
    assert full.slo.ttft_ms == 250
    assert not full.slo.HasField("tpot_ms")
    assert (full.priority, full.slo_class) == (7, "interactive")


def test_the_generate_command_takes_the_service_level_flags() -> None:
    options = build_parser().parse_args(
        ["generate", "hi", "--slo-ttft-ms", "300", "--slo-tpot-ms", "40", "--priority", "8",
         "--slo-class", "interactive"]
    )  # fmt: skip
    assert (options.slo_ttft_ms, options.slo_tpot_ms) == (300, 40)
    assert (options.priority, options.slo_class) == (8, "interactive")
    defaults = build_parser().parse_args(["generate", "hi"])
    assert (defaults.slo_ttft_ms, defaults.slo_tpot_ms, defaults.priority) == (None, None, 0)
    assert defaults.slo_class == ""
