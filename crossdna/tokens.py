"""The model's token alphabet and the reverse complement, shared by the sharder, loader, model and export.

Model space is A=0, C=1, G=2, T=3, N=4 (spec §1.1). Every other input letter maps to N. The MLM mask token is
a documented choice (spec §1.3, defect 3): ``upstream`` reuses id 4 (N), which keeps upstream weights
loadable; ``dedicated`` gives [MASK] its own id 5, so the stems see a sixth one-hot channel.
"""
from __future__ import annotations

import numpy as np

A, C, G, T, N = 0, 1, 2, 3, 4
BASES = "ACGTN"
NUM_BASES = 5          # output classes of the MLM head: A, C, G, T, N
DEDICATED_MASK_ID = 5  # only with mask_token='dedicated'

# Byte -> id lookup table. Lower case is folded to upper case (soft-masked repeats are real sequence).
_ENCODE = np.full(256, N, dtype=np.uint8)
for _i, _b in enumerate("ACGT"):
    _ENCODE[ord(_b)] = _i
    _ENCODE[ord(_b.lower())] = _i

# Complement in id space: A<->T, C<->G, N and [MASK] fixed. (Upstream's P_comp [3,0,2,1,4] is wrong: defect 6.)
COMPLEMENT = np.array([T, G, C, A, N, DEDICATED_MASK_ID], dtype=np.uint8)
COMPLEMENT_PERMUTATION = (3, 2, 1, 0, 4)


def encode(seq: bytes | str) -> np.ndarray:
    """ASCII sequence -> uint8 ids (vectorised; non-ACGT letters become N)."""
    raw = seq.encode("ascii") if isinstance(seq, str) else seq
    return _ENCODE[np.frombuffer(raw, dtype=np.uint8)]


def is_acgtn(raw: np.ndarray) -> np.ndarray:
    """Boolean per byte: is it one of ACGTN/acgtn (used to count letters that were folded into N)."""
    up = raw & 0xDF  # ASCII upper-case for letters
    return (up == ord("A")) | (up == ord("C")) | (up == ord("G")) | (up == ord("T")) | (up == ord("N"))


def decode(ids: np.ndarray) -> str:
    table = np.frombuffer(b"ACGTN?", dtype=np.uint8)
    return table[np.asarray(ids, dtype=np.int64)].tobytes().decode("ascii")


def reverse_complement(ids: np.ndarray) -> np.ndarray:
    """Reverse complement along the last axis (numpy, id space)."""
    return COMPLEMENT[ids][..., ::-1]
