"""Compute off the event loop that a cancelled caller stops waiting for at once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_detached(function: Callable[[], T], name: str) -> T:
    """``function()`` on a daemon thread of its own (numpy releases the GIL meanwhile).

    Unlike ``asyncio.to_thread``, nothing joins the thread: neither the loop's executor
    nor its shutdown waits out a long computation nobody wants any more; a cancelled
    caller's result is dropped when it comes.
    """
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def work() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(function())
        except BaseException as error:  # noqa: BLE001  # raised again in the caller
            done.set_exception(error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await asyncio.wrap_future(done)
