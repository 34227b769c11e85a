"""Replays a fault plan on a fleet of device processes, in real time.

Each fault is checked again when it is due: the device must be up and its role must
keep another device that is up and that the router counts healthy (a restart can
take longer than the plan allowed for, and the router takes a while to take a
device back), else the fault is skipped and says why. Bringing a device back runs as
a task of its own, so faults overlap as planned; a restart that fails is tried
again, then reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from bench.chaos.fleet import DeviceStartError
from bench.chaos.schedule import FAULT_KINDS, Fault, FaultPlan

RESTART_ATTEMPTS = 3
RESTART_TIMEOUT_S = 20.0  # a device starts in 1-3 s on an idle machine
RESTART_BACKOFF_S = 1.0


class Devices(Protocol):
    """What the injector does to devices (``bench.chaos.fleet.Fleet``)."""

    def roles(self) -> dict[str, str]: ...
    def up(self, device_id: str) -> bool: ...
    async def kill(self, device_id: str) -> None: ...
    def stop(self, device_id: str) -> None: ...
    def resume(self, device_id: str) -> None: ...
    async def terminate(self, device_id: str, grace_s: float = ...) -> None: ...
    async def start(self, device_id: str, timeout_s: float | None = ...) -> None: ...


@dataclass
class FaultRecord:
    """What happened to one planned fault; times are offsets from the load's start."""

    fault: Fault
    outcome: str = "pending"  # applied, skipped, restart_failed
    applied_s: float | None = None
    back_s: float | None = None  # serving again (announced, or resumed)
    restart_attempts: int = 0
    detail: str = ""
    # What the router made of it (from polls of its backends; None: it never saw).
    router_down_after_s: float | None = None
    router_up_after_s: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.fault.device,
            "kind": self.fault.kind,
            "planned_s": self.fault.at_s,
            "hold_s": self.fault.hold_s,
            "outcome": self.outcome,
            "applied_s": _rounded(self.applied_s),
            "back_s": _rounded(self.back_s),
            "restart_attempts": self.restart_attempts,
            "detail": self.detail,
            "router_down_after_s": _rounded(self.router_down_after_s),
            "router_up_after_s": _rounded(self.router_up_after_s),
        }


class Injector:
    def __init__(
        self,
        fleet: Devices,
        plan: FaultPlan,
        started: float,
        *,
        routed: Callable[[str], bool] = lambda _device_id: True,
        restart_backoff_s: float = RESTART_BACKOFF_S,
    ) -> None:
        self._fleet = fleet
        # Whether the router counts a device healthy: one that serves again but is not
        # taken back yet leaves its role as short as one that is down.
        self._routed = routed
        self._restart_backoff_s = restart_backoff_s
        self._roles = fleet.roles()
        self._started = started  # time.monotonic() of the load's start
        self.records = [FaultRecord(fault) for fault in plan.faults]
        self._recoveries: set[asyncio.Task[None]] = set()

    def now_s(self) -> float:
        return time.monotonic() - self._started

    async def run(self) -> None:
        """Applies each fault at its time; returns after the last one was applied."""
        for record in self.records:
            await asyncio.sleep(max(0.0, record.fault.at_s - self.now_s()))
            await self._apply(record)

    async def finish(self, timeout_s: float) -> None:
        """Waits for every device to be back; past ``timeout_s`` cancels what is left."""
        if self._recoveries:
            _, late = await asyncio.wait(set(self._recoveries), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def counts(self) -> dict[str, dict[str, int]]:
        """Faults by kind and outcome."""
        by_outcome: dict[str, Counter[str]] = {}
        for record in self.records:
            by_outcome.setdefault(record.outcome, Counter())[record.fault.kind] += 1
        return {
            outcome: {kind: kinds.get(kind, 0) for kind in FAULT_KINDS}
            for outcome, kinds in sorted(by_outcome.items())
        }

    async def _apply(self, record: FaultRecord) -> None:
        fault = record.fault
        why_not = self._why_not(fault.device)
        if why_not:
            record.outcome, record.detail = "skipped", why_not
            return
        record.applied_s = self.now_s()
        try:
            if fault.kind == "kill":
                await self._fleet.kill(fault.device)
            elif fault.kind == "stop":
                self._fleet.stop(fault.device)
            else:
                await self._fleet.terminate(fault.device)
        except ProcessLookupError as error:  # it died on its own meanwhile
            record.outcome, record.detail = "skipped", str(error)
            return
        record.outcome = "applied"
        self._in_background(self._bring_back(record))

    def _why_not(self, device_id: str) -> str:
        if not self._fleet.up(device_id):
            return f"{device_id} is not up"
        role = self._roles[device_id]
        others = [d for d, r in self._roles.items() if d != device_id and r == role]
        if not any(self._fleet.up(other) for other in others):
            return f"{device_id} is the last {role} device up"
        if not any(self._fleet.up(other) and self._routed(other) for other in others):
            return f"{device_id} is the last {role} device the router counts healthy"
        return ""

    async def _bring_back(self, record: FaultRecord) -> None:
        fault = record.fault
        await asyncio.sleep(max(0.0, fault.back_s - self.now_s()))
        if fault.kind == "stop":
            try:
                self._fleet.resume(fault.device)
            except ProcessLookupError as error:
                record.detail = f"exited while stopped ({error}); restarted"
            else:
                record.back_s = self.now_s()
                return
        await self._restart(record)

    async def _restart(self, record: FaultRecord) -> None:
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            record.restart_attempts = attempt
            try:
                await self._fleet.start(record.fault.device, RESTART_TIMEOUT_S)
            except DeviceStartError as error:
                record.detail = str(error)
                await asyncio.sleep(self._restart_backoff_s * attempt)
                continue
            record.back_s = self.now_s()
            return
        record.outcome = "restart_failed"

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
