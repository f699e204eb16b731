"""Write-behind (sharding.writeback): in order, one write in flight, errors raised in the caller."""
from __future__ import annotations

import threading

import pytest

from sharding import writeback


def test_writes_run_in_order_one_at_a_time_behind_the_caller():
    done, running = [], []

    def write(i):
        def run():
            running.append(threading.get_ident())
            done.append(i)
        return run
    for i in range(5):
        writeback.submit(write(i))
    writeback.drain()
    assert done == list(range(5))
    assert threading.get_ident() not in running and len(set(running)) == 1  # one background thread


def test_a_failed_write_raises_in_the_caller_at_the_next_submit_or_drain():
    def fail():
        raise OSError(28, "No space left on device")
    writeback.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writeback.submit(lambda: None)
    writeback.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writeback.drain()
    writeback.drain()  # the error is reported once
