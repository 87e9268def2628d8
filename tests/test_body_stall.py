"""``registry_node.body_stall`` in process: held downloads are watched by one
sweeper, not a task each, and let go at heal, when their client is gone, and
for good when the node stops."""

from __future__ import annotations

import asyncio

from registry_node.body_stall import BodyStall

from .helpers import eventually


async def test_held_downloads_share_one_sweeper_and_go_when_released_or_gone():
    stall = BodyStall()
    assert await stall.held(lambda: True)            # not stalled: at once
    stall.set(True)
    gone: set[int] = set()
    held = [asyncio.ensure_future(stall.held(lambda i=i: i in gone)) for i in range(100)]
    before = len(asyncio.all_tasks())
    for _ in range(3):                               # every held one waiting
        await asyncio.sleep(0)
    # Besides the held downloads, the sweeper alone (a look per download used
    # to be a task per download, four times a second).
    assert len(asyncio.all_tasks()) - before == 1
    gone.update(range(10))
    await eventually(lambda: sum(h.done() for h in held) == 10, timeout=2,
                     what="the sweeper letting go of the downloads whose clients hung up")
    assert [h.result() for h in held[:10]] == [False] * 10
    stall.set(False)
    assert await asyncio.gather(*held[10:]) == [True] * 90
    stall.set(True)
    waiting = asyncio.ensure_future(stall.held(lambda: False))
    await asyncio.sleep(0)
    stall.close()                                    # the node stops: released...
    assert await waiting
    stall.set(True)                                  # ...and a late stall is not taken
    assert not stall.stalled and await stall.held(lambda: False)
