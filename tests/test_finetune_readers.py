"""Task readers on real fixture rows, in every supported layout, and their errors on malformed input."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from crossdna.finetune.readers import TaskDataError, clean_sequence, read_split

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def _rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def test_gue_csv_reads_every_row_with_origin():
    data = read_split(FIXTURES / "gue_tf0" / "train.csv")
    rows = _rows(FIXTURES / "gue_tf0" / "train.csv")
    assert len(data) == len(rows) == 200
    assert data.sequences[7] == rows[7]["sequence"]
    assert data.labels.dtype == np.int64 and data.labels[7] == int(rows[7]["label"])
    assert {len(s) for s in data.sequences} == {101}
    assert data.origin[0].endswith("train.csv:2")  # line 1 is the header


def test_nt_table_filtered_by_task():
    data = read_split(FIXTURES / "nt_mini.tsv", where={"task": "enhancers_types"})
    expected = [r for r in _rows(FIXTURES / "nt_mini.tsv", "\t") if r["task"] == "enhancers_types"]
    assert len(data) == len(expected) == 89
    assert sorted(set(data.labels.tolist())) == [0, 1, 2]
    assert data.sequences == [r["sequence"] for r in expected]


def test_nt_fasta_layout(tmp_path):
    rows = [r for r in _rows(FIXTURES / "nt_mini.tsv", "\t") if r["task"] == "promoter_all"]
    fasta = tmp_path / "promoter_all_train.fna"
    with open(fasta, "w") as fh:
        for r in rows:  # wrap at 60 columns like a real FASTA file
            seq = r["sequence"]
            fh.write(f">{r['name']}\n" + "".join(seq[i:i + 60] + "\n" for i in range(0, len(seq), 60)))
    data = read_split(fasta)
    assert data.sequences == [r["sequence"] for r in rows]
    assert data.labels.tolist() == [int(r["label"]) for r in rows]
    assert data.origin[1] == f"{fasta}:{2 + (300 + 59) // 60}"


def _write_gb_dir(root: Path, rows: list[dict[str, str]], names=("negative", "positive")) -> Path:
    for i, r in enumerate(rows):
        d = root / "train" / names[int(r["label"])]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.txt").write_text(r["sequence"])
    return root / "train"


def test_genomic_benchmarks_directory_layout(tmp_path):
    rows = _rows(FIXTURES / "gb_human_enhancers_cohn.csv")
    data = read_split(_write_gb_dir(tmp_path, rows))
    assert data.class_names == ["negative", "positive"]
    assert len(data) == 100
    by_seq = {r["sequence"]: int(r["label"]) for r in rows}
    assert all(by_seq[s] == y for s, y in zip(data.sequences, data.labels.tolist()))


def test_genomic_benchmarks_csv_form_variable_length():
    data = read_split(FIXTURES / "gb_drosophila_enhancers_stark.csv")
    assert len(data) == 20 and min(map(len, data.sequences)) > 2000


@pytest.mark.parametrize("row,message", [
    ("ACGT,x", "train.csv:3: label label='x' is not a non-negative integer"),
    ("ACGT,-1", "train.csv:3: label label='-1'"),
    (",1", "train.csv:3: empty sequence"),
    ("ACGTR,1", "train.csv:3: invalid letter 'R' at sequence position 5 (set task.letters: to_n"),
    ("ACG-T,1", "train.csv:3: invalid letter '-' at sequence position 4"),
    ("ACGT,1,9", "train.csv:3: 3 fields, header has 2"),
])
def test_malformed_csv_rows_name_file_and_line(tmp_path, row, message):
    good = _rows(FIXTURES / "gue_tf0" / "train.csv")[0]
    path = tmp_path / "train.csv"
    path.write_text(f"sequence,label\n{good['sequence']},{good['label']}\n{row}\n")
    with pytest.raises(TaskDataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_split(path)


def test_letter_policy_to_n_maps_iupac_but_not_symbols():
    assert clean_sequence("acgRyn", "to_n", "x") == "ACGNNN"
    with pytest.raises(TaskDataError, match="x: invalid letter '1'"):
        clean_sequence("ACG1", "to_n", "x")


def test_missing_column_and_empty_filter(tmp_path):
    with pytest.raises(TaskDataError, match=r"nt_mini.tsv:1: missing column\(s\) \['target'\]"):
        read_split(FIXTURES / "nt_mini.tsv", label_columns=["target"])
    with pytest.raises(TaskDataError, match="no rows match"):
        read_split(FIXTURES / "nt_mini.tsv", where={"task": "H3K4me3"})


def test_malformed_fasta_and_gb_dir(tmp_path):
    fa = tmp_path / "t.fa"
    fa.write_text(">chr1:1-5|1\nACGTA\n>chr1:9-13\nACGTA\n")
    with pytest.raises(TaskDataError, match=r"t.fa:3: header 'chr1:9-13' has no '\|label' suffix"):
        read_split(fa)
    fa.write_text(">chr1:1-5|1\n\n")
    with pytest.raises(TaskDataError, match="t.fa:1: empty sequence"):
        read_split(fa)
    rows = _rows(FIXTURES / "gb_human_enhancers_cohn.csv")
    both_classes = [r for r in rows if r["label"] == "0"][:2] + [r for r in rows if r["label"] == "1"][:2]
    split = _write_gb_dir(tmp_path / "gb", both_classes)
    bad = sorted(split.glob("*/*.txt"))[-1]
    bad.write_text("ACGTX")
    with pytest.raises(TaskDataError, match=f"{bad}: invalid letter 'X'"):
        read_split(split)


def test_multilabel_and_regression_tables(tmp_path):
    rows = _rows(FIXTURES / "gue_tf0" / "train.csv")[:5]
    path = tmp_path / "profiles.tsv"
    path.write_text("sequence\tdev\thk\n" + "".join(f"{r['sequence']}\t{i * 0.5}\t{-i}\n" for i, r in enumerate(rows)))
    reg = read_split(path, kind="regression", label_columns=["dev", "hk"])
    assert reg.labels.shape == (5, 2) and reg.labels[3].tolist() == [1.5, -3.0]
    with pytest.raises(TaskDataError, match=r"profiles.tsv:3: multilabel target dev='0.5' must be 0 or 1"):
        read_split(path, kind="multilabel", label_columns=["dev", "hk"])
    with pytest.raises(TaskDataError, match="class labels only"):
        read_split(tmp_path, kind="regression")
