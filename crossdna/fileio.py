"""File primitives shared by the sharder, the checkpoints and the result writers.

Crash-safe writes: a temp file in the same directory, fsync, rename over the target. A reader (or a resumed run)
therefore sees either the old file or the complete new one, never a torn write, whatever kills the writer
(SIGKILL, a full disk, a node failure).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

_CHUNK = 1 << 22
TMP_SUFFIX = ".tmp-"  # temp name: ".{name}.tmp-{pid}" beside the target


def write_atomic(path: str | Path, data: bytes | memoryview | np.ndarray, durable: bool = True) -> None:
    """``durable=False`` skips the fsync: still never torn (rename), but possibly lost in a crash, for work files
    whose content is checked against a checksum before it is trusted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}{os.getpid()}")
    view = memoryview(data).cast("B")
    try:
        with open(tmp, "wb") as f:
            for offset in range(0, len(view), _CHUNK):
                f.write(view[offset:offset + _CHUNK])
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
