"""The vectorised tar index on archives written by other tools (webdataset's TarWriter: pax headers)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from crossdna.data.shards import ShardReader, SplitShards
from crossdna.data.tarindex import TarFormatError, index_seq_members


@pytest.fixture(scope="module")
def windows(chr20_shards) -> np.ndarray:
    shards = SplitShards.open(chr20_shards, "valid")
    return ShardReader(shards, cache_shards=1, verify_checksums=True).gather(np.arange(5))


def _wds_tar(samples: dict[str, dict[str, bytes]]) -> np.ndarray:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as writer:  # fractional mtime -> a pax header before every member
        for key, members in samples.items():
            writer.write({"__key__": key, **members})
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def test_webdataset_tarwriter_archives_with_pax_headers(windows):
    meta = b'{"chrom": "20", "note": "' + b"x" * 700 + b'"}'  # > 512 bytes: uneven member spacing
    data = _wds_tar({f"{i:012d}": {"seq": row.tobytes(), "json": meta} for i, row in enumerate(windows)})
    assert chr(data[156]) == "x"
    keys, offsets = index_seq_members(data, windows.shape[1])
    assert keys.tolist() == list(range(len(windows)))
    assert np.array_equal(np.stack([data[o:o + windows.shape[1]] for o in offsets]), windows)


@pytest.mark.parametrize("members,problem", [
    ({"seq": b"\0" * 10}, "holds 10 bytes"),
    ({"txt": b"\0"}, "is not named"),
])
def test_nonconforming_members_are_rejected(windows, members, problem):
    data = _wds_tar({"000000000000": {"seq": windows[0].tobytes()}, "000000000001": members})
    with pytest.raises(TarFormatError, match=problem):
        index_seq_members(data, windows.shape[1])


def test_truncation_is_detected(windows):
    data = _wds_tar({"000000000000": {"seq": windows[0].tobytes()}})
    with pytest.raises(TarFormatError, match="truncated|not a multiple"):
        index_seq_members(data[:1536], windows.shape[1])
    with pytest.raises(TarFormatError, match="no tar header"):
        index_seq_members(np.zeros(1024, dtype=np.uint8), windows.shape[1])
