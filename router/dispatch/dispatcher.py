"""Runs one request's plan and streams its frames.

Frames are bytes encoded as ``GenerateResponse`` by the backend. The router adds
the route to the first one by prepending an encoded ``GenerateResponse(route=...)``:
concatenated protobuf messages merge, so no frame is ever decoded and re-encoded.
Only the last frame is parsed, once, for its usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest, KVHandle, PrefillResult
from backends.errors import BackendError, LayoutMismatchError, OverloadedError, ServingError
from backends.prefix import BLOCK_BYTES, block_hashes
from router.dispatch.admission import AdmissionGate
from router.handoff.relay import relay
from router.logging import get_logger
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.scheduling.handoff import NextStep, after_failed_leg, after_prefill
from router.scheduling.plan import Disaggregation, Mode, Plan, RequestFeatures
from router.scheduling.scheduler import Scheduler
from router.scheduling.service_level import DEFAULT_SERVICE, DEFAULT_SLO_CLASS, ServiceLevel
from router.scheduling.slo import Slo
from router.settings import Settings

log = get_logger(__name__)

_ROUTE_MODE = {
    Mode.SPLIT: router_pb2.ROUTE_MODE_SPLIT,
    Mode.COLOCATED: router_pb2.ROUTE_MODE_COLOCATED,
}


@dataclass
class _Progress:
    """What the dispatcher learns while streaming, for metrics and logs."""

    mode: Mode
    started: float  # arrival, before any wait for admission
    slo: Slo | None = None  # what the request is held to (None: nothing)
    slo_class: str = DEFAULT_SLO_CLASS
    first_frame_at: float | None = None
    last_frame_at: float = 0.0
    last_frame: bytes = b""


class Dispatcher:
    def __init__(
        self,
        pool: Pool,
        scheduler: Scheduler,
        settings: Settings,
        metrics: RouterMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._scheduler = scheduler
        self._settings = settings
        self._metrics = metrics
        self._arrivals = itertools.count()
        self._background: set[asyncio.Task[None]] = set()
        self._clock = clock  # what latencies are measured with
        self.admission = AdmissionGate(
            settings.max_in_flight, settings.queue_limit, metrics, clock=clock
        )
        # Prompt tokens one hashed prefix block stands for (its bytes over bytes per token).
        self._block_tokens = BLOCK_BYTES / settings.bytes_per_token

    @property
    def slo_classes(self) -> frozenset[str]:
        """The SLO classes a request may name: those of the scheduler's policy."""
        return self._scheduler.slo_classes

    def class_slo(self, slo_class: str) -> Slo:
        """The default targets of an SLO class."""
        return self._scheduler.default_slo(slo_class)

    async def generate(
        self,
        request: GenerationRequest,
        disaggregation: Disaggregation,
        service: ServiceLevel = DEFAULT_SERVICE,
    ) -> AsyncGenerator[bytes, None]:
        arrived = self._clock()
        try:
            queued = await self.admission.acquire(service.priority)
        except OverloadedError:
            self.count_rejected("overloaded")
            raise
        except asyncio.CancelledError:
            self.count_rejected("cancelled")
            raise
        try:
            now = self._clock()
            class_slo = self.class_slo(service.slo_class)
            features = RequestFeatures(
                request_id=request.request_id,
                model=request.model,
                prompt_tokens=request.prompt_tokens,
                max_tokens=request.sampling.max_tokens,
                disaggregation=disaggregation,
                sequence=next(self._arrivals),
                slo=service.scheduling_slo(class_slo, now - arrived if queued else 0.0),
                priority=service.priority,
                slo_class=service.slo_class,
                prefix_hashes=block_hashes(request.prompt),
                prefix_block_tokens=self._block_tokens,
            )
            plan = self._schedule(features, now)
            # Both backends of the plan end up holding the prompt's KV.
            self._pool.record_prefix(plan.prefill_backend, features.prefix_hashes)
            if plan.decode_backend != plan.prefill_backend:
                self._pool.record_prefix(plan.decode_backend, features.prefix_hashes)
            progress = _Progress(
                plan.mode, arrived, service.effective_slo(class_slo), service.slo_class
            )
            outcome = "error"
            self._metrics.in_flight.inc()
            try:
                run = self._split if plan.mode is Mode.SPLIT else self._colocated
                async with contextlib.aclosing(run(request, plan)) as frames:
                    async for frame in frames:
                        progress.last_frame_at = self._clock()
                        if progress.first_frame_at is None:
                            progress.first_frame_at = progress.last_frame_at
                        progress.last_frame = frame
                        yield frame
                outcome = "ok"
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "cancelled"
                raise
            except ServingError as error:
                outcome = _outcome(error)
                raise
            finally:
                self._metrics.in_flight.dec()
                self._record(progress, outcome)
        finally:
            self.admission.release()

    def _schedule(self, features: RequestFeatures, now: float) -> Plan:
        try:
            return self._scheduler.schedule(features, self._pool.snapshot(), now)
        except OverloadedError as error:  # predicted to miss its SLO: shed now, not late
            self._metrics.shed.labels("slo").inc()
            if error.retry_after_s is None:
                error.retry_after_s = self.admission.retry_after_s(features.priority)
            self.count_rejected(_outcome(error))
            raise
        except ServingError as error:
            self.count_rejected(_outcome(error))
            raise

    async def _colocated(
        self, request: GenerationRequest, plan: Plan
    ) -> AsyncGenerator[bytes, None]:
        backend_id = plan.prefill_backend
        route = _route_frame(request, Mode.COLOCATED, backend_id, backend_id)
        with (
            self._pool.outstanding(backend_id) as backend,
            contextlib.ExitStack() as load,
        ):
            prefilling = load.enter_context(
                self._pool.prefilling(backend_id, request.prompt_tokens)
            )
            async with (
                self._aborting_on_exit(request.request_id, [backend_id]) as done,
                contextlib.aclosing(
                    backend.generate(request, self._settings.decode_timeout_s)
                ) as frames,
            ):
                first = True
                async for frame in frames:
                    if first:
                        # The prefill is done with the first token; decoding starts.
                        prefilling.release()
                        load.enter_context(
                            self._pool.decoding(backend_id, _context_tokens(request))
                        )
                        yield route + frame
                        first = False
                    else:
                        yield frame
                done.set()

    async def _split(self, request: GenerationRequest, plan: Plan) -> AsyncGenerator[bytes, None]:
        legs = [plan.prefill_backend, plan.decode_backend]
        async with self._aborting_on_exit(request.request_id, legs) as done:
            try:
                prefill = await self._prefill(request, plan.prefill_backend)
            except BackendError as error:
                step = after_failed_leg(retryable=error.retryable, client_has_tokens=False)
                if step is NextStep.FAIL:
                    raise
                async with contextlib.aclosing(
                    self._instead_colocated(request, plan, error, "prefill")
                ) as frames:
                    async for frame in frames:
                        yield frame
                done.set()
                return
            route = _route_frame(request, Mode.SPLIT, plan.prefill_backend, plan.decode_backend)
            if prefill.first_frame:
                # The first token goes to the client now; it does not wait for the KV to move.
                yield route + prefill.first_frame
                route = b""
            handle = prefill.handle
            step = after_prefill(
                plan,
                finished=prefill.finished or handle is None,
                layouts_compatible=self._pool.layouts_compatible(
                    plan.prefill_backend, plan.decode_backend
                ),
            )
            # Without a handle the step is FINISHED; testing it again tells the type checker.
            if step is NextStep.FINISHED or handle is None:
                if route:  # nothing was sent yet: the client still gets its route
                    yield route + prefill.first_frame
                done.set()
                return
            if step is NextStep.RELAY_THEN_DECODE:
                handle = await self._relay(request, plan, handle)
            async with contextlib.aclosing(
                self._decode_leg(request, plan, handle, prefill.first_token_id, route)
            ) as frames:
                async for frame in frames:
                    yield frame
            done.set()

    async def _decode_leg(
        self,
        request: GenerationRequest,
        plan: Plan,
        handle: KVHandle,
        first_token_id: int,
        route: bytes,
    ) -> AsyncGenerator[bytes, None]:
        """Streams the decode; ``route`` is what still goes before its first frame."""
        try:
            with (
                self._pool.outstanding(plan.decode_backend) as decoder,
                self._pool.decoding(plan.decode_backend, _context_tokens(request)),
            ):
                decode = decoder.decode(
                    request, handle, first_token_id, self._settings.decode_timeout_s
                )
                async with contextlib.aclosing(decode) as frames:
                    if route:  # no token has reached the client: a stalled handoff can fall back
                        first = await self._first_in_time(frames, plan.decode_backend)
                        if first is None:
                            return
                        yield route + first
                        route = b""
                    async for frame in frames:
                        yield frame
        except BackendError as error:
            step = after_failed_leg(retryable=error.retryable, client_has_tokens=not route)
            if step is NextStep.FAIL:
                raise
            async with contextlib.aclosing(
                self._instead_colocated(request, plan, error, "decode")
            ) as frames:
                async for frame in frames:
                    yield frame

    async def _first_in_time(
        self, frames: AsyncGenerator[bytes, None], backend_id: str
    ) -> bytes | None:
        """The decode leg's first frame (None: it ended without one), within the
        handoff deadline; past it a retryable BackendError, so that the request is
        served colocated (closing the leg aborts it on the engine)."""
        limit = self._settings.handoff_timeout_s
        try:
            async with asyncio.timeout(limit):
                return await anext(frames, None)
        except TimeoutError:
            raise BackendError(
                backend_id, f"no token within {limit:g} s of the prefill: the KV handoff stalled"
            ) from None

    async def _relay(self, request: GenerationRequest, plan: Plan, handle: KVHandle) -> KVHandle:
        """Moves the KV to the decode backend; on failure the decode side pulls it itself."""
        source = self._pool.backend(plan.prefill_backend)
        sink = self._pool.backend(plan.decode_backend)
        try:
            moved = await relay(
                source,
                sink,
                handle,
                timeout_s=self._settings.prefill_timeout_s,
                target_layout=self._pool.endpoints[plan.decode_backend].layout,
            )
        except LayoutMismatchError:
            raise  # the decode side could not take it either
        except ServingError as error:
            log.warning("KV relay failed; decode pulls it", error=str(error))
            self._metrics.backend_failures.labels(plan.decode_backend, "relay").inc()
            return handle
        self._in_background(self._abort(plan.prefill_backend, request.request_id))  # frees it
        return moved

    async def _instead_colocated(
        self, request: GenerationRequest, plan: Plan, error: BackendError, phase: str
    ) -> AsyncGenerator[bytes, None]:
        """Serves a request whose split failed on the decode backend alone (local prefill)."""
        log.warning(
            f"{phase} failed; serving colocated", backend=error.backend_id, error=str(error)
        )
        self._metrics.backend_failures.labels(error.backend_id, phase).inc()
        fallback = Plan(Mode.COLOCATED, plan.decode_backend, plan.decode_backend)
        async with contextlib.aclosing(self._colocated(request, fallback)) as frames:
            async for frame in frames:
                yield frame

    async def _prefill(self, request: GenerationRequest, backend_id: str) -> PrefillResult:
        with (
            self._pool.outstanding(backend_id) as backend,
            self._pool.prefilling(backend_id, request.prompt_tokens),
        ):
            return await backend.prefill(request, self._settings.prefill_timeout_s)

    @contextlib.asynccontextmanager
    async def _aborting_on_exit(
        self, request_id: str, backend_ids: list[str]
    ) -> AsyncIterator[asyncio.Event]:
        """Aborts the request on every backend unless the block sets the event (clean finish).

        Covers a client that goes away, a failed leg and a KV lease nobody will fetch.
        The aborts run in the background so a cancelled request returns at once.
        """
        done = asyncio.Event()
        try:
            yield done
        finally:
            if not done.is_set():
                for backend_id in dict.fromkeys(backend_ids):
                    self._in_background(self._abort(backend_id, request_id))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, backend_id: str, request_id: str) -> None:
        try:
            await self._pool.backend(backend_id).abort(request_id, self._settings.abort_timeout_s)
        except Exception as error:  # noqa: BLE001  # best effort: the lease timeout is the backstop
            log.warning("abort failed", backend=backend_id, request=request_id, error=str(error))

    def count_rejected(self, outcome: str) -> None:
        """A request refused before it had a plan (bad input, no backend)."""
        self._metrics.requests.labels(outcome, "none").inc()

    async def drain_background(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _record(self, progress: _Progress, outcome: str) -> None:
        mode = progress.mode.value
        self._metrics.requests.labels(outcome, mode).inc()
        if outcome != "ok" or progress.first_frame_at is None:
            return
        ttft = progress.first_frame_at - progress.started
        self._metrics.time_to_first_token.labels(mode).observe(ttft)
        self._metrics.request_duration.labels(mode).observe(
            progress.last_frame_at - progress.started
        )
        tokens = router_pb2.GenerateResponse.FromString(progress.last_frame).usage.completion_tokens
        self._metrics.output_tokens.labels(mode).inc(tokens)
        tpot = 0.0
        if tokens > 1:
            tpot = (progress.last_frame_at - progress.first_frame_at) / (tokens - 1)
            self._metrics.time_per_output_token.labels(mode).observe(tpot)
        if progress.slo is not None:
            met = progress.slo.met_by(ttft, tpot)
            self._metrics.slo_requests.labels(
                "met" if met else "missed", progress.slo_class, mode
            ).inc()


def _context_tokens(request: GenerationRequest) -> int:
    """KV tokens a sequence may reach: its prompt and every token it may generate."""
    return request.prompt_tokens + request.sampling.max_tokens


def _outcome(error: ServingError) -> str:
    """The metrics label of an error: NoHealthyBackendError -> "nohealthybackend"."""
    return type(error).__name__.removesuffix("Error").lower()


def _route_frame(
    request: GenerationRequest, mode: Mode, prefill_backend: str, decode_backend: str
) -> bytes:
    route = router_pb2.Route(
        mode=_ROUTE_MODE[mode],
        prefill_backend=prefill_backend,
        decode_backend=decode_backend,
        request_id=request.request_id,
        seed=request.sampling.seed,
    )
    return router_pb2.GenerateResponse(route=route).SerializeToString()
