"""Vectorised index of a WebDataset shard (a ustar archive) in memory: where each ``{key}.seq`` payload lies.

Why not iterate with ``webdataset.tariterators``: every DataLoader worker of every rank opens every shard of the
epoch (the topology-independent order puts samples of all shards into every rank's micro-batches), so shard
opening is paid ``world * num_workers`` times. webdataset's iterator (Python ``tarfile``) takes about 0.36 s for a
4096-sample shard; this index about 20 ms (once per process: the reader remembers it), after which samples are
gathered with one numpy index. The tests check it against ``webdataset.tariterators`` member for member on the
real chr20 shards.

Layout handled: 512-byte ustar/GNU headers, regular files, and POSIX pax headers (``x``/``g``, as Python's
``tarfile`` writes for a fractional mtime) as long as they do not override a member's path or size.
"""
from __future__ import annotations

import numpy as np

BLOCK = 512
_KEY_DIGITS = 12
_SEQ = np.frombuffer(b".seq\0", dtype=np.uint8)
_JSON = np.frombuffer(b".json\0", dtype=np.uint8)
_USTAR = np.frombuffer(b"ustar", dtype=np.uint8)
_OCTAL_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # 11 digits, most significant first


class TarFormatError(ValueError):
    """The bytes are not a well-formed shard; the message says where (the caller adds the shard path)."""


def index_seq_members(buf: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys int64 [n], payload byte offsets int64 [n]) of the ``.seq`` members of ``buf``, in archive order.

    Checks the header chain end to end, that every member is ``{12-digit key}.seq`` / ``.json``, that every
    ``.seq`` payload is exactly ``length`` bytes, and that the archive ends with an end-of-archive block.
    """
    if len(buf) % BLOCK:
        raise TarFormatError(f"size {len(buf)} is not a multiple of {BLOCK} bytes (truncated?)")
    blocks = buf.reshape(-1, BLOCK)
    headers = _header_chain(blocks)
    kinds = blocks[headers, 156]
    pax = (kinds == ord("x")) | (kinds == ord("g"))
    if pax.any():
        _check_pax(blocks, headers[pax], _sizes(blocks[headers[pax], 124:135]))
    regular = (kinds == ord("0")) | (kinds == 0)
    if not (regular | pax).all():
        bad = headers[~(regular | pax)][0]
        raise TarFormatError(f"member at byte {bad * BLOCK} has unsupported type {chr(blocks[bad, 156])!r}")
    headers = headers[regular]
    names = blocks[:, :_KEY_DIGITS + len(_JSON)][headers]  # column slices first: copy ~18 bytes per header
    digits = names[:, :_KEY_DIGITS].astype(np.int64) - ord("0")
    is_seq = (names[:, _KEY_DIGITS:_KEY_DIGITS + len(_SEQ)] == _SEQ).all(axis=1)
    is_json = (names[:, _KEY_DIGITS:] == _JSON).all(axis=1)
    named = ((digits >= 0) & (digits <= 9)).all(axis=1) & (is_seq | is_json) & (blocks[headers, 345] == 0)
    if not named.all():
        bad = blocks[headers[~named][0]]
        name = bytes(bad[:100]).split(b"\0", 1)[0].decode("ascii", "replace")
        raise TarFormatError(f"member {name!r} is not named <12-digit key>.seq or .json")
    sizes = _sizes(blocks[:, 124:135][headers[is_seq]])
    if (sizes != length).any():
        raise TarFormatError(f"a .seq member holds {int(sizes[sizes != length][0])} bytes, expected {length}")
    keys = digits[is_seq] @ (10 ** np.arange(_KEY_DIGITS - 1, -1, -1, dtype=np.int64))
    return keys, (headers[is_seq] + 1) * BLOCK


def _sizes(fields: np.ndarray) -> np.ndarray:
    """Size fields (header bytes 124:135): 11 zero-padded octal digits (tarfile and GNU tar, < 8 GiB)."""
    digits = fields.astype(np.int64) - ord("0")
    if ((digits < 0) | (digits > 7)).any():
        raise TarFormatError("a member's size field is not 11 octal digits")
    return digits @ _OCTAL_WEIGHTS


def _header_chain(blocks: np.ndarray) -> np.ndarray:
    """Block numbers of all member headers, following the chain header -> payload -> next header."""
    candidates = np.flatnonzero((blocks[:, 257:262] == _USTAR).all(axis=1))
    if len(candidates) == 0 or candidates[0] != 0:
        raise TarFormatError("no tar header at byte 0")
    follow = candidates + 1 + -(-_sizes(blocks[:, 124:135][candidates]) // BLOCK)
    # Fast path: each candidate's successor is the next candidate. Otherwise (a payload that happens to contain
    # "ustar" at offset 257) walk the chain explicitly.
    if (follow[:-1] == candidates[1:]).all():
        chain, end = candidates, int(follow[-1])
    else:
        is_header = dict(zip(candidates.tolist(), follow.tolist()))
        chain, at = [], 0
        while at in is_header:
            chain.append(at)
            at = is_header[at]
        chain, end = np.array(chain, dtype=np.int64), at
    if end > len(blocks):
        raise TarFormatError(f"truncated: the member at byte {int(chain[-1]) * BLOCK} runs past the end of the file")
    if end == len(blocks):
        raise TarFormatError("truncated: no end-of-archive block after the last member")
    if blocks[end].any():
        raise TarFormatError(f"corrupt header at byte {end * BLOCK}")
    return chain


def _check_pax(blocks: np.ndarray, headers: np.ndarray, sizes: np.ndarray) -> None:
    for header, size in zip(headers.tolist(), sizes.tolist()):
        records = blocks[header + 1:].reshape(-1)[:size].tobytes()
        if b" path=" in records or b" size=" in records or b" linkpath=" in records:
            raise TarFormatError(f"pax header at byte {header * BLOCK} overrides a member's path or size")
