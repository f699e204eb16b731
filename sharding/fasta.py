"""Whole-range FASTA reads, plain or BGZF, through the samtools ``.fai`` (and bgzip ``.gzi``) indices.

Why not pyfaidx for the reads: it reads BGZF only through Biopython (not a dependency here) and decodes to
``str``; the sharder reads each contig range once, so it needs one large, fast read. A range is read as raw
bytes from a line-aligned offset, decompressing only the BGZF blocks that cover it (located with the ``.gzi``)
with ISA-L's inflate (python-isal: 2.2x Python's zlib on these blocks, as fast as bgzip's libdeflate). The
line terminators sit where the index says (checked on one byte per line), so one ``bytes.translate`` pass
deletes them and, for the sharder, maps every letter to its token id in the same pass.
Missing indices are built in one streaming pass and written next to the FASTA (atomically).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from isal import isal_zlib

from crossdna.fileio import write_atomic

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 24
_PLAIN_CHUNK = 1 << 16  # plain FASTA read in BGZF-block-sized pieces: translated while in cache


@dataclass(frozen=True)
class Contig:
    name: str
    length: int
    offset: int     # uncompressed byte offset of the first base
    linebases: int  # bases per full line
    linewidth: int  # bytes per full line, terminator included


def _is_bgzf(head: bytes) -> bool:
    # BGZF = gzip member with FEXTRA (flag 4) whose first subfield is 'BC' (SAM spec §4.1).
    return len(head) >= 18 and head[:2] == _GZIP_MAGIC and head[3] & 4 and head[12:14] == b"BC"


def _bgzf_blocks(f) -> Iterator[tuple[int, bytes]]:
    """(compressed offset, decompressed bytes) per BGZF block, from the file's current position."""
    pos = f.tell()
    while head := f.read(18):
        if len(head) < 18 or not _is_bgzf(head):
            raise ValueError(f"{f.name}: corrupt BGZF block at byte {pos}")
        bsize = int.from_bytes(head[16:18], "little") + 1
        body = f.read(bsize - 18)
        yield pos, isal_zlib.decompress(body[:-8], -15)
        pos += bsize


class _FaiBuilder:
    """Streaming ``.fai`` builder with samtools' rules: fixed line width inside a record, last line may be short."""

    def __init__(self, path: Path):
        self.path, self.entries = path, []
        self._rec: list | None = None  # [name, length, offset, linebases, linewidth, short_line_seen]
        self._lineno, self._pos, self._carry = 0, 0, b""

    def feed(self, data: bytes) -> None:
        lines = (self._carry + data).split(b"\n")
        self._carry = lines.pop()
        for line in lines:
            self._line(line + b"\n")

    def finish(self) -> list[Contig]:
        if self._carry:
            self._line(self._carry)
        self._close()
        if not self.entries:
            raise ValueError(f"{self.path}: no FASTA records (no '>' header line)")
        return self.entries

    def _line(self, line: bytes) -> None:
        self._lineno += 1
        self._pos += len(line)
        if line.startswith(b">"):
            self._close()
            name = line[1:].split(None, 1)[0].decode() if line[1:].strip() else ""
            if not name:
                raise ValueError(f"{self.path}:{self._lineno}: FASTA header without a name")
            if any(e.name == name for e in self.entries):
                raise ValueError(f"{self.path}:{self._lineno}: duplicate contig name {name!r}")
            self._rec = [name, 0, self._pos, 0, 0, False]
            return
        bases = len(line.rstrip(b"\r\n"))
        if self._rec is None:
            if bases:
                raise ValueError(f"{self.path}:{self._lineno}: sequence before the first '>' header")
            return
        rec = self._rec
        if bases == 0:
            rec[5] = True  # a blank line may only end a record
            return
        if rec[3] == 0:
            rec[3], rec[4] = bases, len(line)
        elif rec[5] or bases > rec[3] or (line.endswith(b"\n") and bases == rec[3] and len(line) != rec[4]):
            raise ValueError(f"{self.path}:{self._lineno}: line length differs inside record {rec[0]!r} "
                             f"(all lines of a record must hold {rec[3]} bases, but the last may be shorter)")
        elif bases < rec[3]:
            rec[5] = True
        rec[1] += bases

    def _close(self) -> None:
        if self._rec is not None:
            name, length, offset, lb, lw, _ = self._rec
            self.entries.append(Contig(name, length, offset, lb or 1, lw or 2))
            self._rec = None


