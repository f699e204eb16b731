"""The worker processes of a build: in-process for one worker, else one forkserver pool for all of its phases.

A phase (extraction, shard writing) runs ``init(*init_args)`` once in every worker (the plan is sent once per
worker, not once per job), then its jobs, yielding their results in completion order, then drains every
worker's write-behind (``sharding.writeback``): when a phase's map ends, all of its files are on disk.
``build_shards`` runs both phases on one pool, so its workers start once (~10 ms, and a first job that page-
faults its fresh heap) rather than once per phase.
"""
from __future__ import annotations

import multiprocessing
from typing import Callable, Iterator

from sharding import writeback

_BARRIER = None  # in a pool worker: the barrier that makes ``_once`` run in every worker exactly once


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _once(call: tuple[Callable, tuple]) -> None:
    # Each worker waits here until every worker holds one of these calls, so no worker takes two.
    _BARRIER.wait()
    fn, args = call
    fn(*args)


class Workers:
    """``with Workers(n) as workers: workers.map(fn, jobs, init, init_args)``, once per phase."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def __enter__(self) -> Workers:
        if self.workers > 1:
            # forkserver, not fork: the caller may hold threads (torch, a loader) whose locks a fork would copy.
            # The server imports the worker modules once; workers are then cheap forks of it. sharding.build is
            # preloaded too: a worker imports the caller's main module, and with it sharding.build (and tqdm),
            # which would otherwise cost every worker ~45 ms. Started now, the workers boot while the caller
            # checks its inputs and plans.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["sharding.build"])
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(ctx.Barrier(self.workers),))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def map(self, fn: Callable, jobs: list, init: Callable, init_args: tuple) -> Iterator:
        if self._pool is None:
            init(*init_args)
            yield from map(fn, jobs)
            writeback.drain()
            return
        self._every(init, init_args)
        yield from self._pool.imap_unordered(fn, jobs)
        self._every(writeback.drain, ())

    def finish(self) -> None:
        """No phase follows: the workers exit (and free their memory) while the caller writes its manifest."""
        if self._pool is not None:
            self._pool.close()

    def _every(self, fn: Callable, args: tuple) -> None:
        self._pool.map(_once, [(fn, args)] * self.workers, chunksize=1)
