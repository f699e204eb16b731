"""The vectorised tar encoder equals what ``tarfile`` writes for the same members (ustar, fixed metadata)."""
from __future__ import annotations

import io
import tarfile

import numpy as np

from sharding.tarwrite import encode_shard


def _tarfile_bytes(first_index: int, seqs: np.ndarray, jsons: list[bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, (seq, js) in enumerate(zip(seqs, jsons)):
            for name, data in ((f"{first_index + i:012d}.seq", seq.tobytes()), (f"{first_index + i:012d}.json", js)):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0o444, 0, 0, 0, "", ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_encoder_matches_tarfile_byte_for_byte():
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 5, size=(7, 1000), dtype=np.uint8)  # L not a multiple of 512
    # JSON sizes across the 512-byte block boundary (a very long contig name needs two blocks)
    jsons = [b'{"chrom":"' + b"c" * n + b'","index":1}' for n in (1, 480, 499, 500, 501, 1200, 3)]
    ours = encode_shard(123_456, seqs, jsons).tobytes()
    theirs = _tarfile_bytes(123_456, seqs, jsons)
    assert theirs[:len(ours)] == ours and not any(theirs[len(ours):])  # tarfile pads to 10 KiB records
    with tarfile.open(fileobj=io.BytesIO(ours)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members[:2]] == ["000000123456.seq", "000000123456.json"]
        assert tf.extractfile(members[10]).read() == seqs[5].tobytes()
        assert tf.extractfile(members[11]).read() == jsons[5]


def test_reused_buffer_gives_the_same_bytes_and_webdataset_reads_them():
    """The shard writer reuses its buffers: every byte is written, whatever the buffer held before."""
    from webdataset import tariterators

    rng = np.random.default_rng(1)
    seqs = rng.integers(0, 5, size=(50, 1024), dtype=np.uint8)
    jsons = [f'{{"chrom":"20","start":{1024 * i},"index":{7 + i}}}' for i in range(50)]
    fresh = encode_shard(7, seqs, jsons).tobytes()
    dirty = np.full(len(fresh) + 4096, 0xAB, np.uint8)
    reused = encode_shard(7, seqs, jsons, dirty)
    assert np.shares_memory(reused, dirty)  # written in place
    assert reused.tobytes() == fresh == _tarfile_bytes(7, seqs, [j.encode() for j in jsons])[:len(fresh)]
    members = list(tariterators.tar_file_iterator(io.BytesIO(fresh)))
    assert [m["fname"] for m in members[:2]] == ["000000000007.seq", "000000000007.json"]
    assert [m["data"] for m in members[0::2]] == [row.tobytes() for row in seqs]
    assert [m["data"] for m in members[1::2]] == [j.encode() for j in jsons]
