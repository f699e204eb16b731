"""Deterministic tar (ustar) encoding of one shard, vectorised.

Headers carry fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444), so identical inputs give
byte-identical shards and sha256s. ``tarfile.TarInfo.tobuf`` costs ~15 us per member, which would make tar
headers the sharder's bottleneck (2 members per 1 kb window); here the shard is one numpy buffer, one row per
sample, and its headers are a fixed template plus the fields that vary (name, size, checksum), all samples at
once. The output is plain POSIX ustar: ``tarfile``, GNU tar and WebDataset read it.
"""
from __future__ import annotations

import numpy as np

BLOCK = 512
KEY_DIGITS = 12  # sample key = global index within the split, zero-padded (the shard contract)
_SIZE, _CHECKSUM = slice(124, 135), slice(148, 156)


def _template() -> np.ndarray:
    """A member header with every fixed field set and name, size and checksum left for ``_set_headers``."""
    h = np.zeros(BLOCK, np.uint8)
    for at, field in ((100, b"0000444"), (108, b"0000000"), (116, b"0000000"), (136, b"00000000000"),
                      (148, b" " * 8), (156, b"0"), (257, b"ustar\x0000")):  # mode, uid, gid, mtime, -, type
        h[at:at + len(field)] = np.frombuffer(field, np.uint8)
    return h


_TEMPLATE = _template()
_TEMPLATE_SUM = int(_TEMPLATE.sum())  # the checksum is the byte sum with its own field read as spaces


_DECIMAL4 = np.array([list(f"{i:04d}".encode()) for i in range(10_000)], np.uint8)


def _octal(values: np.ndarray, width: int) -> np.ndarray:
    """Right-aligned zero-padded octal ASCII digits, (n, width) uint8, computed once per distinct value (sizes
    and checksums take a few hundred values in a shard)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    shifts = 3 * np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((distinct[:, None] >> shifts & 7) + ord("0")).astype(np.uint8)[inverse.reshape(-1)]


def _key_digits(first: int, n: int) -> np.ndarray:
    """The 12 zero-padded decimal digits of keys first .. first + n - 1, (n, 12) uint8, in groups of four."""
    keys = np.arange(first, first + n, dtype=np.int64)
    return np.concatenate([_DECIMAL4[keys // 10 ** e % 10_000] for e in (8, 4, 0)], axis=1)


def _set_headers(headers: np.ndarray, keys: np.ndarray, key_sums: np.ndarray, suffix: bytes,
                 sizes: np.ndarray) -> None:
    """Fill ``headers`` (n, 512) with the ustar headers of members ``{key}{suffix}`` of ``sizes`` bytes (n or 1),
    given the key digits (n, 12) and their byte sums."""
    headers[:] = _TEMPLATE
    headers[:, :KEY_DIGITS] = keys
    headers[:, KEY_DIGITS:KEY_DIGITS + len(suffix)] = np.frombuffer(suffix, np.uint8)
    size_digits = _octal(sizes, _SIZE.stop - _SIZE.start)
    headers[:, _SIZE] = size_digits
    checksum = _TEMPLATE_SUM + sum(suffix) + key_sums + size_digits.sum(axis=1, dtype=np.int64)
    headers[:, _CHECKSUM.start:_CHECKSUM.start + 6] = _octal(checksum, 6)
    headers[:, _CHECKSUM.start + 6] = 0  # "%06o\0 ", as tarfile writes it


def shard_nbytes(n: int, length: int, json_blocks: int = 1) -> int:
    """Size of the tar of n samples of L bytes whose JSONs take ``json_blocks`` 512-byte blocks each."""
    return n * (2 * BLOCK + -(-length // BLOCK) * BLOCK + json_blocks * BLOCK) + 2 * BLOCK


def encode_shard(first_index: int, seqs: np.ndarray, jsons: list[str] | list[bytes],
                 out: np.ndarray | None = None) -> np.ndarray:
    """Tar bytes (flat uint8) of samples ``first_index + i``: members ``{key}.seq`` (the L bytes of ``seqs[i]``)
    then ``{key}.json`` (``jsons[i]``, ASCII text). Every byte is written, so ``out``, a uint8 buffer of at least
    ``shard_nbytes`` may be reused (the result is then a view of its start)."""
    n, length = seqs.shape
    # Fixed-width bytes, NUL-padded: row i is JSON i followed by the zeros that pad it in the tar.
    texts = np.array(jsons, dtype="S").reshape(n)
    json_sizes = np.char.str_len(texts).astype(np.int64)
    text_bytes = texts.view(np.uint8).reshape(n, texts.itemsize)
    keys = _key_digits(first_index, n)
    key_sums = keys.sum(axis=1, dtype=np.int64)

    # One row per sample: header | seq, zero-padded to 512 | header | json, zero-padded to 512. Rows are as wide
    # as the longest JSON needs; when every JSON takes as many blocks (the normal case) the rows are the tar as
    # is, followed by the end-of-archive marker (two zero blocks).
    seq_span = -(-length // BLOCK) * BLOCK
    json_blocks = -(-json_sizes // BLOCK)
    json_col = 2 * BLOCK + seq_span
    nbytes = shard_nbytes(n, length, int(json_blocks.max()))
    width = (nbytes - 2 * BLOCK) // n
    if out is None or len(out) < nbytes:
        out = np.empty(nbytes, np.uint8)
    rows = out[:n * width].reshape(n, width)
    _set_headers(rows[:, :BLOCK], keys, key_sums, b".seq", np.array([length]))
    rows[:, BLOCK:BLOCK + length] = seqs
    rows[:, BLOCK + length:BLOCK + seq_span] = 0
    _set_headers(rows[:, BLOCK + seq_span:json_col], keys, key_sums, b".json", json_sizes)
    rows[:, json_col:json_col + text_bytes.shape[1]] = text_bytes
    rows[:, json_col + text_bytes.shape[1]:] = 0
    out[n * width:nbytes] = 0
    if np.all(json_blocks == json_blocks[0]):
        return out[:nbytes]
    record = (json_col + json_blocks * BLOCK).tolist()
    return np.concatenate([*(rows[i, :r] for i, r in enumerate(record)), out[n * width:nbytes]])
