"""The cyclic garbage collector, set for a server whose heap is mostly start-up's.

With CPython's thresholds (700, 10, 10) a young collection runs every 700 container
allocations, and every tenth of those a middle one, and now and then a full one that
walks the whole heap: 30-60 ms each in a router under saturated load, and the collector
took 9-15% of the HTTP door's CPU (bench/README.md, "Where the HTTP door's CPU goes").
Almost nothing a request makes is cyclic garbage: reference counting frees it
(tests/integration/test_request_garbage.py holds the router to none). So once the
router serves, what start-up made (modules, the pool, compiled protobuf and pydantic
schemas) is moved to the permanent generation, which no collection walks, and the
youngest generation waits for ``gc_gen0_threshold`` allocations. The older generations
keep CPython's thresholds.

What is left to collect is other libraries' (grpc's server leaves five objects in a
cycle a call), and a young collection's pause is about 0.3 us an object it holds: at
the default 10,000, 2-3 ms every couple of thousand gRPC calls (at 50,000, 14 ms).
"""

from __future__ import annotations

import gc

from router.logging import get_logger

log = get_logger(__name__)


def tune_for_serving(gen0_threshold: int) -> None:
    """Freezes what exists now and sets the youngest generation's threshold; 0 leaves
    the collector as it is."""
    if gen0_threshold == 0:
        return
    gc.collect()  # start-up's cyclic garbage goes now, not into the frozen heap
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.debug("garbage collector tuned", frozen=gc.get_freeze_count(), gen0=gen0_threshold)
