"""build_shards / extract_part / merge on the real chr20 fixture: contract, content, shuffle, determinism,
parameter guard, resume after a full disk, verify, CLI."""
from __future__ import annotations

import errno
import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from crossdna import tokens
from crossdna.cli import main as cli
from crossdna.config import load
from sharding.build import build_shards, extract_part, merge
from sharding.config import ShardConfig
from sharding.manifest import ManifestError, load_manifest, manifest_hash
from sharding.verify import verify
from tests.conftest import REPO

DATA = REPO / "crossdna" / "demo" / "data"
FASTA_GZ = DATA / "chr20_slices.fa.gz"
DEMO = REPO / "configs" / "shard" / "demo.yaml"
A, B, C = "20_25700000_26400000", "20_31000000_31700000", "20_44000000_44600000"


def demo_cfg(*overrides: str) -> ShardConfig:
    return load(ShardConfig, DEMO, [f"fasta={FASTA_GZ}", f"bed={DATA / 'chr20_slices.folds.bed'}",
                                    "samples_per_shard=64", *overrides])


def contig_cfg(**kw) -> ShardConfig:
    return ShardConfig(fasta=str(FASTA_GZ), splits={"valid": [B]}, **kw)


@pytest.fixture(scope="module")
def records() -> dict[str, str]:
    out, name = {}, None
    for line in gzip.open(FASTA_GZ, "rt"):
        if line.startswith(">"):
            name = line[1:].split()[0]
            out[name] = []
        else:
            out[name].append(line.strip())
    return {k: "".join(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The demo config (fold BED, Borzoi split mapping), 64 samples per shard, built in-process."""
    return build_shards(demo_cfg(), tmp_path_factory.mktemp("ref"), workers=1, progress=False).parent


def read_split(out: Path, manifest: dict, split: str) -> list[tuple[str, bytes, dict]]:
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["path"]) as tf:
            members = tf.getmembers()
            for seq_m, json_m in zip(members[::2], members[1::2]):
                samples.append((seq_m.name, tf.extractfile(seq_m).read(), json.loads(tf.extractfile(json_m).read())))
    return samples


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_contract_and_content_match_the_genome(tmp_path, records):
    """Whole-contig mode with tails: every window is where its JSON says, N-padded tails, exact drop counts."""
    L, min_tail = 1536, 1000
    cfg = contig_cfg(window_length=L, min_tail=min_tail, samples_per_shard=100)
    m = load_manifest(build_shards(cfg, tmp_path, workers=1, progress=False))
    expected, dropped = {}, {"n_fraction": 0, "short_tail": 0}
    for name, seq in records.items():
        for start in range(0, len(seq), L):
            real = seq[start:start + L]
            n_frac = sum(ch not in "ACGT" for ch in real) / len(real)
            if len(real) < min_tail:
                dropped["short_tail"] += 1
            elif n_frac > cfg.max_n_fraction:
                dropped["n_fraction"] += 1
            else:
                expected[(name, start)] = ("valid" if name == B else "train", real)
    assert m["stats"]["dropped"] == dropped and dropped["short_tail"] == 1 and dropped["n_fraction"] > 50
    assert m["window_length"] == L and m["source"]["contigs"] == {k: len(v) for k, v in records.items()}
    seen = {}
    for split, info in m["splits"].items():
        shards = info["shards"]
        assert [s["samples"] for s in shards[:-1]] == [100] * (len(shards) - 1) and 0 < shards[-1]["samples"] <= 100
        assert [s["path"] for s in shards] == [f"{split}/shard-{k:06d}.tar" for k in range(len(shards))]
        samples = read_split(tmp_path, m, split)
        assert len(samples) == info["samples"]
        for index, (name, seq, meta) in enumerate(samples):
            assert name == f"{index:012d}.seq" and meta["index"] == index
            assert set(meta) == {"chrom", "start", "end", "strand", "interval", "index"}
            assert meta["strand"] == "+" and meta["interval"] is None
            want_split, real = expected[(meta["chrom"], meta["start"])]
            assert want_split == split and meta["end"] == meta["start"] + len(real)
            padded = np.concatenate([tokens.encode(real), np.full(L - len(real), tokens.N, np.uint8)])
            assert np.array_equal(np.frombuffer(seq, np.uint8), padded)
            seen[(meta["chrom"], meta["start"])] = split
    assert set(seen) == set(expected)  # every kept window exactly once (dict keys), nothing else


def test_bed_mode_windows_stay_inside_their_split_intervals(reference):
    m = load_manifest(reference)
    assert set(m["splits"]) == {"train", "valid", "test"}
    bed = [line.split() for line in (DATA / "chr20_slices.folds.bed").read_text().splitlines()]
    labels = {f"fold{i}": "train" for i in range(8)} | {"fold3": "test", "fold4": "valid"}
    for split in m["splits"]:
        for _, _, meta in read_split(reference, m, split):
            chrom, lo, hi = meta["interval"]
            assert meta["chrom"] == chrom and lo <= meta["start"] < meta["end"] <= hi
            assert any(r[0] == chrom and int(r[1]) < meta["end"] and meta["start"] < int(r[2])
                       and labels[r[3]] == split for r in bed)
    st = m["stats"]
    assert st["bed_rows"] == len(bed) and st["bp_input"] < st["bed_bp"]  # overlapping rows merged
    assert st["windows_kept"] == sum(s["samples"] for s in m["splits"].values())
    assert 0.35 < st["gc_content"] < 0.55 and st["dropped"]["n_fraction"] > 0  # record A ends in the centromere


def test_shuffle_is_global_and_seeded(reference, tmp_path):
    m = load_manifest(reference)
    train = [meta for _, _, meta in read_split(reference, m, "train")]
    source_order = sorted(range(len(train)), key=lambda i: ([A, B, C].index(train[i]["chrom"]), train[i]["start"]))
    rank = np.argsort(source_order)
    # Not sorted, not blockwise: the first shard draws from all three contigs and the rank correlation is ~0.
    assert {meta["chrom"] for meta in train[:64]} == {A, B, C}
    assert abs(np.corrcoef(np.arange(len(rank)), rank)[0, 1]) < 0.1
    other = load_manifest(build_shards(demo_cfg("seed=1"), tmp_path, workers=1, progress=False))
    train_other = [meta for _, _, meta in read_split(tmp_path, other, "train")]
    key = lambda meta: (meta["chrom"], meta["start"])  # noqa: E731
    assert sorted(map(key, train_other)) == sorted(map(key, train))
    assert list(map(key, train_other)) != list(map(key, train))


@pytest.mark.slow
def test_byte_identical_across_runs_workers_and_task_cuts(reference, tmp_path, monkeypatch):
    """Two workers and 100-kbp tasks (another cut into tasks) give the very same bytes, manifest included."""
    monkeypatch.setattr("sharding.regions.TASK_BP", 100_000)
    out = build_shards(demo_cfg(), tmp_path, workers=2, progress=False).parent
    assert tree_bytes(out) == tree_bytes(reference)
    assert not (out / ".work").exists()


def test_slurm_parts_then_merge_equal_build(reference, tmp_path, monkeypatch):
    monkeypatch.setattr("sharding.regions.TASK_BP", 150_000)
    cfg = demo_cfg()
    assert extract_part(cfg, tmp_path, 0, 3, workers=1, progress=False) > 0
    assert extract_part(cfg, tmp_path, 2, 3, workers=1, progress=False) > 0
    missing = r"extraction tasks not done: 1 \(20_25700000_26400000\), 4 .*part = task % num_parts"
    with pytest.raises(ValueError, match=missing):
        merge(tmp_path, workers=1, progress=False)
    extract_part(cfg, tmp_path, 1, 3, workers=1, progress=False)
    assert extract_part(cfg, tmp_path, 1, 3, workers=1, progress=False) == 0  # done tasks are skipped
    merge(tmp_path, workers=1, progress=False)
    assert tree_bytes(tmp_path) == tree_bytes(reference)


def test_other_parameters_refused_unless_overwrite(reference, tmp_path):
    out = build_shards(demo_cfg(), tmp_path, workers=1, progress=False).parent
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert build_shards(demo_cfg(), out, workers=1, progress=False).stat().st_mtime_ns == mtime  # complete: no-op
    other = r"holds shards built with other parameters .*params\.window_length: 1024 -> 512.*--overwrite"
    with pytest.raises(ValueError, match=other):
        build_shards(demo_cfg("window_length=512"), out, workers=1, progress=False)
    m = load_manifest(build_shards(demo_cfg("window_length=512"), out, workers=1, overwrite=True, progress=False))
    assert m["window_length"] == 512 and verify(out) == (len(list(out.glob("*/shard-*.tar"))), [])
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a shard directory"):
        build_shards(demo_cfg(), stranger, workers=1, progress=False)


class _FillingDisk:
    """``open`` whose shard files hit ENOSPC after ``budget`` bytes in total: a disk that fills mid-shard."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if ".tar.tmp" not in str(path):
            return f
        disk, real_write = self, f.write

        def write(data):
            disk.budget -= len(data)
            if disk.budget < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(data)
        f.write = write
        return f


def test_disk_full_mid_shard_lists_nothing_incomplete_then_resumes(reference, tmp_path, monkeypatch):
    monkeypatch.setattr("crossdna.fileio._CHUNK", 4096)  # several writes per shard, so it fails mid-shard
    monkeypatch.setattr("crossdna.fileio.open", _FillingDisk(budget=5 * 160_000 + 70_000), raising=False)
    with pytest.raises(OSError, match=r"shard-0000\d\d\.tar: No space left on device"):
        build_shards(demo_cfg(), tmp_path, workers=1, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))  # the torn temp file is gone
    record_files = sorted((tmp_path / ".work" / "shards").glob("*.json"))
    records = [json.loads(p.read_text()) for p in record_files]
    assert 0 < len(records) < 30
    for record in records:  # every shard listed as complete is complete
        assert (tmp_path / record["path"]).read_bytes() == (reference / record["path"]).read_bytes()
    record_files[0].write_bytes(b"")  # records are not fsynced: a crash may leave one empty (that shard is redone)
    monkeypatch.undo()
    build_shards(demo_cfg(), tmp_path, workers=1, progress=False)
    assert tree_bytes(tmp_path) == tree_bytes(reference)


def test_spill_lost_in_a_crash_is_caught_at_merge(reference, tmp_path):
    """Spills are not fsynced; a merge in another process checks them against the CRC-32s in their markers."""
    extract_part(demo_cfg(), tmp_path, workers=1, progress=False)
    spill = sorted((tmp_path / ".work").glob("task-*.train.seq"))[0]
    data = bytearray(spill.read_bytes())
    data[1000] ^= 1  # the right size, other bytes: what a crash can leave of a file that was not written back
    spill.write_bytes(bytes(data))
    marker = spill.name.split(".")[0] + ".json"
    with pytest.raises(ValueError, match=rf"{spill.name}: content does not match its marker .*delete {marker}"):
        merge(tmp_path, workers=1, progress=False)
    (tmp_path / ".work" / marker).unlink()
    extract_part(demo_cfg(), tmp_path, workers=1, progress=False)  # redoes that task only
    merge(tmp_path, workers=2, progress=False)
    assert tree_bytes(tmp_path) == tree_bytes(reference)


def test_zero_windows_is_an_error(tmp_path):
    bed = tmp_path / "gap.bed"
    bed.write_text(f"{A}\t620000\t700000\ttrain\n")  # inside the chr20 centromere gap: all N
    with pytest.raises(ValueError, match=r"no windows produced: 79 candidate windows, dropped .*'n_fraction': 79"):
        build_shards(ShardConfig(fasta=str(FASTA_GZ), bed=str(bed)), tmp_path / "out", workers=1, progress=False)


def test_overlapping_stride_counts_coverage_once(tmp_path, records):
    bed = tmp_path / "one.bed"
    bed.write_text(f"{B}\t1000\t21500\ttrain\n")
    cfg = ShardConfig(fasta=str(FASTA_GZ), bed=str(bed), window_length=1024, stride=512, min_tail=300,
                      samples_per_shard=7)
    m = load_manifest(build_shards(cfg, tmp_path / "out", workers=1, progress=False))
    starts = sorted(meta["start"] for _, _, meta in read_split(tmp_path / "out", m, "train"))
    # 20,500 bp: full windows at 1000 + 512k for k < 39, then a 468-bp tail at 1000 + 39*512 (padded).
    assert starts == [1000 + 512 * k for k in range(40)]
    assert m["stats"]["bp_covered"] == m["stats"]["bp_input"] == 20_500
    assert m["splits"]["train"]["shards"][-1]["samples"] == 40 % 7


def test_verify_names_the_bad_shard(reference, tmp_path, capsys):
    out = tmp_path / "copy"
    for rel, data in tree_bytes(reference).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    assert verify(out) == (len(list(out.glob("*/shard-*.tar"))), [])
    bad = out / "train" / "shard-000003.tar"
    data = bytearray(bad.read_bytes())
    data[600] ^= 1
    bad.write_bytes(bytes(data))
    checked, problems = verify(out)
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: sha256 mismatch")
    assert cli(["shard", "verify", str(out)]) == 1
    assert f"BAD {bad}: sha256 mismatch" in capsys.readouterr().err


def test_manifest_validation_names_the_field(reference, tmp_path):
    m = load_manifest(reference)
    assert manifest_hash(m) == manifest_hash(json.loads((reference / "manifest.json").read_text()))
    broken = json.loads(json.dumps(m))
    broken["splits"]["train"]["shards"][0]["samples"] = 63
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ManifestError, match=r"splits\.train\.shards\[0\]\.samples: 63: every shard but the last"):
        load_manifest(tmp_path)
    broken = json.loads(json.dumps(m)) | {"format_version": 2}
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ManifestError, match=r"manifest\.json: format_version: 2 is not supported"):
        load_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{\n  oops")
    with pytest.raises(ManifestError, match=r"manifest\.json:2: invalid JSON"):
        load_manifest(tmp_path)


def test_cli_build_stats_and_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo config's paths are relative to the repository root
    out = tmp_path / "cli"
    assert cli(["shard", "build", "--config", str(DEMO), "--out", str(out), "--workers", "1", "--quiet",
                "samples_per_shard=500"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "manifest.json")
    assert cli(["shard", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1,837 kept of 1,872" in text and "split     train" in text
    bed = tmp_path / "b.bed"
    bed.write_text(f"{A}\t10\tx\ttrain\n")
    assert cli(["shard", "build", "--config", str(DEMO), "--out", str(tmp_path / "o2"), "--quiet",
                f"bed={bed}", "split_labels={}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("crossdna shard: error: ") and f"{bed}:1: start/end" in err


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path, python_exe):
    """A real SIGKILL of ``crossdna shard build`` while it writes shards; the rerun resumes to the same bytes."""
    import os
    import signal
    import subprocess
    import time

    overrides = [f"fasta={FASTA_GZ}", f"bed={DATA / 'chr20_slices.folds.bed'}", "samples_per_shard=16"]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([python_exe, "-m", "crossdna.cli", "shard", "build", "--config", str(DEMO),
                             "--out", str(out), "--workers", "1", "--quiet", *overrides], env=env)
    records = out / ".work" / "shards"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(records.glob("*.json"))) >= 10:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()
    done = [json.loads(p.read_text()) for p in records.glob("*.json")]
    shards = list(out.glob("*/shard-*.tar"))
    assert 10 <= len(done) <= len(shards) < 115  # 1,837 samples / 16 per shard = 115 shards
    cfg = load(ShardConfig, DEMO, overrides)
    build_shards(cfg, out, workers=1, progress=False)
    clean = build_shards(cfg, tmp_path / "clean", workers=1, progress=False).parent
    assert tree_bytes(out) == tree_bytes(clean)


FAKE_SBATCH = r"""#!/usr/bin/env bash
# Stand-in for sbatch: runs the submitted script at once (array tasks one after another), prints a job id.
set -euo pipefail
array="" script=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --array=*) array=${1#--array=} ;;
        --*) ;;
        *) script=$1; shift; break ;;
    esac
    shift
done
echo "$script $*" >> "$FAKE_SBATCH_LOG"
if [[ -n "${FAKE_SBATCH_DRY:-}" ]]; then
    :
elif [[ -n "$array" ]]; then
    for ((i = ${array%-*}; i <= ${array#*-}; i++)); do
        SLURM_ARRAY_TASK_ID=$i SLURM_CPUS_PER_TASK=1 bash "$script" "$@" > /dev/null 2>&1
    done
else
    SLURM_CPUS_PER_TASK=1 bash "$script" "$@" > /dev/null 2>&1
fi
echo "4242;cluster"
"""


@pytest.mark.slow
def test_slurm_script_array_then_merge_equals_build(reference, tmp_path, python_exe):
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "out dir"  # a space: the script must quote
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "CROSSDNA": f"{python_exe} -m crossdna.cli", "FAKE_SBATCH_LOG": str(tmp_path / "sbatch.log")}
    overrides = [f"fasta={FASTA_GZ}", f"bed={DATA / 'chr20_slices.folds.bed'}", "samples_per_shard=64"]
    run = subprocess.run(["bash", str(REPO / "slurm" / "shard.sh"), str(DEMO), str(out), "2", *overrides],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "array job 4242 (2 parts); merge: job 4242" in run.stdout
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls[0].endswith(f"extract {DEMO} {out} 2 {' '.join(overrides)}") and calls[1].endswith(f"merge {out}")
    assert tree_bytes(out) == tree_bytes(reference) and (tmp_path / "out dir-logs").is_dir()


def test_slurm_script_parts_is_optional(tmp_path):
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SBATCH_DRY": "1",
           "FAKE_SBATCH_LOG": str(tmp_path / "sbatch.log")}
    run = subprocess.run(["bash", str(REPO / "slurm" / "shard.sh"), str(DEMO), str(out), "window_length=512"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls[0].endswith(f"extract {DEMO} {out} 8 window_length=512")
    bad = subprocess.run(["bash", str(REPO / "slurm" / "shard.sh"), str(DEMO), str(out), "zero"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PARTS must be a positive integer, got zero" in bad.stderr


def test_slurm_script_is_shellcheck_clean():
    import shutil
    import subprocess
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    run = subprocess.run(["shellcheck", str(REPO / "slurm" / "shard.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_soft_masked_and_iupac_letters(tmp_path, records):
    """Real chr20 bases, soft-masked (lower case) in part and with two IUPAC codes, as hg38 has at places."""
    seq = list(records[B][:5000])
    seq[100:200] = [ch.lower() for ch in seq[100:200]]
    seq[300], seq[301] = "R", "y"
    fasta = tmp_path / "masked.fa"
    fasta.write_text(">m\n" + "\n".join("".join(seq[i:i + 80]) for i in range(0, 5000, 80)) + "\n")
    cfg = ShardConfig(fasta=str(fasta), window_length=1000, samples_per_shard=10)
    m = load_manifest(build_shards(cfg, tmp_path / "out", workers=1, progress=False))
    assert m["stats"]["non_acgtn_letters"] == 2 and m["stats"]["n_bases_input"] == 2
    first = next(s for _, s, meta in read_split(tmp_path / "out", m, "train") if meta["start"] == 0)
    ids = np.frombuffer(first, np.uint8)
    assert ids[300] == ids[301] == tokens.N
    assert np.array_equal(ids[100:200], tokens.encode(records[B][100:200]))
