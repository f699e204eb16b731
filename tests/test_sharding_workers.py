"""sharding.workers: one pool for every phase, each worker initialised once per phase, writes drained."""
from __future__ import annotations

import os
from pathlib import Path

from sharding import writeback
from sharding.workers import Workers

_DIR: Path | None = None


def _init(directory: str, phase: str) -> None:
    global _DIR
    _DIR = Path(directory) / phase
    _DIR.mkdir(exist_ok=True)
    with open(_DIR / "inits", "a") as f:
        f.write(f"{os.getpid()}\n")


def _job(i: int) -> int:
    path = _DIR / f"job-{i}"
    writeback.submit(path.touch)  # written behind: the phase must drain it
    return os.getpid()


def test_each_phase_initialises_every_worker_once_and_drains_their_writes(tmp_path):
    with Workers(2) as workers:
        for phase in ("extract", "merge"):
            pids = set(workers.map(_job, list(range(20)), _init, (str(tmp_path), phase)))
            inits = (tmp_path / phase / "inits").read_text().split()
            assert sorted(inits) == sorted(set(inits)) and len(inits) == 2  # once in each of 2 processes
            assert {int(p) for p in inits} >= pids and os.getpid() not in pids
            assert sorted(p.name for p in (tmp_path / phase).glob("job-*")) == sorted(f"job-{i}" for i in range(20))
        assert set(inits) == set((tmp_path / "extract" / "inits").read_text().split())  # the same workers


def test_one_worker_runs_in_process(tmp_path):
    with Workers(1) as workers:
        assert set(workers.map(_job, [0, 1], _init, (str(tmp_path), "only"))) == {os.getpid()}
    assert (tmp_path / "only" / "job-1").exists()
