"""The pipe pool behind the proxy's kernel splices (``cluster.routing.splice``): it
reuses empty pipes and never holds more pipe capacity than its budget, since
the kernel charges every pipe to its user and an unprivileged user past its
limit gets one-page pipes everywhere."""

from __future__ import annotations

import os

import pytest

from cluster.routing.splice import AVAILABLE, PIPE_SIZE, PipePool

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="splice(2) is Linux-only")


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_pipe_pool_reuses_empty_pipes_and_keeps_within_its_budget():
    pool = PipePool(budget=2 * PIPE_SIZE, max_idle=1)
    first, second = pool.take(), pool.take()
    assert first[2] == second[2] == PIPE_SIZE
    assert pool.charged == 2 * PIPE_SIZE
    with pytest.raises(OSError):
        pool.take()                               # a third would exceed the budget
    pool.put(first, empty=True)
    assert pool.take() == first                   # an empty pipe comes back as it was
    pool.put(first, empty=False)                  # bytes left in it: closed, not reused
    assert closed(first[0]) and closed(first[1]) and pool.charged == PIPE_SIZE
    third = pool.take()                           # room again
    pool.put(second, empty=True)
    pool.put(third, empty=True)                   # beyond max_idle: closed
    assert closed(third[0]) and not closed(second[0])
    pool.close_idle()
    assert closed(second[0]) and pool.charged == 0
