"""Sharder inputs: FASTA reading/indexing (plain and BGZF) and BED/split parsing, with their one-line errors."""
from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from crossdna.config import ConfigError, from_dict
from sharding.config import ShardConfig
from sharding.fasta import Fasta
from sharding.regions import make_plan, read_bed
from tests.conftest import REPO

DATA = REPO / "crossdna" / "demo" / "data"
FASTA_GZ = DATA / "chr20_slices.fa.gz"
CONTIG = "20_25700000_26400000"


def _plain_records() -> dict[str, str]:
    """The fixture parsed with nothing but gzip, as an independent oracle."""
    records, name = {}, None
    for line in gzip.open(FASTA_GZ, "rt"):
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = []
        else:
            records[name].append(line.strip())
    return {k: "".join(v) for k, v in records.items()}


@pytest.fixture(scope="module")
def records() -> dict[str, str]:
    return _plain_records()


@pytest.fixture
def plain_fasta(tmp_path, records):
    """The fixture as plain FASTA with 70-column CRLF lines (a different line geometry), no index."""
    path = tmp_path / "plain.fa"
    with open(path, "w", newline="") as f:
        for name, seq in records.items():
            f.write(f">{name} description\r\n")
            f.writelines(seq[i:i + 70] + "\r\n" for i in range(0, len(seq), 70))
    return path


def test_bgzf_reads_match_gzip_oracle(records):
    fa = Fasta(FASTA_GZ)
    assert fa.bgzf and fa.lengths == {k: len(v) for k, v in records.items()}
    rng = np.random.default_rng(0)
    for name, seq in records.items():
        for _ in range(20):
            start = int(rng.integers(0, len(seq) - 1))
            end = int(rng.integers(start + 1, min(len(seq), start + 200_000) + 1))
            assert fa.read(name, start, end).tobytes().decode() == seq[start:end]
        assert fa.read(name, 0, len(seq)).tobytes().decode() == seq


def test_plain_fasta_index_built_and_reads_match(plain_fasta, records):
    fa = Fasta(plain_fasta)
    assert (plain_fasta.parent / "plain.fa.fai").read_text().splitlines()[0].split("\t")[1:] == \
        ["700000", f"{len('>20_25700000_26400000 description') + 2}", "70", "72"]
    for name, seq in records.items():
        assert fa.read(name, 12_345, 67_890).tobytes().decode() == seq[12_345:67_890]
        assert fa.read(name, len(seq) - 5, len(seq)).tobytes().decode() == seq[-5:]


@pytest.mark.parametrize("which", ["bgzf", "plain_crlf"])
def test_translating_read_equals_the_raw_read_mapped(which, plain_fasta, records):
    """``read(table=...)`` maps each letter and drops the newlines in one pass per chunk (a BGZF block or 64 kB
    of a plain file): the same bytes as the raw read mapped afterwards, across chunk and line boundaries."""
    fa = Fasta(FASTA_GZ if which == "bgzf" else plain_fasta)
    table = bytes(reversed(range(256)))  # any byte map: here 255 - byte
    rng = np.random.default_rng(1)
    for name, seq in records.items():
        for start, end in [(0, len(seq)), (len(seq) - 1, len(seq)), *rng.integers(0, len(seq), (20, 2))]:
            start, end = int(min(start, end)), int(max(start, end)) + (start == end)
            end = min(end, len(seq))
            assert np.array_equal(fa.read(name, start, end, table), 255 - fa.read(name, start, end))


