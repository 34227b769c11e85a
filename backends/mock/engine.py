"""The compute loop of a mock device: continuous batching with roofline timing.

One task runs iterations like a real serving engine: a prefill iteration for the
requests that were admitted (prefill first, as vLLM does by default), otherwise
one decode iteration that advances every running sequence by one token. The
tokens are real (a tiny numpy transformer); each iteration lasts as long as the
roofline model of the emulated hardware says, times the time scale.

With a prefix cache, a prefill whose leading blocks the device computed before is
charged only for the rest, as vLLM's automatic prefix caching and SGLang's radix
cache do; the tiny model still computes the whole prompt, so tokens stay exact.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Container
from dataclasses import dataclass
from itertools import islice

from backends.base import KVLayout, SamplingParams
from backends.mock.clock import LoopClock, next_deadline
from backends.mock.detached import run_detached
from backends.mock.errors import DeviceError
from backends.mock.lease import (
    DEFAULT_KV_LEASE_S,
    Checksums,
    Lease,
    Leases,
    checksums_of,
    wire_form,
)
from backends.mock.model import KVCache, TinyTransformer, encode
from backends.mock.sequence import PrefillOutcome, Sequence
from backends.perf.batching import prefill_batch_size
from backends.perf.roofline import TimingModel
from backends.prefix import BLOCK_BYTES, PrefixCache

# Prefill compute above this many tokens leaves the event loop (numpy releases
# the GIL), so a long prompt does not stall the device's RPCs.
_INLINE_PREFILL_TOKENS = 512
_FLUSH_YIELDS = 3


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    kv_leases: int


class DeviceEngine:
    def __init__(
        self,
        model: TinyTransformer,
        timing: TimingModel,
        *,
        time_scale: float = 1.0,
        kv_lease_s: float = DEFAULT_KV_LEASE_S,
        kv_capacity_tokens: int | None = None,
        decode_step_s: float | None = None,
        kv_layout: KVLayout | None = None,
        filler_bytes_per_token: int = 0,
        prefix_cache_blocks: int = 0,
        clock: LoopClock | None = None,
    ) -> None:
        self.model = model
        # How leased KV is laid out in bytes (ranks, blocks); None: the model's own order.
        self.kv_layout = kv_layout
        # Seeded bytes after the real KV, so a transfer moves what the emulated
        # model's KV would weigh (Llama-3.1-70B: 320 KiB per token).
        self.filler_bytes_per_token = filler_bytes_per_token
        self.timing = timing
        self.time_scale = time_scale
        # A fixed decode step paces every stream at 1/decode_step_s tokens per second
        # whatever the batch: benchmarks use it to hold the device's rate constant.
        self.decode_step_s = decode_step_s
        self.kv_capacity_tokens = kv_capacity_tokens or timing.kv_capacity_tokens
        self._waiting: OrderedDict[str, Sequence] = OrderedDict()
        self._prefilling: dict[str, Sequence] = {}
        self._running: OrderedDict[str, Sequence] = OrderedDict()
        self._wake = asyncio.Event()
        self._leases = Leases(kv_lease_s, self._wake.set)
        self._charged_tokens = 0  # KV positions reserved by sequences (leases count apart)
        self.prefix_cache = PrefixCache(prefix_cache_blocks)
        # Prompt tokens whose prefill the prefix cache spared, since the start.
        self.prefix_hit_tokens = 0
        self.clock = clock or LoopClock()
        # The deadline of the last iteration while iterations run back to back.
        self._paced_until: float | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="device-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for request_id in [*self._waiting, *self._prefilling, *self._running, *self._leases]:
            self.abort(request_id)

    # -- requests --------------------------------------------------------------

    async def prefill(
        self, request_id: str, prompt: str, sampling: SamplingParams
    ) -> PrefillOutcome:
        """Prefill only; a KV that is still needed stays leased under the request id."""
        sequence = self._submit(request_id, prompt, sampling, prefill_only=True)
        sequence.outcome = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.shield(sequence.outcome)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    async def generate(
        self,
        request_id: str,
        prompt: str,
        sampling: SamplingParams,
        generated_ids: tuple[int, ...] = (),
    ) -> AsyncGenerator[bytes, None]:
        """Prefill and decode here. With ``generated_ids`` (a request resumed after its
        first device failed) the prefill covers them too and the stream goes on after
        them: the same tokens, drawn at the same positions, as one device would have made."""
        sequence = self._submit(request_id, prompt, sampling, False, generated_ids)
        async for frame in self._drain(sequence):
            yield frame

    async def decode(
        self,
        request_id: str,
        prompt: str,
        sampling: SamplingParams,
        cache: KVCache,
        first_token_id: int,
    ) -> AsyncGenerator[bytes, None]:
        """Continues a sequence whose prompt KV was computed elsewhere."""
        prompt_ids = encode(prompt)
        if cache.length != len(prompt_ids):
            raise DeviceError(
                "FAILED_PRECONDITION",
                f"KV holds {cache.length} positions but the prompt has {len(prompt_ids)} tokens",
            )
        reserved = len(prompt_ids) + sampling.max_tokens
        self._check_fits(reserved)
        self._claim_id(request_id)
        sequence = Sequence(request_id, prompt_ids, sampling, reserved)
        self._charge(sequence)
        cache.ensure_capacity(reserved)
        sequence.cache = cache
        sequence.last_token = first_token_id
        sequence.generated = 1
        sequence.text.push(first_token_id)  # its text was streamed by the prefill device
        # The received KV is this device's now: a later prompt with the same head reuses it.
        hashes = self.prefix_cache.hashes_of(prompt)
        self.prefix_cache.record(hashes, _cached_bytes(prompt_ids, len(hashes)))
        self._running[request_id] = sequence
        self._wake.set()
        async for frame in self._drain(sequence):
            yield frame

    def abort(self, request_id: str) -> bool:
        sequence = (
            self._waiting.pop(request_id, None)
            or self._prefilling.pop(request_id, None)
            or self._running.pop(request_id, None)
        )
        if sequence is None:
            return self.release_lease(request_id)
        sequence.aborted = True
        if sequence.outcome is not None and not sequence.outcome.done():
            sequence.outcome.cancel()
        self._finish(sequence)
        return True

    # -- leases ----------------------------------------------------------------

    def lease(self, request_id: str, token: str | bytes) -> Lease | None:
        """The KV leased under ``request_id``, to the holder of its token only."""
        return self._leases.get(request_id, token)

    def adopt(
        self,
        request_id: str,
        cache: KVCache,
        payload: bytes | bytearray,
        checksums: Checksums | None = None,
    ) -> Lease:
        """Holds a KV made elsewhere (pushed by a relay) as if this device had prefilled it.

        ``payload`` is the KV as it arrived, in this device's layout: kept as it is
        rather than encoded again; ``checksums`` (whole, per segment), when the
        transfer already computed them, spare two passes over it.
        """
        self._claim_id(request_id)
        self._check_fits(cache.length)
        return self._leases.hold(request_id, cache, payload, checksums or checksums_of(payload))

    def release_lease(self, request_id: str) -> bool:
        return self._leases.release(request_id)

    def load(self) -> EngineLoad:
        return EngineLoad(
            waiting=len(self._waiting),
            running=len(self._running),
            kv_tokens_used=self._kv_used,
            kv_tokens_capacity=self.kv_capacity_tokens,
            kv_leases=len(self._leases),
        )

    # -- internals -------------------------------------------------------------

    @property
    def _kv_used(self) -> int:
        return self._charged_tokens + self._leases.tokens

    def _claim_id(self, request_id: str) -> None:
        if any(request_id in held for held in self._holders()):
            raise DeviceError("ALREADY_EXISTS", f"request {request_id} is already on this device")

    def _holders(self) -> tuple[Container[str], ...]:
        return (self._waiting, self._prefilling, self._running, self._leases)

    def _check_fits(self, tokens: int) -> None:
        if tokens > self.kv_capacity_tokens:
            raise DeviceError(
                "RESOURCE_EXHAUSTED",
                f"prompt plus max_tokens needs {tokens} KV tokens; "
                f"the device holds {self.kv_capacity_tokens}",
            )

    def _submit(
        self,
        request_id: str,
        prompt: str,
        sampling: SamplingParams,
        prefill_only: bool,
        generated_ids: tuple[int, ...] = (),
    ) -> Sequence:
        prompt_ids = encode(prompt)
        reserved = len(prompt_ids) + len(generated_ids)
        reserved += 1 if prefill_only else sampling.max_tokens
        self._check_fits(reserved)
        self._claim_id(request_id)
        sequence = Sequence(
            request_id,
            prompt_ids,
            sampling,
            reserved,
            prefill_only,
            prefix_hashes=self.prefix_cache.hashes_of(prompt),
        )
        if generated_ids:
            sequence.resume_after(generated_ids)
        self._waiting[request_id] = sequence
        self._wake.set()
        return sequence

    async def _drain(self, sequence: Sequence) -> AsyncGenerator[bytes, None]:
        try:
            while (frame := await sequence.frames.get()) is not None:
                yield frame
        finally:
            # Reached on normal end too; abort is a no-op for a finished sequence.
            self.abort(sequence.request_id)

    async def _run(self) -> None:
        while True:
            admitted = self._admit()
            if admitted:
                await self._prefill_step(admitted)
            elif self._running:
                await self._decode_step()
            else:
                self._paced_until = None  # idle: the next iteration starts when it comes
                self._wake.clear()
                await self._wake.wait()
                continue
            # Frames just emitted travel through a few tasks (stream handlers, a
            # session writer) before they reach the socket. When iterations run
            # back to back (time scale 0) they would each wait for the next
            # iteration's compute; a few yields let them leave first.
            for _ in range(_FLUSH_YIELDS):
                await asyncio.sleep(0)

    def _admit(self) -> list[Sequence]:
        count = prefill_batch_size(
            ((len(s.prompt_ids), s.needed_tokens) for s in self._waiting.values()),
            self._kv_used,
            self.kv_capacity_tokens,
        )
        batch = list(islice(self._waiting.values(), count))
        for sequence in batch:
            del self._waiting[sequence.request_id]
            self._prefilling[sequence.request_id] = sequence
            self._charge(sequence)
        return batch

    async def _prefill_step(self, batch: list[Sequence]) -> None:
        lengths = [len(s.prompt_ids) for s in batch]
        # A prompt reuses what the prompts before it in the batch compute, as in vLLM; the
        # last token is computed all the same, for its logits.
        matched = self.prefix_cache.matched_in_batch([s.prefix_hashes for s in batch])
        cached = [
            max(0, min(blocks * BLOCK_BYTES, length - 1))
            for blocks, length in zip(matched, lengths, strict=True)
        ]
        self.prefix_hit_tokens += sum(cached)
        deadline = self._deadline(self.timing.prefill_seconds(lengths, cached) * self.time_scale)
        # The whole prompt is computed even so: the tokens must not depend on the cache.
        if sum(lengths) > _INLINE_PREFILL_TOKENS:
            first_tokens = await run_detached(
                lambda: self._compute_prefill(batch), name="device-prefill"
            )
        else:
            first_tokens = self._compute_prefill(batch)
        await self.clock.sleep_until(deadline)
        for sequence, token in zip(batch, first_tokens, strict=True):
            if token >= 0:  # computed: a sequence aborted before its turn left no KV
                self.prefix_cache.record(
                    sequence.prefix_hashes,
                    _cached_bytes(sequence.prompt_ids, len(sequence.prefix_hashes)),
                )
        for sequence, token in zip(batch, first_tokens, strict=True):
            if self._prefilling.pop(sequence.request_id, None) is sequence:
                self._emit_first(sequence, token)

    def _compute_prefill(self, batch: list[Sequence]) -> list[int]:
        """The first token of each (-1 for one aborted before its turn, never emitted)."""
        first_tokens = []
        for sequence in batch:
            if sequence.aborted:  # an engine stopping aborts all: the rest are skipped
                first_tokens.append(-1)
                continue
            capacity = len(sequence.prompt_ids) + sequence.sampling.max_tokens
            sequence.cache, logits = self.model.prefill(sequence.prompt_ids, capacity)
            first_tokens.append(sequence.sample(logits, position=sequence.position))
            if sequence.prefill_only:
                payload = wire_form(sequence.cache, self.kv_layout, self.filler_bytes_per_token)
                sequence.wire = (payload, checksums_of(payload))
        return first_tokens

    async def _decode_step(self) -> None:
        batch = list(self._running.values())
        caches = [s.kv for s in batch]
        if self.decode_step_s is not None:
            deadline = self._deadline(self.decode_step_s)
        else:
            contexts = [cache.length + 1 for cache in caches]
            deadline = self._deadline(self.timing.decode_step_seconds(contexts) * self.time_scale)
        # One batched step: a sequence's logits do not depend on its neighbours.
        logits = self.model.decode_batch(caches, [s.last_token for s in batch])
        tokens = [
            sequence.sample(row, position=sequence.position)
            for row, sequence in zip(logits, batch, strict=True)
        ]
        await self.clock.sleep_until(deadline)
        for sequence, token in zip(batch, tokens, strict=True):
            if not sequence.aborted:
                self._emit(sequence, token)

    def _emit_first(self, sequence: Sequence, token: int) -> None:
        frame, finished = sequence.advance(token)
        outcome = sequence.outcome
        if outcome is None:  # not a prefill only: its stream goes on here
            sequence.frames.put_nowait(frame)
            if finished:
                self._finish(sequence)
            else:
                self._running[sequence.request_id] = sequence
            return
        self._finish(sequence)
        lease = None if finished else self._lease_prefilled(sequence, sequence.kv)
        outcome.set_result(PrefillOutcome(token, frame, finished, len(sequence.prompt_ids), lease))

    def _lease_prefilled(self, sequence: Sequence, cache: KVCache) -> Lease:
        if sequence.wire is None:
            encoded = wire_form(cache, self.kv_layout, self.filler_bytes_per_token)
            sequence.wire = (encoded, checksums_of(encoded))
        payload, checksums = sequence.wire
        sequence.wire = None
        return self._leases.hold(sequence.request_id, cache, payload, checksums)

    def _emit(self, sequence: Sequence, token: int) -> None:
        frame, finished = sequence.advance(token)
        sequence.frames.put_nowait(frame)
        if finished:
            self._running.pop(sequence.request_id, None)
            self._finish(sequence)

    def _charge(self, sequence: Sequence) -> None:
        sequence.charged_tokens = sequence.needed_tokens
        self._charged_tokens += sequence.charged_tokens

    def _finish(self, sequence: Sequence) -> None:
        self._charged_tokens -= sequence.charged_tokens
        sequence.charged_tokens = 0
        sequence.frames.put_nowait(None)
        self._wake.set()

    def _deadline(self, duration_s: float) -> float:
        """The end of an iteration lasting ``duration_s`` (already scaled) that starts now."""
        self._paced_until = next_deadline(self._paced_until, self.clock.time(), duration_s)
        return self._paced_until


def _cached_bytes(prompt_ids: list[int], blocks: int) -> bytes:
    """The bytes ``blocks`` prefix blocks cover: the tokens after BOS (byte-level; a
    resumed sequence's generated ids, after the prompt, are never reached)."""
    return bytes(prompt_ids[1 : 1 + blocks * BLOCK_BYTES])
