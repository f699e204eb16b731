"""PretrainStream / EvalStream on real chr20 shards: exact partition, resume across world sizes, masks, errors."""
from __future__ import annotations

import io
import itertools
import json
import re
import shutil

import numpy as np
import pytest
import torch

from crossdna.data import DataConfig, EvalStream, PretrainStream, ShardError
from crossdna.data.shards import ShardReader, SplitShards
from crossdna.tokens import DEDICATED_MASK_ID, N, reverse_complement

TRAIN_SAMPLES = 781
G = 48  # global batch of every topology below


def config(**kw) -> DataConfig:
    return DataConfig(num_workers=0, **kw)


def topology(world: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with world * micro * accum == G."""
    return {1: (12, 4), 2: (6, 4), 4: (6, 2)}[world]


def global_steps(shards, cfg: DataConfig, world: int, steps: int, state: dict | None = None) -> list[dict]:
    """Runs ``world`` in-process ranks for ``steps`` optimizer steps; returns each step's global batch in stream
    order (accumulation step, then rank) as {index, input_ids, labels, loss_mask} arrays, plus the final state."""
    micro, accum = topology(world)
    streams = [PretrainStream(shards, "train", cfg, r, world, micro, accum) for r in range(world)]
    if state is not None:
        for s in streams:
            s.load_state_dict(state)
    iters = [iter(s) for s in streams]
    out = []
    for _ in range(steps):
        per_rank = [[next(it) for _ in range(accum)] for it in iters]
        parts = [per_rank[r][a] for a in range(accum) for r in range(world)]
        out.append({k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]})
    states = [s.state_dict() for s in streams]
    assert all(st == states[0] for st in states)
    assert all(s.epoch == states[0]["epoch"] for s in streams)
    return out, states[0]


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            assert np.array_equal(x[key], y[key]), key


def test_batches_follow_the_contract(chr20_shards):
    stream = PretrainStream(chr20_shards, "train", config(), 0, 1, 8, 1)
    batch = next(iter(stream))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (8, 256)
    assert batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.bool
    assert batch["index"].shape == (8,)
    assert stream.steps_per_epoch == TRAIN_SAMPLES // 8


def test_reader_matches_webdataset(chr20_shards):
    """The vectorised tar index returns exactly what webdataset's own tar iterator reads, member for member."""
    from webdataset import tariterators

    shards = SplitShards.open(chr20_shards, "train")
    reader = ShardReader(shards, cache_shards=2, verify_checksums=True)
    for s in (0, len(shards.paths) - 1):  # a full shard and the remainder shard
        with open(shards.paths[s], "rb") as f:
            members = [m for m in tariterators.tar_file_iterator(io.BytesIO(f.read())) if m["fname"].endswith(".seq")]
        keys = np.array([int(m["fname"].split(".")[0]) for m in members])
        assert np.array_equal(keys, shards.starts[s] + np.arange(shards.sizes[s]))
        expected = np.stack([np.frombuffer(m["data"], dtype=np.uint8) for m in members])
        assert np.array_equal(reader.gather(keys), expected)


def test_two_runs_are_identical(chr20_shards):
    cfg = config(seed=3, rc_augment=True)
    a, state_a = global_steps(chr20_shards, cfg, 2, 5)
    b, state_b = global_steps(chr20_shards, cfg, 2, 5)
    assert_same_steps(a, b)
    assert state_a == state_b == {**state_a, "epoch": 0, "consumed": 5 * G}
    c, _ = global_steps(chr20_shards, config(seed=4, rc_augment=True), 2, 5)
    assert not np.array_equal(a[0]["index"], c[0]["index"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_world_sizes_partition_an_epoch_exactly(chr20_shards, world):
    """Every topology yields the same global batches; an epoch visits each sample at most once and, with
    tail=drop, exactly the first (N // G) * G of the epoch's order."""
    steps = TRAIN_SAMPLES // G
    reference, _ = global_steps(chr20_shards, config(), 1, steps)
    ours, state = global_steps(chr20_shards, config(), world, steps)
    assert_same_steps(ours, reference)
    seen = np.concatenate([s["index"] for s in ours])
    assert len(seen) == steps * G == len(np.unique(seen))
    assert state["epoch"] == 1 and state["consumed"] == 0  # the 781 - 768 = 13 tail samples were dropped


def test_resume_at_other_world_sizes_continues_the_same_sequence(chr20_shards):
    cfg = config(seed=11, rc_augment=True)
    uninterrupted, _ = global_steps(chr20_shards, cfg, 2, 20)
    k = 7
    _, state = global_steps(chr20_shards, cfg, 2, k)
    for world in (1, 4):
        resumed, _ = global_steps(chr20_shards, cfg, world, 20 - k, state=state)
        assert_same_steps(resumed, uninterrupted[k:])  # crosses the epoch boundary at step 16


def test_wrap_tail_fills_from_the_next_epoch(chr20_shards):
    steps = -(-TRAIN_SAMPLES // G) + 2
    run, state = global_steps(chr20_shards, config(tail="wrap"), 2, steps)
    stream = np.concatenate([s["index"] for s in run])
    first_epoch = stream[:TRAIN_SAMPLES]
    assert np.array_equal(np.sort(first_epoch), np.arange(TRAIN_SAMPLES))  # nothing skipped, nothing repeated
    assert len(np.unique(stream[TRAIN_SAMPLES:])) == len(stream) - TRAIN_SAMPLES
    assert state == {**state, "epoch": 1, "consumed": steps * G - TRAIN_SAMPLES}


def test_workers_interleave_in_order_and_prefetch_does_not_advance_state(chr20_shards):
    in_process = PretrainStream(chr20_shards, "train", config(), 0, 2, 4, 3)
    expected = [b["index"] for b in itertools.islice(in_process, 9)]
    stream = PretrainStream(chr20_shards, "train", DataConfig(num_workers=2, prefetch_factor=4), 0, 2, 4, 3)
    got = []
    for batch in stream:  # two workers prefetch up to 8 micro-batches ahead
        got.append(batch["index"])
        if len(got) == 9:
            break
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert stream.state_dict()["consumed"] == 3 * 24  # 9 micro-batches = 3 steps of G = 24


def test_state_errors_are_explicit(chr20_shards, tmp_path):
    stream = PretrainStream(chr20_shards, "train", config(), 0, 1, 4, 2)
    it = iter(stream)
    next(it)
    with pytest.raises(RuntimeError, match="middle of an optimizer step"):
        stream.state_dict()
    next(it)
    state = stream.state_dict()

    other = PretrainStream(chr20_shards, "train", config(seed=1), 0, 1, 4, 2)
    with pytest.raises(ValueError, match="seed=0"):
        other.load_state_dict(state)
    other = PretrainStream(chr20_shards, "train", config(), 0, 1, 4, 4)
    with pytest.raises(ValueError, match="global_batch=8"):
        other.load_state_dict(state)

    # Same windows, different manifest (any byte of it): refuse rather than silently restart the data.
    copy = tmp_path / "shards"
    shutil.copytree(chr20_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stats"]["note"] = "edited"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    moved = PretrainStream(copy, "train", config(), 0, 1, 4, 2)
    with pytest.raises(ValueError, match="refusing to resume"):
        moved.load_state_dict(state)


def test_mask_statistics_and_no_double_masking(chr20_shards):
    stream = PretrainStream(chr20_shards, "train", config(), 0, 1, 71, 1)
    batches = list(itertools.islice(stream, 11))  # 781 = 11 * 71: the whole split
    ids = torch.cat([b["input_ids"] for b in batches]).numpy()
    labels = torch.cat([b["labels"] for b in batches]).numpy()
    mask = torch.cat([b["loss_mask"] for b in batches]).numpy()
    assert np.array_equal(np.sort(torch.cat([b["index"] for b in batches]).numpy()), np.arange(TRAIN_SAMPLES))
    eligible = labels != N
    assert (labels == N).sum() == 20 and not mask[~eligible].any()  # genomic N never selected
    assert abs(mask.sum() / eligible.sum() - 0.15) < 0.005  # 199,916 eligible positions: sd 0.0008
    # Outside the loss mask the input is the clean sequence (upstream corrupted ~13% of these: defect 2).
    assert np.array_equal(ids[~mask], labels[~mask])
    shown = ids[mask]
    masked, same = shown == N, shown == labels[mask]
    random = ~masked & ~same
    assert abs(masked.mean() - 0.8) < 0.01
    # A random base equals the original 1/4 of the time, so "unchanged" is keep + random/4.
    assert abs(same.mean() - (0.1 + 0.1 / 4)) < 0.008 and abs(random.mean() - 0.075) < 0.008
    # Changed random bases: base b replaces the others, so it shows with frequency (1 - p_b) / 3 (0.23-0.27 here).
    shares = np.bincount(shown[random], minlength=5) / random.sum()
    assert shares[N] == 0 and (abs(shares[:4] - 0.25) < 0.05).all()


def test_dedicated_mask_token_and_n_selection(chr20_shards):
    batch = next(iter(PretrainStream(chr20_shards, "train", config(mask_token="dedicated"), 0, 1, 64, 1)))
    shown = batch["input_ids"][batch["loss_mask"]]
    assert (shown == DEDICATED_MASK_ID).float().mean() > 0.7
    assert not (batch["input_ids"][~batch["loss_mask"]] == DEDICATED_MASK_ID).any()
    # With exclude_n_from_masking=false the N of the telomere window can be selected (mask_prob 0.5: the chance
    # that none of its 20 N is picked is 1e-6).
    cfg = config(exclude_n_from_masking=False, mask_prob=0.5)
    batches = list(itertools.islice(PretrainStream(chr20_shards, "train", cfg, 0, 1, 71, 1), 11))
    labels = torch.cat([b["labels"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches])
    assert mask[labels == N].any()


def test_rc_augment_is_a_pure_function_of_sample_and_epoch(chr20_shards):
    shards = SplitShards.open(chr20_shards, "train")
    reader = ShardReader(shards, cache_shards=16, verify_checksums=False)
    steps = TRAIN_SAMPLES // G
    run, _ = global_steps(chr20_shards, config(rc_augment=True), 2, 2 * steps)
    flips = {}
    for step, s in enumerate(run):
        clean = reader.gather(s["index"])
        rc = reverse_complement(clean)
        flipped = np.all(s["labels"] == rc, axis=1)
        assert (flipped | np.all(s["labels"] == clean, axis=1)).all()
        for i, f in zip(s["index"].tolist(), flipped.tolist()):
            flips[(step // steps, i)] = f
    rate = np.mean(list(flips.values()))
    assert 0.4 < rate < 0.6
    both = [i for i in range(TRAIN_SAMPLES) if (0, i) in flips and (1, i) in flips]
    assert any(flips[(0, i)] != flips[(1, i)] for i in both)  # redrawn per epoch


@pytest.mark.parametrize("world", [1, 3])
def test_eval_covers_the_split_once_with_fixed_masks(chr20_shards, world):
    reference = {}
    for batch in EvalStream(chr20_shards, "valid", config(), 0, 1, 16):
        for i, row, m in zip(batch["index"].tolist(), batch["input_ids"], batch["loss_mask"]):
            reference.setdefault(i, (row, m))
    counts = np.zeros(117, dtype=int)
    lengths = set()
    for rank in range(world):
        stream = EvalStream(chr20_shards, "valid", config(), rank, world, 16)
        passes = [list(stream), list(stream)]
        lengths.add(len(passes[0]))
        assert len(passes[0]) == len(stream)
        for a, b in zip(*passes):
            assert all(torch.equal(a[k], b[k]) for k in a)  # same masks at every evaluation
            assert a["input_ids"].shape == (16, 256)
            assert not a["loss_mask"][~a["valid"]].any()
            for row in torch.nonzero(a["valid"]).flatten().tolist():
                i = int(a["index"][row])
                counts[i] += 1
                assert torch.equal(a["input_ids"][row], reference[i][0])  # independent of the world size
    assert (counts == 1).all() and len(lengths) == 1


def _corrupt_copy(src, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(src, copy)
    return copy, SplitShards.open(copy, "train").paths[2]


def _read_all(path, **kw):
    stream = PretrainStream(path, "train", DataConfig(shuffle_block_shards=13, **kw), 0, 1, 781, 1)
    next(iter(stream))


def test_corrupt_byte_is_caught_by_the_checksum(chr20_shards, tmp_path):
    copy, shard = _corrupt_copy(chr20_shards, tmp_path)
    raw = bytearray(shard.read_bytes())
    raw[512 + 100] = (raw[512 + 100] + 1) % 4  # a base inside the first sample: still a valid token id
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=re.escape(str(shard)) + ": sha256"):
        _read_all(copy, num_workers=1)  # raised in a DataLoader worker, re-raised here with the shard named
    _read_all(copy, num_workers=0, verify_checksums=False)  # the documented opt-out reads it


def test_truncated_and_missing_shards_are_named(chr20_shards, tmp_path):
    copy, shard = _corrupt_copy(chr20_shards, tmp_path)
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1024])
    with pytest.raises(ShardError, match=re.escape(str(shard)) + ": .*truncated"):
        _read_all(copy, num_workers=0, verify_checksums=False)
    shard.unlink()
    with pytest.raises(ShardError, match=re.escape(str(shard)) + ": .*missing"):
        _read_all(copy, num_workers=0)


def test_broken_tar_structure_is_named_without_checksums(chr20_shards, tmp_path):
    copy, shard = _corrupt_copy(chr20_shards, tmp_path)
    raw = bytearray(shard.read_bytes())
    raw[2048 + 124 + 7] = ord("1")  # second .seq header's size 0o400 -> 0o1400: the header chain breaks
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=re.escape(str(shard)) + ": corrupt header"):
        _read_all(copy, num_workers=0, verify_checksums=False)


def test_eval_with_persistent_workers_matches_in_process(chr20_shards):
    in_process = list(EvalStream(chr20_shards, "valid", config(), 1, 2, 12))
    stream = EvalStream(chr20_shards, "valid", DataConfig(num_workers=2), 1, 2, 12)  # 5 batches over 2 workers
    for _ in range(2):  # the second pass reuses the persistent workers
        got = list(stream)
        assert len(got) == len(in_process) == 5
        assert all(torch.equal(a[k], b[k]) for a, b in zip(got, in_process) for k in a)