def test_a_newline_inside_a_line_is_a_stale_index(tmp_path, records):
    path = tmp_path / "t.fa"
    seq = records[CONTIG][:10_000]
    path.write_text(">t\n" + "\n".join(seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n")
    Fasta(path)  # index built for this geometry
    data = bytearray(path.read_bytes())
    data[3 + 61 * 50 + 30] = ord("\n")  # the same size, a terminator in the middle of line 51
    path.write_bytes(bytes(data))
    assert Fasta(path).read("t", 0, 3000).tobytes().decode() == seq[:3000]  # before it: fine
    with pytest.raises(ValueError, match=r"does not match t\.fa at t:0-4000 .*stale index"):
        Fasta(path).read("t", 0, 4000)


def test_bgzf_indices_rebuilt_byte_identical_to_bgzip(tmp_path):
    """The fixture's .gzi was written by `bgzip -i`; the chr20 test below checks the .fai against samtools'."""
    copy = tmp_path / FASTA_GZ.name
    shutil.copy(FASTA_GZ, copy)
    Fasta(copy)  # builds both .fai and .gzi
    assert (tmp_path / f"{copy.name}.fai").read_bytes() == (DATA / f"{FASTA_GZ.name}.fai").read_bytes()
    assert (tmp_path / f"{copy.name}.gzi").read_bytes() == (DATA / f"{FASTA_GZ.name}.gzi").read_bytes()


def test_missing_or_unreadable_fasta_is_named(tmp_path):
    with pytest.raises(OSError, match=r"nope\.fa: cannot read FASTA: No such file"):
        Fasta(tmp_path / "nope.fa")
    (tmp_path / "dir.fa").mkdir()
    with pytest.raises(OSError, match=r"dir\.fa: cannot read FASTA: Is a directory"):
        Fasta(tmp_path / "dir.fa")


def test_gzip_not_bgzf_is_refused(tmp_path, records):
    path = tmp_path / "x.fa.gz"
    with gzip.open(path, "wt") as f:
        f.write(f">a\n{records[CONTIG][:600]}\n")
    with pytest.raises(ValueError, match=r"x\.fa\.gz: gzip-compressed but not BGZF; recompress"):
        Fasta(path)


def test_missing_index_in_readonly_place_is_a_clear_error(tmp_path, plain_fasta, monkeypatch):
    # We run as root in CI, where chmod cannot make a directory unwritable: simulate the check's answer.
    monkeypatch.setattr("sharding.fasta.os.access", lambda path, mode: False)
    with pytest.raises(OSError, match=r"plain\.fa\.fai: index missing and .* is not writable"):
        Fasta(plain_fasta)


def test_inconsistent_line_length_names_file_and_line(tmp_path):
    path = tmp_path / "bad.fa"
    path.write_text(">a\nACGTACGT\nACGTACGTAA\nACG\n")
    with pytest.raises(ValueError, match=r"bad\.fa:3: line length differs inside record 'a'"):
        Fasta(path)


def test_stale_index_is_detected(tmp_path, plain_fasta):
    Fasta(plain_fasta)
    fai = plain_fasta.parent / "plain.fa.fai"
    fai.write_text(fai.read_text().replace("\t70\t72", "\t60\t62", 1))
    with pytest.raises(ValueError, match=r"does not match plain\.fa at .*stale index"):
        Fasta(plain_fasta).read(CONTIG, 0, 10_000)


# ----------------------------------------------------------------------------------------------- BED / splits
LENGTHS = {CONTIG: 700_000, "20_31000000_31700000": 700_000}


@pytest.mark.parametrize("row, message", [
    ("chrA\t1\t2\ttrain", r"b\.bed:2: unknown contig 'chrA'"),
    (f"{CONTIG}\tone\t200\ttrain", r"b\.bed:2: start/end must be integers, got 'one' '200'"),
    (f"{CONTIG}\t10.5\t200\ttrain", r"b\.bed:2: start/end must be integers"),
    (f"{CONTIG}\t300\t200\ttrain", r"b\.bed:2: start 300 >= end 200"),
    (f"{CONTIG}\t200\t200\ttrain", r"b\.bed:2: start 200 >= end 200"),
    (f"{CONTIG}\t-5\t200\ttrain", r"b\.bed:2: negative coordinate -5-200"),
    (f"{CONTIG}\t699000\t700001\ttrain", r"b\.bed:2: interval .* ends past the contig \(length 700000\)"),
    (f"{CONTIG}\t0\t200\ttraining", r"b\.bed:2: unknown split label 'training' \(map it with split_labels\)"),
    (f"{CONTIG}\t0\t200", r"b\.bed:2: expected 4 columns \(chrom start end split\), got 3"),
])
def test_bad_bed_rows_name_file_and_line(tmp_path, row, message):
    bed = tmp_path / "b.bed"
    bed.write_text(f"# header comment\n{row}\n")
    with pytest.raises(ValueError, match=message):
        read_bed(bed, LENGTHS, {})


def test_unknown_fold_label_with_mapping(tmp_path):
    bed = tmp_path / "b.bed"
    bed.write_text(f"{CONTIG}\t0\t5000\tfold0\n{CONTIG}\t0\t5000\tfold9\n")
    with pytest.raises(ValueError, match=r"b\.bed:2: unknown split label 'fold9' \(split_labels knows"):
        read_bed(bed, LENGTHS, {"fold0": "train", "fold3": "test"})


def test_borzoi_bed_folds_map_to_splits():
    """The real Borzoi hg38 BED (gzip) parses with its fold -> split mapping; overlaps merge within a split."""
    from tests.conftest import SHARED_DATA
    bed = SHARED_DATA / "borzoi_folds" / "sequences_human.bed.gz"
    if not bed.exists():
        pytest.skip(f"{bed} not present")
    chroms = {f"chr{c}": 250_000_000 for c in [*range(1, 23), "X", "Y"]}
    labels = {f"fold{i}": "train" for i in range(8)} | {"fold3": "test", "fold4": "valid"}
    rows = read_bed(bed, chroms, labels)
    assert len(rows) == 55_497 and {r.split for r in rows} == {"train", "valid", "test"}
    assert all(r.end - r.start == 196_608 for r in rows)
    cfg = ShardConfig(fasta="unused.fa", bed=str(bed), split_labels=labels)
    plan = make_plan(cfg, chroms)
    merged_bp = sum(r.end - r.start for r in plan.regions)
    assert plan.bed_bp == 55_497 * 196_608 and merged_bp < plan.bed_bp / 3  # rows overlap ~4x
    for a, b in zip(plan.regions, plan.regions[1:]):  # merged regions of one split never overlap
        assert not (a.contig == b.contig and a.split == b.split and b.start <= a.end)


def test_whole_contig_splits_and_pattern():
    cfg = ShardConfig(fasta="x.fa", splits={"valid": ["20_31000000_31700000"]}, contig_pattern=r"20_2\d+_\d+")
    plan = make_plan(cfg, {**LENGTHS, "20_44000000_44600000": 600_000})
    assert [(r.contig, r.split) for r in plan.regions] == [(CONTIG, "train"), ("20_31000000_31700000", "valid")]
    with pytest.raises(ValueError, match=r"splits\.valid: contig 'chr9' is not in the FASTA"):
        make_plan(ShardConfig(fasta="x.fa", splits={"valid": ["chr9"]}), LENGTHS)


@pytest.mark.parametrize("data, message", [
    ({"fasta": "x.fa", "window_length": 0}, "window_length: must be >= 1"),
    ({"fasta": "x.fa", "max_n_fraction": 1.5}, r"max_n_fraction: must be in \[0, 1\]"),
    ({"fasta": "x.fa", "min_tail": 2000}, r"min_tail: must be in \[1, window_length=1024\]"),
    ({"fasta": "x.fa", "splits": {"va/lid": ["a"]}}, "split name 'va/lid'"),
    ({"fasta": "x.fa", "splits": {"valid": ["a"], "test": ["a"]}}, "splits.test: contig 'a' is already in"),
    ({"fasta": "x.fa", "windw_length": 5}, r"unknown field\(s\) \['windw_length'\]"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ShardConfig, data)


def test_bgzip_tool_agrees_when_installed(tmp_path, records):
    """Cross-check our BGZF reader on a file written by the real bgzip (Debian tabix), when it is on PATH."""
    if shutil.which("bgzip") is None:
        pytest.skip("bgzip not installed")
    plain = tmp_path / "t.fa"
    plain.write_text(">t\n" + "\n".join(records[CONTIG][i:i + 50] for i in range(0, 300_000, 50)) + "\n")
    subprocess.run(["bgzip", "-f", str(plain)], check=True)
    assert Fasta(tmp_path / "t.fa.gz").read("t", 1_000, 250_000).tobytes().decode() == records[CONTIG][1_000:250_000]


@pytest.mark.slow
def test_chr20_indices_rebuilt_byte_identical_to_samtools_and_bgzip(tmp_path):
    """The shipped chr20 .fai/.gzi come from the vt-examples package (samtools/bgzip): ours must equal them."""
    from tests.conftest import SHARED_DATA
    source = SHARED_DATA / "human_chr20_grch37" / "20.fa.gz"
    if not source.exists():
        pytest.skip(f"{source} not present")
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    Fasta(copy)
    for suffix in (".fai", ".gzi"):
        assert Path(f"{copy}{suffix}").read_bytes() == Path(f"{source}{suffix}").read_bytes()
