"""The garbage collector as a serving router sets it (router/gc_tuning.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from router.gc_tuning import tune_for_serving
from router.settings import Settings


@pytest.fixture
def collector() -> Iterator[None]:
    """Puts the test process's collector back as it was."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector")
def test_serving_freezes_the_start_up_heap_and_raises_the_youngest_threshold() -> None:
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    start_up = [[index] for index in range(1000)]  # container objects that exist at start-up
    tune_for_serving(50_000)
    assert gc.get_threshold() == (50_000, gen1, gen2)
    assert gc.get_freeze_count() >= len(start_up)
    tracked = {id(item) for generation in range(3) for item in gc.get_objects(generation)}
    assert id(start_up[0]) not in tracked  # frozen: no collection walks it


@pytest.mark.usefixtures("collector")
def test_zero_leaves_the_collector_as_it_is() -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    tune_for_serving(0)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("collector")
def test_cycles_made_after_the_freeze_are_still_collected() -> None:
    tune_for_serving(50_000)

    class Node:
        other: object = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() >= 2


def test_the_default_threshold_and_its_bounds() -> None:
    assert Settings().gc_gen0_threshold == 10_000
    with pytest.raises(ValueError, match="gc_gen0_threshold"):
        Settings(gc_gen0_threshold=-1)
