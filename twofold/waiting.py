"""Waiting with a time limit without losing a cancellation (Python 3.11's `asyncio.wait_for` can).

`asyncio.wait_for(event.wait(), t)` runs the wait in a task of its own. On Python 3.11, when that
inner wait finishes in the same loop turn as the outer task is cancelled (an `event.set()`
followed by `task.cancel()`), wait_for returns the inner result and the cancellation is lost: a
background loop written as `while True: wait_for(...)` then never stops, and whoever awaits it
hangs. That is how `twofold demo` hung about once in ten runs on a loaded machine: the SDK's
`close()` cancelled its flush loop right after `track()` had woken it, then waited for the loop
forever (`tests/test_waiting.py` reproduces the race deterministically).

`asyncio.timeout` (3.11+) cancels the waiting task itself, so there is no second task for the
cancellation to get lost in; Python 3.12 rebuilt wait_for on the same mechanism.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def within(awaitable: Awaitable[Any], seconds: float | None) -> bool:
    """Await `awaitable` for at most `seconds` (None: no limit); True if it finished in time.

    On timeout the awaitable is cancelled (an `Event.wait()` simply stops waiting; a
    `Condition.wait()` re-acquires its lock first, as with wait_for). A cancellation of the
    caller always propagates.
    """
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        return False
    return True
