"""Readers for the downstream-task file formats, each returning a validated :class:`TaskData`.

Formats (spec §4.2-4.3; samples in ``shared/data``):

* ``csv``    -- delimited text with a header (``,`` for ``.csv``, tab for ``.tsv``): GUE ``sequence,label``, the CSV
               form of Genomic Benchmarks, the NT ``sequence,name,label,task`` table (select one task with ``where``),
               DeepSEA/DeepSTARR-style tables with several label columns.
* ``gb_dir`` -- the Genomic Benchmarks directory layout ``<split>/<class>/*.txt``, one sequence per file; the label is
               the index of the class directory in sorted order (as the ``genomic_benchmarks`` package assigns it).
* ``fasta``  -- NT task FASTA, ``>name|label`` headers (the label is the text after the last ``|``).

Every row is checked as it is read; a bad one raises :class:`TaskDataError` naming the file and line (or file), so a
broken download fails before training starts, not as a silent N-run or a label off by one.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Sequence

import numpy as np

TaskKind = Literal["multiclass", "multilabel", "regression"]
LetterPolicy = Literal["error", "to_n"]
Format = Literal["auto", "csv", "gb_dir", "fasta"]

_FASTA_SUFFIXES = (".fa", ".fna", ".fasta")
_NON_ACGTN = re.compile(r"[^ACGTN]")
_NON_LETTER = re.compile(r"[^A-Z]")


class TaskDataError(ValueError):
    """A task file that cannot be read as declared; the message names the file and line."""


@dataclass
class TaskData:
    """One split of a task: upper-case sequences and their labels.

    ``labels`` is int64 ``[N]`` for multiclass, float32 ``[N, K]`` for multilabel (0/1) and regression.
    ``origin[i]`` is ``"file:line"`` (or the file path for ``gb_dir``) of row ``i``, for error messages downstream.
    """

    sequences: list[str]
    labels: np.ndarray
    origin: list[str]
    kind: TaskKind
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, index: np.ndarray) -> "TaskData":
        return TaskData([self.sequences[i] for i in index], self.labels[index], [self.origin[i] for i in index],
                        self.kind, self.class_names)


def clean_sequence(raw: str, letters: LetterPolicy, where: str) -> str:
    """Upper-case ``raw`` and apply the letter policy: ``error`` rejects anything but ACGTN; ``to_n`` maps other
    letters (IUPAC ambiguity codes) to N. Non-letters (digits, ``-``, ``*``) are always an error: they mean a wrong
    column or a gapped alignment, not sequence."""
    seq = raw.strip().upper()
    if not seq:
        raise TaskDataError(f"{where}: empty sequence")
    if letters == "to_n":
        bad = _NON_LETTER.search(seq)
        if bad is None:
            return _NON_ACGTN.sub("N", seq)
    else:
        bad = _NON_ACGTN.search(seq)
        if bad is None:
            return seq
    hint = "" if letters == "to_n" or not bad.group().isalpha() else " (set task.letters: to_n to read it as N)"
    raise TaskDataError(f"{where}: invalid letter {bad.group()!r} at sequence position {bad.start() + 1}{hint}")


def _parse_labels(values: Sequence[str], kind: TaskKind, where: str, columns: Sequence[str]) -> int | list[float]:
    if kind == "multiclass":
        text = values[0].strip()
        if not re.fullmatch(r"\d+", text):
            raise TaskDataError(f"{where}: label {columns[0]}={text!r} is not a non-negative integer class index")
        return int(text)
    out = []
    for col, text in zip(columns, values):
        try:
            v = float(text)
        except ValueError:
            raise TaskDataError(f"{where}: label {col}={text.strip()!r} is not a number") from None
        if not math.isfinite(v):
            raise TaskDataError(f"{where}: label {col}={text.strip()!r} is not finite")
        if kind == "multilabel" and v not in (0.0, 1.0):
            raise TaskDataError(f"{where}: multilabel target {col}={text.strip()!r} must be 0 or 1")
        out.append(v)
    return out


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="ascii", newline="")
        return open(path, encoding="ascii", newline="")
    except OSError as e:
        raise TaskDataError(f"{path}: cannot open: {e.strerror}") from e


def _finish(path: Path, seqs: list[str], labels: list, origin: list[str], kind: TaskKind,
            class_names: list[str] | None = None) -> TaskData:
    if not seqs:
        raise TaskDataError(f"{path}: no rows")
    if kind == "multiclass":
        arr = np.asarray(labels, dtype=np.int64)
    else:
        arr = np.asarray(labels, dtype=np.float32).reshape(len(seqs), -1)
    return TaskData(seqs, arr, origin, kind, class_names)


def _delimiter(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "\t" if name.endswith(".tsv") else ","


def read_csv(path: str | Path, kind: TaskKind = "multiclass", sequence_column: str = "sequence",
             label_columns: Sequence[str] = ("label",), where: Mapping[str, str] | None = None,
             letters: LetterPolicy = "error") -> TaskData:
    """Delimited table with a header row; ``where`` keeps only rows whose columns equal the given values."""
    path = Path(path)
    where = dict(where or {})
    seqs, labels, origin = [], [], []
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=_delimiter(path))
        try:
            header = next(reader)
        except StopIteration:
            raise TaskDataError(f"{path}: empty file") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise TaskDataError(f"{path}:1: unreadable header: {e}") from None
        header = [h.strip() for h in header]
        needed = [sequence_column, *label_columns, *where]
        missing = [c for c in needed if c not in header]
        if missing:
            raise TaskDataError(f"{path}:1: missing column(s) {missing}; header has {header}")
        col = {name: header.index(name) for name in needed}
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                at = f"{path}:{line}"
                if not row:
                    continue
                if len(row) != len(header):
                    raise TaskDataError(f"{at}: {len(row)} fields, header has {len(header)}")
                if any(row[col[k]] != v for k, v in where.items()):
                    continue
                seqs.append(clean_sequence(row[col[sequence_column]], letters, at))
                labels.append(_parse_labels([row[col[c]] for c in label_columns], kind, at, label_columns))
                origin.append(at)
        except (csv.Error, UnicodeDecodeError) as e:
            raise TaskDataError(f"{path}:{line + 1}: unreadable row: {e}") from None
    if not seqs and where:
        raise TaskDataError(f"{path}: no rows match {where}")
    return _finish(path, seqs, labels, origin, kind)


def fasta_records(path: Path) -> Iterator[tuple[int, str, str]]:
    """(header line number, header text, joined sequence) per record."""
    header, start, chunks = None, 0, []
    with _open_text(path) as fh:
        try:
            for lineno, text in enumerate(fh, 1):
                text = text.rstrip("\r\n")
                if text.startswith(">"):
                    if header is not None:
                        yield start, header, "".join(chunks)
                    header, start, chunks = text[1:].strip(), lineno, []
                elif header is None:
                    if text.strip():
                        raise TaskDataError(f"{path}:{lineno}: sequence before the first '>' header")
                else:
                    chunks.append(text.strip())
        except UnicodeDecodeError as e:
            raise TaskDataError(f"{path}: not ASCII text: {e}") from None
    if header is not None:
        yield start, header, "".join(chunks)


def read_fasta(path: str | Path, letters: LetterPolicy = "error") -> TaskData:
    """NT-style FASTA: ``>name|label`` headers, multiclass labels."""
    path = Path(path)
    seqs, labels, origin = [], [], []
    for lineno, header, seq in fasta_records(path):
        at = f"{path}:{lineno}"
        if "|" not in header:
            raise TaskDataError(f"{at}: header {header!r} has no '|label' suffix")
        seqs.append(clean_sequence(seq, letters, at))
        labels.append(_parse_labels([header.rsplit("|", 1)[1]], "multiclass", at, ["label"]))
        origin.append(at)
    return _finish(path, seqs, labels, origin, "multiclass")


def read_gb_dir(split_dir: str | Path, letters: LetterPolicy = "error") -> TaskData:
    """Genomic Benchmarks ``<split>/<class>/*.txt``; labels are sorted class-directory indices."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise TaskDataError(f"{split_dir}: not a directory (expected <split>/<class>/*.txt)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise TaskDataError(f"{split_dir}: found class directories {classes}; need at least two")
    seqs, labels, origin = [], [], []
    for label, name in enumerate(classes):
        files = sorted((split_dir / name).glob("*.txt"))
        if not files:
            raise TaskDataError(f"{split_dir / name}: no *.txt sequence files")
        for f in files:
            try:
                text = f.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as e:
                raise TaskDataError(f"{f}: cannot read: {e}") from None
            lines = [t for t in text.split() if t]
            if len(lines) > 1:
                raise TaskDataError(f"{f}: {len(lines)} lines; Genomic Benchmarks files hold one sequence")
            seqs.append(clean_sequence(lines[0] if lines else "", letters, str(f)))
            labels.append(label)
            origin.append(str(f))
    return _finish(split_dir, seqs, labels, origin, "multiclass", classes)


def detect_format(path: Path) -> Format:
    if path.is_dir():
        return "gb_dir"
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(_FASTA_SUFFIXES):
        return "fasta"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    raise TaskDataError(f"{path}: cannot tell the format from the name; set task.format (csv, gb_dir, fasta)")


def read_split(path: str | Path, fmt: Format = "auto", kind: TaskKind = "multiclass", sequence_column: str = "sequence",
               label_columns: Sequence[str] = ("label",), where: Mapping[str, str] | None = None,
               letters: LetterPolicy = "error") -> TaskData:
    """Read one split in any supported format (``auto`` decides from the path)."""
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt != "csv" and kind != "multiclass":
        raise TaskDataError(f"{path}: {fmt} files carry class labels only; {kind} targets need a csv table")
    if fmt == "csv":
        return read_csv(path, kind, sequence_column, label_columns, where, letters)
    if where:
        raise TaskDataError(f"{path}: 'where' filters apply to csv tables only")
    if fmt == "fasta":
        return read_fasta(path, letters)
    return read_gb_dir(path, letters)
