"""One request on a mock device: its prompt, its tokens so far, the frames they make."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import SamplingParams
from backends.mock.lease import Checksums, Lease
from backends.mock.model import EOS_ID, KVCache
from backends.mock.sampling import sample_token
from backends.mock.textstream import TextStream


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    first_frame: bytes
    finished: bool
    prompt_tokens: int
    lease: Lease | None  # the KV, held on the engine until fetched, released or expired


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    needed_tokens: int  # KV positions to reserve before it may start
    prefill_only: bool = False
    prefix_hashes: tuple[int, ...] = ()  # of its prompt's blocks; empty without a prefix cache
    charged_tokens: int = 0  # KV positions it holds of the device's capacity
    text: TextStream = field(init=False)
    frames: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    outcome: asyncio.Future[PrefillOutcome] | None = None
    cache: KVCache | None = None
    last_token: int = -1
    generated: int = 0  # tokens this device generated for it
    # Tokens generated before it came here (a resumed request): the first this device
    # samples is at position ``resumed``, and ``prompt_ids`` ends with them.
    resumed: int = 0
    aborted: bool = False
    # A prefill-only sequence's KV in wire form with its checksums, made while the
    # modelled prefill runs so that leasing it costs no time after.
    wire: tuple[bytes | bytearray, Checksums] | None = None

    def __post_init__(self) -> None:
        self.text = TextStream(self.sampling.stop)

    @property
    def kv(self) -> KVCache:
        """Its KV cache, which it has from its prefill on."""
        if self.cache is None:
            raise RuntimeError(f"sequence {self.request_id} has no KV before its prefill")
        return self.cache

    @property
    def position(self) -> int:
        """The sampling position of its next token: tokens generated so far, anywhere."""
        return self.resumed + self.generated

    def resume_after(self, generated_ids: tuple[int, ...]) -> None:
        """Continues after tokens generated elsewhere: they join the prompt, and their
        text goes through the stop strings unseen (the client has it already), so what
        follows is released exactly as one device would have released it."""
        self.prompt_ids = [*self.prompt_ids, *generated_ids]
        self.resumed = len(generated_ids)
        for token in generated_ids:
            self.text.push(token)

    def sample(self, logits: NDArray[np.floating[Any]], position: int) -> int:
        sampling = self.sampling
        return sample_token(
            logits,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            position=position,
        )

    def advance(self, token: int) -> tuple[bytes, bool]:
        """Records one sampled token; returns its encoded frame and whether it ends the sequence."""
        self.generated += 1
        self.last_token = token
        text = self.text.push(token)
        response = router_pb2.GenerateResponse(text=text)
        if token != EOS_ID:
            response.token_ids.append(token)
        if self.text.stopped:
            response.finish_reason = router_pb2.FINISH_REASON_STOP
        elif self.generated >= self.sampling.max_tokens:
            response.text += self.text.flush()
            response.finish_reason = router_pb2.FINISH_REASON_LENGTH
        else:
            return response.SerializeToString(), False
        response.usage.prompt_tokens = len(self.prompt_ids)
        response.usage.completion_tokens = self.generated - (token == EOS_ID)
        return response.SerializeToString(), True
