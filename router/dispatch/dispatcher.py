"""Runs one request's plan and streams its frames; tries again when a backend fails.

Frames are bytes encoded as ``GenerateResponse`` by the backend. The router adds
the route to the first one by prepending an encoded ``GenerateResponse(route=...)``:
concatenated protobuf messages merge, so a frame goes out as the bytes it came in
as. Each is parsed once, to count its tokens against ``max_tokens`` and to remember
their ids; only a frame the router must change (the last of a resumed request, whose
usage it corrects, or one past ``max_tokens``) is encoded again.

Failures. Every leg waits for its backend under a deadline: the first token within
a multiple of its predicted time to first token, every later one within a multiple
of the predicted decode step (both at least ``stall_timeout_s``), and at once when
the backend leaves service (a failed health check, an ejection). A leg that fails
counts against its backend (passive outlier detection) and the request is tried
again, within ``max_attempts`` and the retry budget: planned again away from the
failed backend when no token reached the client yet, else resumed on a backend that
can continue from the tokens the client has (``generated_ids``), so that the
client's stream simply goes on, with no token lost or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from typing import Any, NoReturn, TypeVar

from google.protobuf.message import DecodeError

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest, KVHandle, PrefillResult
from backends.errors import BackendError, LayoutMismatchError, OverloadedError, ServingError
from backends.prefix import BLOCK_BYTES, block_hashes
from router.dispatch.admission import AdmissionGate
from router.dispatch.deadline import Deadline, DeadlineExpiredError
from router.dispatch.retry import RetryBudget
from router.errors import NoHealthyBackendError
from router.handoff.relay import relay
from router.logging import get_logger
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.record import Leg, RequestObserver, RequestRecord
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
_T = TypeVar("_T")
# Outcomes whose log line is sampled (HETERO_ROUTER_REQUEST_LOG_SAMPLE_RATE).
_SAMPLED_OUTCOMES = frozenset({"ok", "cancelled", "overloaded"})


class _HandoffFailedError(BackendError):
    """The decode leg of a split failed, or sent nothing in time, before its first
    frame: the KV did not arrive (a stalled or failed read, a handshake to a restarted
    engine). Both backends may be fine, so neither is blamed: the request is served by
    one backend alone (a decode backend that is down fails that attempt in turn)."""


class _Sent:
    """What the client was sent: tokens counted against ``max_tokens``, their ids kept
    for a resume, and whether the stream is over."""

    __slots__ = (
        "aborting",
        "backend",
        "cut",
        "finished",
        "ids_known",
        "ids_seen",
        "max_tokens",
        "phase",
        "prompt_tokens",
        "record",
        "resumed",
        "token_ids",
    )

    def __init__(self, max_tokens: int, prompt_tokens: int, record: RequestRecord) -> None:
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens  # the estimate, for a usage the router makes
        self.record = record  # what metrics, the log line and traces are made of
        self.token_ids: list[int] = []
        # False once a frame had text but no ids (an adapter without token ids):
        # what the client has can then not be resumed from.
        self.ids_known = True
        # True once a frame carried token ids: a frame of text alone after that is the
        # end of a character split across tokens already counted, not a token.
        self.ids_seen = False
        self.resumed = 0  # tokens the current attempt continues after
        self.finished = False  # the last frame (with a finish reason) was taken
        self.cut = False  # the router ended the stream: the backend must be aborted
        self.phase = "generate"  # the leg running now, for metrics
        self.backend = ""  # and its backend: what a failure is put down to
        # Aborts of a failed attempt still on their way, by backend.
        self.aborting: dict[str, asyncio.Task[None]] = {}

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def take(self, frame: bytes, backend_id: str) -> bytes:
        """Checks one frame from ``backend_id``; returns what goes to the client."""
        try:
            message = router_pb2.GenerateResponse.FromString(frame)
        except DecodeError:
            raise BackendError(backend_id, "sent a frame that is not a GenerateResponse") from None
        if self.finished:  # a backend streaming on after its last frame
            self.cut = True
            return b""
        ids = message.token_ids
        count = len(ids) if ids else (1 if message.text and not self.ids_seen else 0)
        left = self.max_tokens - self.tokens
        rewrite = False
        if count > left:
            # The backend runs past max_tokens: what fits goes out and the stream ends.
            # Text cannot be split by token, so a frame cut in two loses its text.
            del ids[left:]
            message.text = ""
            message.finish_reason = router_pb2.FINISH_REASON_LENGTH
            count = left
            self.cut = True
            rewrite = True
        if ids:
            self.token_ids.extend(ids)
            self.ids_seen = True
        elif count:
            self.token_ids.append(-1)  # a token of unknown id: counted, not resumable
            self.ids_known = False
        self.record.completion_tokens = len(self.token_ids)
        if message.finish_reason:
            self.finished = True
            self.record.finish_reason = message.finish_reason
            self.record.prompt_tokens = message.usage.prompt_tokens
            if self.resumed or self.cut:
                # Usage of the whole request: the resumed attempt's backend counted the
                # tokens it continued after as prompt.
                reported = message.usage.prompt_tokens - self.resumed
                message.usage.prompt_tokens = reported if reported > 0 else self.prompt_tokens
                message.usage.completion_tokens = self.tokens
                self.record.prompt_tokens = message.usage.prompt_tokens
                rewrite = True
        return message.SerializeToString() if rewrite else frame


class _Watch:
    """One leg's deadline on what it waits for next (one lazy timer for the leg, see
    ``router.dispatch.deadline``), cut short when its backend leaves service (a failed
    health check, an ejection)."""

    __slots__ = ("_deadline", "backend_id")

    def __init__(self, backend_id: str) -> None:
        self.backend_id = backend_id
        self._deadline = Deadline()

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._deadline.close()

    @property
    def left(self) -> bool:
        return self._deadline.interrupted

    def leave(self) -> None:
        self._deadline.interrupt()

    async def wait(
        self,
        work: Awaitable[_T],
        limit_s: float,
        stalled: Callable[[str, float], BackendError],
    ) -> _T:
        try:
            return await self._deadline.wait(work, limit_s)
        except DeadlineExpiredError:
            if self.left:
                raise BackendError(
                    self.backend_id, "left service mid-request (failed health checks)"
                ) from None
            raise stalled(self.backend_id, limit_s) from None


def _no_first_token(backend_id: str, limit_s: float) -> BackendError:
    return BackendError(backend_id, f"no first token within {limit_s:.3g} s: stalled")


def _no_next_token(backend_id: str, limit_s: float) -> BackendError:
    return BackendError(backend_id, f"no token for {limit_s:.3g} s mid-stream: stalled")


def _handoff_stalled(backend_id: str, limit_s: float) -> BackendError:
    return _HandoffFailedError(
        backend_id, f"no token within {limit_s:g} s of the prefill: the KV handoff stalled"
    )


class Dispatcher:
    def __init__(
        self,
        pool: Pool,
        scheduler: Scheduler,
        settings: Settings,
        metrics: RouterMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[RequestObserver] = (),
    ) -> None:
        """``observers`` are told of every request (tracing)."""
        self._pool = pool
        self._observers = tuple(observers)
        self._scheduler = scheduler
        self._settings = settings
        self._metrics = metrics
        self._arrivals = itertools.count()
        self._background: set[asyncio.Task[None]] = set()
        self._clock = clock  # what latencies are measured with
        self.admission = AdmissionGate(
            settings.max_in_flight,
            settings.queue_limit,
            metrics,
            clock=clock,
            adaptive=settings.concurrency_limit(scheduler.default_slo(DEFAULT_SLO_CLASS)),
        )
        self.retry_budget = RetryBudget(
            lambda: self.admission.in_flight,
            settings.retry_budget_percent,
            settings.retry_budget_min,
        )
        # Prompt tokens one hashed prefix block stands for (its bytes over bytes per token).
        self._block_tokens = BLOCK_BYTES / settings.bytes_per_token

    def set_scheduler(self, scheduler: Scheduler) -> None:
        """A new policy (a reloaded policy file): requests scheduled from now on follow
        it; those in flight keep the plans they have. The adaptive limit keeps the
        floors it was started with."""
        self._scheduler = scheduler

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
        record = RequestRecord(request, self._clock(), time.time_ns(), service.slo_class)
        for observer in self._observers:
            try:
                traceparent = observer.started(record)
            except Exception as error:  # noqa: BLE001  # an observer's fault never fails a request
                log.warning(
                    "request observer failed", observer=type(observer).__name__, error=str(error)
                )
                continue
            if traceparent != request.traceparent:
                request = dataclasses.replace(request, traceparent=traceparent)
        try:
            async with contextlib.aclosing(
                self._admitted(request, disaggregation, service, record)
            ) as frames:
                async for frame in frames:
                    yield frame
            record.outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome = "cancelled"
            raise
        except ServingError as error:
            record.outcome = _outcome(error)
            record.error = error.message
            raise
        finally:
            self._finished(record, service)

    async def _admitted(
        self,
        request: GenerationRequest,
        disaggregation: Disaggregation,
        service: ServiceLevel,
        record: RequestRecord,
    ) -> AsyncGenerator[bytes, None]:
        waiting = self._metrics.waiting_by_model(request.model)
        waiting.inc()
        try:
            queued = await self.admission.acquire(service.priority)
        finally:
            waiting.dec()
        running = self._metrics.running_by_model(request.model)
        try:
            now = record.admitted = self._clock()
            class_slo = self.class_slo(service.slo_class)
            features = RequestFeatures(
                request_id=request.request_id,
                model=request.model,
                prompt_tokens=request.prompt_tokens,
                max_tokens=request.sampling.max_tokens,
                disaggregation=disaggregation,
                sequence=next(self._arrivals),
                slo=service.scheduling_slo(class_slo, now - record.arrived if queued else 0.0),
                priority=service.priority,
                slo_class=service.slo_class,
                prefix_hashes=block_hashes(request.prompt),
                prefix_block_tokens=self._block_tokens,
            )
            record.planned_slo = features.slo or class_slo
            plan = self._schedule(features, now)
            self._metrics.record_decision(request.model, service.slo_class, plan)
            running.inc()
            try:
                attempts = self._attempts(request, features, plan, record)
                async with contextlib.aclosing(attempts) as frames:
                    async for frame in frames:
                        at = self._clock()
                        if record.first_token_at is not None:
                            record.frame_gaps.append(at - record.last_token_at)
                        elif record.completion_tokens:  # (a frame may carry no token)
                            record.first_token_at = at
                            self.admission.observe_first_token(at - now)
                        record.last_token_at = at
                        yield frame
            finally:
                running.dec()
        finally:
            self.admission.release()

    def _finished(self, record: RequestRecord, service: ServiceLevel) -> None:
        """Metrics, the log line and the observers of a request that is over."""
        met: tuple[bool | None, bool | None] = (None, None)
        if record.outcome == "ok" and record.first_token_at is not None:
            slo = service.effective_slo(self.class_slo(service.slo_class))
            tpot = record.tpot_s
            if tpot is not None:
                self.admission.observe_time_per_token(tpot)
            if slo is not None:
                ttft = record.first_token_at - record.arrived
                record.slo_met = slo.met_by(ttft, tpot)
                met = (
                    None if slo.ttft_s is None else ttft <= slo.ttft_s,
                    None if slo.tpot_s is None or tpot is None else tpot <= slo.tpot_s,
                )
        self._metrics.record_request(record, met)
        # Failures are always logged; what is common under load follows the sample rate.
        if record.outcome not in _SAMPLED_OUTCOMES or self._log_sampled():
            log.info("request finished", **record.log_fields())
        for observer in self._observers:
            try:
                observer.finished(record)
            except Exception as error:  # noqa: BLE001  # an observer's fault never fails a request
                log.warning(
                    "request observer failed", observer=type(observer).__name__, error=str(error)
                )

    def _log_sampled(self) -> bool:
        rate = self._settings.request_log_sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)  # sampling, not security

    def _schedule(self, features: RequestFeatures, now: float) -> Plan:
        try:
            return self._scheduler.schedule(features, self._pool.snapshot(), now)
        except OverloadedError as error:  # predicted to miss its SLO: shed now, not late
            self._metrics.shed.labels(features.model, features.slo_class, "slo").inc()
            if error.retry_after_s is None:
                error.retry_after_s = self.admission.retry_after_s(features.priority)
            raise
        except ServingError as error:
            if isinstance(error, NoHealthyBackendError) and error.retry_after_s is None:
                # A backend may be back by the next health check.
                error.retry_after_s = self._settings.health_interval_s
            raise

    # -- attempts ----------------------------------------------------------------

    async def _attempts(
        self,
        request: GenerationRequest,
        features: RequestFeatures,
        plan: Plan,
        record: RequestRecord,
    ) -> AsyncGenerator[bytes, None]:
        """Runs the plan, then as many further attempts as failures call for and allow."""
        sent = _Sent(request.sampling.max_tokens, request.prompt_tokens, record)
        excluded: set[str] = set()  # backends this request failed on
        attempt, attempts = request, 1
        # Holds the retry budget's share from a retry's start to its first frame.
        retrying = contextlib.AsyncExitStack()
        retried = False
        routed = False  # the client has its Route (sent with the first frame)
        async with retrying:
            while True:
                self._note_route(record, plan)
                legs = {plan.prefill_backend, plan.decode_backend}
                # Both backends of the plan end up holding the prompt's KV.
                self._pool.record_prefix(plan.prefill_backend, features.prefix_hashes)
                if plan.decode_backend != plan.prefill_backend:
                    self._pool.record_prefix(plan.decode_backend, features.prefix_hashes)
                route = b"" if routed else _route_frame(request, plan)
                # The request id is the same on every attempt: an abort of an earlier one
                # must not land on this one.
                pending = [sent.aborting.pop(b) for b in legs if b in sent.aborting]
                if pending:
                    await asyncio.wait(pending)
                try:
                    run = self._split if plan.mode is Mode.SPLIT else self._colocated
                    async with contextlib.aclosing(run(attempt, plan, sent)) as frames:
                        async for frame in frames:
                            if retried:
                                await retrying.aclose()  # the retry is placed
                                retried = False
                            if frame or route:
                                routed = True
                                yield route + frame
                                route = b""
                            if sent.cut:
                                break  # leaving aborts the backend's stream
                    for backend_id in legs:
                        self._pool.record_success(backend_id)
                    return
                except BackendError as error:
                    step = self._after_failure(error, sent, excluded, attempts)
                    await retrying.aclose()
                    wait_s = self._settings.stall_timeout_s
                    if not await retrying.enter_async_context(self.retry_budget.held(wait_s)):
                        self._refuse(error, "budget", "the retry budget is spent")
                    retried = True
                    plan = self._next_plan(error, step, sent, features, excluded)
                    attempts += 1
                    attempt = request
                    if step is NextStep.RESUME:
                        sent.resumed = sent.tokens
                        attempt = request.resumed_after(sent.token_ids)
                    kind = {NextStep.RESUME: "migration", NextStep.SERVE_COLOCATED: "colocated"}
                    self._metrics.retries.labels(kind.get(step, "retry")).inc()
                    log.warning(
                        "attempt failed: trying again",
                        backend=sent.backend,
                        error=error.message,
                        step=step.value,
                        attempt=attempts,
                        tokens_sent=sent.tokens,
                        prefill=plan.prefill_backend,
                        decode=plan.decode_backend,
                    )

    def _after_failure(
        self, error: BackendError, sent: _Sent, excluded: set[str], attempts: int
    ) -> NextStep:
        """The next attempt's step; raises ``error`` when there is none."""
        handoff = isinstance(error, _HandoffFailedError)
        if error.retryable:
            self._metrics.backend_failures.labels(sent.backend, sent.phase).inc()
            if not handoff:
                excluded.add(sent.backend)
                self._pool.record_failure(sent.backend)
        step = after_failed_leg(
            retryable=error.retryable,
            client_has_tokens=sent.tokens > 0,
            handoff=handoff,
            attempts_left=attempts < self._settings.max_attempts,
            migration=self._settings.migration,
        )
        if step is NextStep.FAIL:
            if not error.retryable:
                raise error
            if sent.tokens and not self._settings.migration:
                self._refuse(
                    error, "migration_off", f"after {sent.tokens} tokens; migration is off"
                )
            self._refuse(error, "attempts", f"after {attempts} attempts")
        if step is NextStep.RESUME and not sent.ids_known:
            self._refuse(error, "no_backend", "the backend's frames carry no token ids to resume")
        return step

    def _next_plan(
        self,
        error: BackendError,
        step: NextStep,
        sent: _Sent,
        features: RequestFeatures,
        excluded: set[str],
    ) -> Plan:
        """Where the next attempt goes; raises ``error`` when no backend can take it."""
        handoff = isinstance(error, _HandoffFailedError)
        try:
            # After a failed handoff the decode backend may be fine, or down: another
            # one is preferred, it serves when it is the only one.
            avoid = {sent.backend} if handoff else set()
            try:
                return self._replan(features, sent, excluded | avoid, step)
            except ServingError:
                if not avoid:
                    raise
            return self._replan(features, sent, excluded, step)
        except ServingError:
            why = "no other backend can resume it" if sent.tokens else "no other backend"
            self._refuse(error, "no_backend", why)

    def _refuse(self, error: BackendError, reason: str, why: str) -> NoReturn:
        """Ends the request with ``error``, saying why it was not tried again."""
        self._metrics.retries_refused.labels(reason).inc()
        error.message = f"{error.message} (not tried again: {why})"
        error.args = (error.message,)
        raise error

    def _replan(
        self, features: RequestFeatures, sent: _Sent, excluded: set[str], step: NextStep
    ) -> Plan:
        avoid: set[str] = set(excluded)
        disaggregation = features.disaggregation
        if step is not NextStep.RETRY:
            disaggregation = Disaggregation.COLOCATED
        if step is NextStep.RESUME:
            avoid.update(
                backend_id
                for backend_id, endpoint in self._pool.endpoints.items()
                if not endpoint.backend.capabilities.resume
            )
        again = dataclasses.replace(
            features,
            prompt_tokens=features.prompt_tokens + sent.tokens,
            max_tokens=features.max_tokens - sent.tokens,
            disaggregation=disaggregation,
            sequence=next(self._arrivals),
        )
        snapshot = self._pool.snapshot().without(avoid)
        try:
            return self._scheduler.schedule(again, snapshot, self._clock(), admit=False)
        except ServingError:
            if disaggregation is Disaggregation.COLOCATED:
                raise
            # A split it asked for cannot be had without the failed backend: one
            # backend serves it alone rather than not at all.
            colocated = dataclasses.replace(again, disaggregation=Disaggregation.COLOCATED)
            return self._scheduler.schedule(colocated, snapshot, self._clock(), admit=False)

    # -- legs --------------------------------------------------------------------

    async def _colocated(
        self, request: GenerationRequest, plan: Plan, sent: _Sent
    ) -> AsyncGenerator[bytes, None]:
        backend_id = plan.prefill_backend
        sent.phase, sent.backend = "generate", backend_id
        record, started = sent.record, self._clock()
        with (
            _Watch(backend_id) as watch,
            self._pool.outstanding(backend_id) as backend,
            self._pool.watching(backend_id, watch.leave),
            contextlib.ExitStack() as load,
        ):
            prefilling = load.enter_context(
                self._pool.prefilling(backend_id, request.prompt_tokens)
            )
            async with (
                self._aborting_on_exit(request.request_id, [backend_id], sent) as done,
                contextlib.aclosing(
                    backend.generate(request, self._settings.decode_timeout_s)
                ) as frames,
            ):
                first = await watch.wait(
                    anext(frames, None), self._first_token_limit(plan), _no_first_token
                )
                if first is None:
                    done.set()
                    return
                # The prefill is done with the first token; decoding starts.
                prefilling.release()
                if record.prefill_done_at is None:
                    record.prefill_done_at = self._clock()
                load.enter_context(self._pool.decoding(backend_id, _context_tokens(request)))
                yield sent.take(first, backend_id)
                async for frame in self._rest(frames, watch, plan, sent):
                    yield frame
                if not sent.cut:
                    done.set()
                record.legs.append(Leg(backend_id, "generate", started, self._clock()))

    async def _rest(
        self, frames: AsyncGenerator[bytes, None], watch: _Watch, plan: Plan, sent: _Sent
    ) -> AsyncGenerator[bytes, None]:
        """The frames after a leg's first, each within the idle limit."""
        idle_s = self._idle_limit(plan)
        while not sent.cut:
            frame = await watch.wait(anext(frames, None), idle_s, _no_next_token)
            if frame is None:
                return
            yield sent.take(frame, watch.backend_id)

    async def _split(
        self, request: GenerationRequest, plan: Plan, sent: _Sent
    ) -> AsyncGenerator[bytes, None]:
        legs = [plan.prefill_backend, plan.decode_backend]
        async with self._aborting_on_exit(request.request_id, legs, sent) as done:
            sent.phase, sent.backend = "prefill", plan.prefill_backend
            record, started = sent.record, self._clock()
            prefill = await self._prefill(request, plan)
            record.prefill_done_at = self._clock()
            record.legs.append(
                Leg(plan.prefill_backend, "prefill", started, record.prefill_done_at)
            )
            handle = prefill.handle
            finished = prefill.finished or handle is None
            if prefill.first_frame or finished:
                # The first token goes to the client now; it does not wait for the KV to
                # move. (An empty frame still carries the route of a finished request.)
                yield sent.take(prefill.first_frame, plan.prefill_backend)
            step = after_prefill(
                plan,
                finished=finished,
                layouts_compatible=self._pool.layouts_compatible(
                    plan.prefill_backend, plan.decode_backend
                ),
            )
            # Without a handle the step is FINISHED; testing it again tells the type checker.
            if step is NextStep.FINISHED or handle is None:
                done.set()
                return
            record.handoffs += 1
            record.handoff_bytes += handle.byte_length
            if step is NextStep.RELAY_THEN_DECODE:
                sent.phase, sent.backend = "relay", plan.decode_backend
                handle = await self._relay(request, plan, handle)
            sent.phase, sent.backend = "decode", plan.decode_backend
            async with contextlib.aclosing(
                self._decode_leg(request, plan, handle, prefill.first_token_id, sent)
            ) as frames:
                async for frame in frames:
                    yield frame
            if not sent.cut:
                done.set()

    async def _decode_leg(
        self,
        request: GenerationRequest,
        plan: Plan,
        handle: KVHandle,
        first_token_id: int,
        sent: _Sent,
    ) -> AsyncGenerator[bytes, None]:
        backend_id = plan.decode_backend
        record, started = sent.record, self._clock()
        with (
            _Watch(backend_id) as watch,
            self._pool.outstanding(backend_id) as decoder,
            self._pool.watching(backend_id, watch.leave),
            self._pool.decoding(backend_id, _context_tokens(request)),
        ):
            decode = decoder.decode(
                request, handle, first_token_id, self._settings.decode_timeout_s
            )
            async with contextlib.aclosing(decode) as frames:
                # Its first frame waits for the KV to arrive: past the handoff limit the
                # request is served by one backend instead.
                limit = self._settings.handoff_timeout_s
                try:
                    first = await watch.wait(anext(frames, None), limit, _handoff_stalled)
                except _HandoffFailedError:
                    raise
                except BackendError as error:
                    if not error.retryable or watch.left:
                        raise
                    reason = error.message.removeprefix(f"backend {backend_id}: ")
                    raise _HandoffFailedError(backend_id, reason) from error
                if first is None:
                    return
                record.decode_first_at = self._clock()
                yield sent.take(first, backend_id)
                async for frame in self._rest(frames, watch, plan, sent):
                    yield frame
                record.legs.append(Leg(backend_id, "decode", started, self._clock()))

    async def _prefill(self, request: GenerationRequest, plan: Plan) -> PrefillResult:
        backend_id = plan.prefill_backend
        limit = self._first_token_limit(plan)
        with (
            _Watch(backend_id) as watch,
            self._pool.outstanding(backend_id) as backend,
            self._pool.watching(backend_id, watch.leave),
            self._pool.prefilling(backend_id, request.prompt_tokens),
        ):
            return await watch.wait(backend.prefill(request, limit), limit, _no_first_token)

    def _first_token_limit(self, plan: Plan) -> float:
        """How long a leg may take to its first token: a multiple of the predicted time
        to first token, at least ``stall_timeout_s``, at most ``prefill_timeout_s``."""
        settings = self._settings
        if plan.predicted is None:
            return settings.prefill_timeout_s
        expected = settings.prefill_deadline_multiple * plan.predicted.ttft_s
        return min(settings.prefill_timeout_s, max(settings.stall_timeout_s, expected))

    def _idle_limit(self, plan: Plan) -> float:
        """How long a stream may go without a token: a multiple of the predicted time per
        output token, at least ``stall_timeout_s``."""
        settings = self._settings
        step = plan.predicted.tpot_s if plan.predicted is not None else 0.0
        return max(settings.stall_timeout_s, settings.stall_step_multiple * step)

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
                target_layout=self._pool.layout(plan.decode_backend),
            )
        except LayoutMismatchError:
            raise  # the decode side could not take it either
        except ServingError as error:
            log.warning("KV relay failed; decode pulls it", error=str(error))
            self._metrics.backend_failures.labels(plan.decode_backend, "relay").inc()
            return handle
        self._in_background(self._abort(plan.prefill_backend, request.request_id))  # frees it
        return moved

    @contextlib.asynccontextmanager
    async def _aborting_on_exit(
        self, request_id: str, backend_ids: list[str], sent: _Sent
    ) -> AsyncIterator[asyncio.Event]:
        """Aborts the request on every backend unless the block sets the event (clean finish).

        Covers a client that goes away, a failed leg and a KV lease nobody will fetch.
        The aborts run in the background so a cancelled request returns at once; a
        later attempt on one of these backends waits for its abort first, since it
        reuses the request id.
        """
        done = asyncio.Event()
        try:
            yield done
        finally:
            if not done.is_set():
                for backend_id in dict.fromkeys(backend_ids):
                    task = self._in_background(self._abort(backend_id, request_id))
                    sent.aborting[backend_id] = task

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _abort(self, backend_id: str, request_id: str) -> None:
        try:
            await self._pool.backend(backend_id).abort(request_id, self._settings.abort_timeout_s)
        except Exception as error:  # noqa: BLE001  # best effort: the lease timeout is the backstop
            log.warning("abort failed", backend=backend_id, request=request_id, error=str(error))

    def count_rejected(self, outcome: str, model: str = "") -> None:
        """A request a door refused before it reached the dispatcher (bad input: its
        model may be unknown, and is then not a label value)."""
        self._metrics.requests.labels(model, "none", outcome).inc()

    def _note_route(self, record: RequestRecord, plan: Plan) -> None:
        record.attempts += 1
        record.mode = plan.mode.value
        if plan.decision is not None:
            record.decision = plan.decision
        record.prefill_backend, record.decode_backend = plan.prefill_backend, plan.decode_backend
        record.prefill_kind = self._pool.device_kind(plan.prefill_backend)
        record.decode_kind = self._pool.device_kind(plan.decode_backend)

    async def drain_background(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _context_tokens(request: GenerationRequest) -> int:
    """KV tokens a sequence may reach: its prompt and every token it may generate."""
    return request.prompt_tokens + request.sampling.max_tokens


def _outcome(error: ServingError) -> str:
    """The metrics label of an error: NoHealthyBackendError -> "nohealthybackend"."""
    return type(error).__name__.removesuffix("Error").lower()


def _route_frame(request: GenerationRequest, plan: Plan) -> bytes:
    route = router_pb2.Route(
        mode=_ROUTE_MODE[plan.mode],
        prefill_backend=plan.prefill_backend,
        decode_backend=plan.decode_backend,
        request_id=request.shown_id,
        seed=request.sampling.seed,
    )
    return router_pb2.GenerateResponse(route=route).SerializeToString()
