"""The global order, schedule and rank slicing: pure functions, no data read."""
from __future__ import annotations

import numpy as np
import pytest

from crossdna.data.order import EpochOrder, GlobalSchedule, RankSlicer

# A split of 10 shards of 64 samples plus a remainder shard of 23 (the sharder's layout).
SIZES = np.array([64] * 10 + [23])
TOTAL = int(SIZES.sum())


def test_epoch_order_is_a_deterministic_permutation():
    a = EpochOrder(SIZES, seed=7, epoch=0, block_shards=3)
    b = EpochOrder(SIZES, seed=7, epoch=0, block_shards=3)
    full = a.full()
    assert a.num_samples == TOTAL
    assert np.array_equal(np.sort(full), np.arange(TOTAL))
    assert np.array_equal(full, b.full())
    # Random access (any positions, any order, across blocks) agrees with the materialised order.
    positions = np.random.default_rng(0).integers(0, TOTAL, 300)
    assert np.array_equal(b.indices(positions), full[positions])
    assert not np.array_equal(full, EpochOrder(SIZES, seed=7, epoch=1, block_shards=3).full())
    assert not np.array_equal(full, EpochOrder(SIZES, seed=8, epoch=0, block_shards=3).full())


def test_blocks_keep_reading_local():
    order = EpochOrder(SIZES, seed=1, epoch=2, block_shards=3)
    starts = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    for b, shards in enumerate(order.blocks):
        span = order.full()[order.block_starts[b]:order.block_starts[b + 1]]
        shard_of = np.searchsorted(starts, span, side="right") - 1
        assert set(shard_of.tolist()) == set(shards.tolist())
    # block_shards=1 is a shard permutation plus a within-shard shuffle.
    single = EpochOrder(SIZES, seed=1, epoch=0, block_shards=1).full()
    first_shard = np.searchsorted(starts, single[:SIZES.max()], side="right") - 1
    assert len(set(first_shard.tolist())) == 1


@pytest.mark.parametrize("tail,per_epoch,steps", [("drop", 575, 5), ("wrap", TOTAL, 6)])
def test_schedule_tail_policy(tail, per_epoch, steps):
    schedule = GlobalSchedule(TOTAL, 115, tail)
    assert schedule.samples_per_epoch == per_epoch
    assert schedule.steps_per_epoch == steps
    epoch, pos = schedule.locate(np.arange(per_epoch - 2, per_epoch + 2))
    assert epoch.tolist() == [0, 0, 1, 1] and pos.tolist() == [per_epoch - 2, per_epoch - 1, 0, 1]


def test_schedule_state_round_trip_and_errors():
    schedule = GlobalSchedule(TOTAL, 115, "wrap")
    position = 9 * 115  # step 9 lies in epoch 1
    assert schedule.to_state(position) == (1, position - TOTAL)
    assert schedule.from_state(*schedule.to_state(position)) == position
    with pytest.raises(ValueError, match="global-batch boundary"):
        schedule.from_state(0, 100)
    with pytest.raises(ValueError, match="outside"):
        schedule.from_state(0, TOTAL)
    with pytest.raises(ValueError, match="larger than the split"):
        GlobalSchedule(TOTAL, TOTAL + 1, "drop")


@pytest.mark.parametrize("world,micro,accum", [(1, 12, 4), (2, 6, 4), (4, 3, 4), (4, 6, 2), (2, 24, 1)])
def test_ranks_partition_each_global_batch(world, micro, accum):
    """At any (world, micro, accum) with the same global batch, the ranks' micro-batches tile each global batch
    exactly, so global batches never depend on the topology."""
    slicers = [RankSlicer(world, r, micro, accum) for r in range(world)]
    assert slicers[0].global_batch == 48
    for step in range(3):
        taken = np.concatenate([s.positions(step * accum + a) for s in slicers for a in range(accum)])
        assert np.array_equal(np.sort(taken), np.arange(step * 48, (step + 1) * 48))


def test_slicer_validates():
    with pytest.raises(ValueError, match="rank"):
        RankSlicer(2, 2, 4, 1)
    with pytest.raises(ValueError, match="micro_batch"):
        RankSlicer(2, 0, 0, 1)