def _read_fai(path: Path) -> list[Contig]:
    contigs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split("\t")
        try:
            if len(parts) != 5:
                raise ValueError
            contigs.append(Contig(parts[0], *map(int, parts[1:])))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: malformed .fai line (expected name, length, offset, "
                             f"linebases, linewidth)") from None
    return contigs


def _read_gzi(path: Path) -> np.ndarray:
    """[(compressed, uncompressed)] block starts, the implicit (0, 0) first block included."""
    raw = np.fromfile(path, dtype="<u8")
    if raw.size == 0 or raw.size != 1 + 2 * int(raw[0]):
        raise ValueError(f"{path}: malformed .gzi index (size does not match its entry count)")
    return np.concatenate([np.zeros((1, 2), dtype=np.uint64), raw[1:].reshape(-1, 2)]).astype(np.int64)


class Fasta:
    """Random access to whole ranges of a plain or BGZF FASTA. Open with ``Fasta(path)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(18)
        except OSError as e:
            raise OSError(e.errno, f"{self.path}: cannot read FASTA: {e.strerror}") from None
        if head[:2] == _GZIP_MAGIC and not _is_bgzf(head):
            raise ValueError(f"{self.path}: gzip-compressed but not BGZF; recompress it with "
                             f"`gunzip -c {self.path.name} | bgzip > NEW.fa.gz` (bgzip is in htslib/tabix)")
        self.bgzf = _is_bgzf(head)
        self.fai_path = Path(f"{self.path}.fai")
        self.gzi_path = Path(f"{self.path}.gzi")
        if not self.fai_path.exists() or (self.bgzf and not self.gzi_path.exists()):
            self._build_indices()
        contigs = _read_fai(self.fai_path)
        self.contigs = {c.name: c for c in contigs}
        self.blocks = _read_gzi(self.gzi_path) if self.bgzf else None

    @property
    def lengths(self) -> dict[str, int]:
        return {name: c.length for name, c in self.contigs.items()}

    def _build_indices(self) -> None:
        for index in (self.fai_path, self.gzi_path) if self.bgzf else (self.fai_path,):
            if not os.access(index.parent, os.W_OK):
                raise OSError(f"{index}: index missing and {index.parent} is not writable; create it with "
                              f"`samtools faidx {self.path}` or point `fasta` at a writable copy")
        builder = _FaiBuilder(self.path)
        starts = []
        with open(self.path, "rb") as f:
            if self.bgzf:
                for data in self._blocks_indexed(f, starts):
                    builder.feed(data)
            else:
                while chunk := f.read(_READ_CHUNK):
                    builder.feed(chunk)
        entries = builder.finish()
        fai = "".join(f"{c.name}\t{c.length}\t{c.offset}\t{c.linebases}\t{c.linewidth}\n" for c in entries)
        write_atomic(self.fai_path, fai.encode())
        if self.bgzf:
            table = np.asarray(starts[1:], dtype="<u8").reshape(-1, 2)  # bgzip omits the first block
            write_atomic(self.gzi_path, np.asarray([len(table)], "<u8").tobytes() + table.tobytes())

    @staticmethod
    def _blocks_indexed(f, starts: list) -> Iterator[bytes]:
        """Decompressed blocks, appending each block's (compressed, uncompressed) start to ``starts``."""
        uoffset = 0
        for coffset, data in _bgzf_blocks(f):
            starts.append((coffset, uoffset))  # every block, the empty EOF block included (as bgzip)
            uoffset += len(data)
            yield data

    def _chunks(self, f, start: int, size: int) -> Iterator[bytes]:
        """The uncompressed bytes [start, start + size) in pieces that stay in cache (BGZF: one per block)."""
        if not self.bgzf:
            f.seek(start)
            while size > 0 and (data := f.read(min(size, _PLAIN_CHUNK))):
                size -= len(data)
                yield data
            return
        cstarts, ustarts = self.blocks[:, 0], self.blocks[:, 1]
        first = int(np.searchsorted(ustarts, start, side="right")) - 1
        last = int(np.searchsorted(ustarts, start + size, side="left"))
        f.seek(int(cstarts[first]))
        end = int(cstarts[last]) if last < len(cstarts) else None
        compressed = f.read(end - int(cstarts[first])) if end is not None else f.read()
        pos, view, skip = 0, memoryview(compressed), start - int(ustarts[first])
        while pos < len(compressed) and size > 0:
            bsize = int.from_bytes(view[pos + 16:pos + 18], "little") + 1
            data = isal_zlib.decompress(view[pos + 18:pos + bsize - 8], -15)
            pos += bsize
            if skip or len(data) > size:
                data = data[skip:skip + size]
                skip = 0
            size -= len(data)
            yield data

    def read(self, name: str, start: int, end: int, table: bytes | None = None) -> np.ndarray:
        """Bytes (uint8, newlines removed) of ``name[start:end]`` (0-based, half-open): the raw ASCII letters, case
        kept, or each byte mapped through the 256-byte ``table`` (``bytes.translate``) in the same pass."""
        c = self.contigs[name]
        if not 0 <= start < end <= c.length:
            raise ValueError(f"{self.path}: range {name}:{start}-{end} outside the contig (length {c.length})")
        # Read from the start of the line holding `start` through the end of the line holding `end - 1`.
        first_line, last_line = start // c.linebases, (end - 1) // c.linebases
        n_lines = last_line - first_line + 1
        read_start = c.offset + first_line * c.linewidth
        # The record's last line may be short and end the file: read only through the record's last base.
        last_base = c.offset + (c.length - 1) // c.linebases * c.linewidth + (c.length - 1) % c.linebases
        wanted = min(n_lines * c.linewidth, last_base + 1 - read_start)
        terminators = b"\n" if c.linewidth == c.linebases + 1 else b"\r\n"
        bases_first = first_line * c.linebases
        out = np.empty(min((last_line + 1) * c.linebases, c.length) - bases_first, np.uint8)
        filled = offset = 0
        with open(self.path, "rb") as f:
            for chunk in self._chunks(f, read_start, wanted):
                # With a stale or foreign index the line ends fall off the terminators: cheap check, one byte per
                # line (the lines before the last). A terminator byte anywhere else makes the result too short.
                line = max(0, -(-(offset - c.linebases) // c.linewidth))  # first line ending here or later
                ends = chunk[line * c.linewidth + c.linebases - offset::c.linewidth][:max(0, n_lines - 1 - line)]
                data = chunk.translate(table, terminators)
                if ends.count(terminators[0]) != len(ends) or filled + len(data) > len(out):
                    raise self._stale(name, start, end)
                out[filled:filled + len(data)] = np.frombuffer(data, np.uint8)
                filled, offset = filled + len(data), offset + len(chunk)
        if offset != wanted:
            raise ValueError(f"{self.path}: truncated: {name}:{start}-{end} runs past the end of the file")
        if filled != len(out):
            raise self._stale(name, start, end)
        skip = start - bases_first
        return out[skip:skip + end - start]

    def _stale(self, name: str, start: int, end: int) -> ValueError:
        return ValueError(f"{self.fai_path}: does not match {self.path.name} at {name}:{start}-{end} "
                          f"(stale index? delete it to rebuild)")
