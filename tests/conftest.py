"""Shared fixtures. Each test module owns its own specific fixtures; only cross-cutting ones live here."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests must be deterministic and quiet regardless of the developer's environment.
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_environment():
    """No test leaks environment variables into the next (e.g. RANK from an in-process init_distributed, which a
    later `sbatch --export=ALL` would hand to every task of a job)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def chr20_shards(tmp_path_factory) -> Path:
    """Shard directory of real GRCh37 chr20 windows, built once per session: L=256, 64 samples per shard.

    train = 20:59,980-259,980 (781 windows in 13 shards; the first window holds 20 N of the telomere gap),
    valid = 20:30,000,000-30,030,000 and test = 20:40,000,000-40,030,000 (117 windows in 2 shards each).
    """
    from sharding.build import build_shards
    from sharding.config import ShardConfig

    root = tmp_path_factory.mktemp("chr20_shards")
    bed = root / "regions.bed"
    bed.write_text("20\t59980\t259980\ttrain\n20\t30000000\t30030000\tvalid\n20\t40000000\t40030000\ttest\n")
    # $CROSSDNA_CHR20_FASTA: a GPU machine's copy of the checkout has no ../shared beside it
    fasta = os.environ.get("CROSSDNA_CHR20_FASTA") or str(SHARED_DATA / "human_chr20_grch37" / "20.fa.gz")
    cfg = ShardConfig(fasta=fasta, bed=str(bed),
                      window_length=256, samples_per_shard=64, seed=0)
    out = root / "shards"
    build_shards(cfg, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def single_thread_torch():
    """Run torch CPU ops on one thread: small-tensor tests on a shared 2-core box slow down >10x when OpenMP
    threads contend with other processes, and gain nothing from a second thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
