"""Write-behind for a sharder worker: its durable writes run in one background thread while it computes on.

Every output file is written with ``crossdna.fileio.write_atomic`` (temp file, fsync, rename), and the fsync
waits for the disk: ~10 ms per 10 MB shard here, a third of a worker's time when it waits in line. Handed to
this thread, the flush of one file overlaps the computing of the next (the thread holds no GIL while it writes
or waits). One write is in flight at a time, so a worker holds at most one finished buffer beside the one it
builds, and the writes of a worker land in the order they were submitted (a spill before its marker, a shard
before its record). A failed write raises in the worker at its next ``submit`` or ``drain``.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

_thread: ThreadPoolExecutor | None = None
_pending: Future | None = None


def submit(write: Callable[[], None]) -> None:
    """Run ``write()`` in the background, after the previous write has finished."""
    global _thread, _pending
    drain()
    if _thread is None:
        _thread = ThreadPoolExecutor(1, thread_name_prefix="sharding-writeback")
    _pending = _thread.submit(write)


def drain() -> None:
    """Wait until every submitted write is on disk; raises the error of a write that failed."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        pending.result()
