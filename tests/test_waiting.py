"""twofold.waiting.within: time limits that never swallow a cancellation."""

from __future__ import annotations

import asyncio
import sys

import pytest

from twofold.waiting import within


async def _wake_loop(event: asyncio.Event, wait, woke: list[int]) -> None:
    """The shape of every background loop here: wait for a wake-up or the interval, then work."""
    while True:
        await wait(event)
        event.clear()
        woke.append(1)


async def _with_wait_for(event: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(event.wait(), 10)
    except TimeoutError:
        pass


async def _with_within(event: asyncio.Event) -> None:
    await within(event.wait(), 10)


async def _set_then_cancel(wait) -> tuple[bool, list[int]]:
    event = asyncio.Event()
    woke: list[int] = []
    task = asyncio.get_running_loop().create_task(_wake_loop(event, wait, woke))
    await asyncio.sleep(0.01)  # the loop is waiting now
    event.set()
    task.cancel()  # in the same loop turn as the wake-up: the race
    done, _ = await asyncio.wait({task}, timeout=1)
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    return bool(done), woke


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12 rebuilt wait_for on asyncio.timeout")
def test_the_race_loses_a_cancellation_with_wait_for_on_python_311() -> None:
    """The reproduction behind twofold.waiting: if this ever passes, the workaround is moot."""
    stopped, woke = asyncio.run(_set_then_cancel(_with_wait_for))
    assert not stopped and woke == [1]


def test_within_lets_the_same_race_cancel_the_loop() -> None:
    stopped, woke = asyncio.run(_set_then_cancel(_with_within))
    assert stopped and woke == []


def test_within_reports_whether_the_awaitable_finished_in_time() -> None:
    async def main() -> tuple[bool, bool, bool]:
        event = asyncio.Event()
        timed_out = await within(event.wait(), 0.01)
        asyncio.get_running_loop().call_later(0.01, event.set)
        in_time = await within(event.wait(), 5)
        no_limit = await within(asyncio.sleep(0.01), None)
        return timed_out, in_time, no_limit

    assert asyncio.run(main()) == (False, True, True)


def test_condition_wait_holds_the_lock_again_after_a_timeout() -> None:
    async def main() -> bool:
        condition = asyncio.Condition()
        async with condition:
            assert not await within(condition.wait(), 0.01)
            return condition.locked()

    assert asyncio.run(main())
