"""``crossdna shard verify`` / ``stats``: recheck every shard against the manifest; summarise the build."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from sharding.manifest import load_manifest
from sharding.tarwrite import KEY_DIGITS


def _check_members(data: bytes, first_index: int, samples: int, length: int) -> str | None:
    """None if the tar holds exactly the expected samples in order, else what is wrong."""
    index = first_index
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = tf.getmembers()
        if len(members) != 2 * samples:
            return f"{len(members) // 2} samples in the tar, manifest says {samples}"
        for seq_member, json_member in zip(members[::2], members[1::2]):
            key = f"{index:0{KEY_DIGITS}d}"
            if (seq_member.name, json_member.name) != (f"{key}.seq", f"{key}.json"):
                return f"members {seq_member.name}, {json_member.name}: expected key {key}"
            seq = np.frombuffer(tf.extractfile(seq_member).read(), np.uint8)
            if seq.size != length or seq.max(initial=0) > 4:
                return f"{seq_member.name}: expected {length} token ids in 0..4"
            meta = json.loads(tf.extractfile(json_member).read())
            if meta.get("index") != index or meta.get("strand") != "+":
                return f"{json_member.name}: index/strand do not match the key"
            index += 1
    return None


def verify(out_dir: str | Path) -> tuple[int, list[str]]:
    """(shards checked, problems): each problem names the shard. Reads every byte of every shard."""
    out = Path(out_dir)
    manifest = load_manifest(out)
    problems, checked = [], 0
    for split in manifest["splits"].values():
        first = 0
        for shard in split["shards"]:
            path = out / shard["path"]
            checked += 1
            try:
                data = path.read_bytes()
            except OSError as e:
                problems.append(f"{path}: cannot read: {e.strerror}")
            else:
                if len(data) != shard["bytes"]:
                    problems.append(f"{path}: {len(data)} bytes, manifest says {shard['bytes']}")
                elif hashlib.sha256(data).hexdigest() != shard["sha256"]:
                    problems.append(f"{path}: sha256 mismatch")
                elif (why := _check_members(data, first, shard["samples"], manifest["window_length"])):
                    problems.append(f"{path}: {why}")
            first += shard["samples"]
    return checked, problems


def summary(out_dir: str | Path) -> str:
    m = load_manifest(out_dir)
    st = m["stats"]
    lines = [f"source    {m['source']['fasta']} (sha256 {m['source']['sha256'][:12]}…, "
             f"{len(m['source']['contigs'])} contigs, {sum(m['source']['contigs'].values()):,} bp)"]
    if m["bed"]:
        lines.append(f"bed       {m['bed']['name']} ({st.get('bed_rows', 0):,} rows, {st.get('bed_bp', 0):,} bp; "
                     f"{st['regions']:,} regions after merging; "
                     f"{st['cross_split_overlap_bp']:,} bp shared by two splits)")
    lines.append(f"windows   L={m['window_length']} stride={m['params']['stride']}: {st['windows_kept']:,} kept of "
                 f"{st['windows_candidate']:,} (dropped: " +
                 ", ".join(f"{k} {v:,}" for k, v in st["dropped"].items()) + ")")
    gc = f"{st['gc_content']:.4f}" if st["gc_content"] is not None else "n/a"
    lines.append(f"bases     {st['bp_covered']:,} covered of {st['bp_input']:,} input ({st['coverage']:.2%}); "
                 f"GC {gc}; N in input {st['n_bases_input']:,}; non-ACGTN letters {st['non_acgtn_letters']:,}")
    for name, split in m["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        lines.append(f"split     {name:<8} {split['samples']:>12,} samples {len(split['shards']):>7,} shards "
                     f"{size / 2**20:>10,.1f} MiB")
    hist, edges = st["n_fraction_hist"], st["n_fraction_hist_edges"]
    top = max(hist) or 1
    lines.append("N fraction of candidate windows:")
    for count, lo, hi in zip(hist, edges, edges[1:]):
        if count:
            lines.append(f"  [{lo:.2f}, {hi:.2f}{']' if hi == 1 else ')'} {count:>12,} {'#' * round(40 * count / top)}")
    return "\n".join(lines)
