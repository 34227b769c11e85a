"""A mock engine stops at once, even with a long prefill computing in a worker thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from backends.base import SamplingParams
from backends.mock.engine import DeviceEngine
from backends.mock.model import Floats, KVCache, TinyTransformer
from backends.perf.roofline import TimingModel, load_catalog
from tests.helpers import eventually

SAMPLING = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, seed=0)
LONG_PROMPT = "a prompt long enough to be computed off the event loop " * 20


class HeldModel(TinyTransformer):
    """A model whose prefill starts, then waits for the test to let it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self.prefills = 0

    def prefill(self, token_ids: Sequence[int], capacity: int) -> tuple[KVCache, Floats]:
        self.prefills += 1
        self.started.set()
        self.release.wait()
        return super().prefill(token_ids, capacity)


@pytest.fixture
def timing() -> TimingModel:
    catalog = load_catalog()
    return TimingModel(catalog.profiles["h100"], catalog.models["llama-3.1-8b"])


async def test_stopping_leaves_a_long_prefill_behind_without_waiting_for_it(
    timing: TimingModel,
) -> None:
    model = HeldModel()
    engine = DeviceEngine(model, timing, time_scale=0.0)
    engine.start()
    try:
        first = asyncio.create_task(engine.prefill("first", LONG_PROMPT, SAMPLING))
        second = asyncio.create_task(engine.prefill("second", LONG_PROMPT, SAMPLING))
        await eventually(model.started.is_set)
        await engine.stop()  # returns while the thread still computes "first"
        for task in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await task
        # Nor does the loop's executor have the thread to join at shutdown.
        await asyncio.get_running_loop().shutdown_default_executor()
        assert engine.load().kv_tokens_used == 0
    finally:
        model.release.set()
    # The batch's other prompt, aborted with the engine, is never computed.
    await eventually(lambda: not any(t.name == "device-prefill" for t in threading.enumerate()))
    assert model.prefills == 1
