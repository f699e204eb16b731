"""``manifest.json``: the contract between the sharder and the loader, validated on every load."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from sharding import FORMAT_VERSION

MANIFEST = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that does not satisfy the shard format contract (the message names file and field)."""


def manifest_hash(manifest: dict) -> str:
    """sha256 of the canonical JSON of the whole manifest: the data identity stored in checkpoints/runs."""
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()


def _require(cond: bool, path: Path, field: str, problem: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {field}: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(manifest: Any, path: Path) -> dict:
    _require(isinstance(manifest, dict), path, "<top>", "must be a JSON object")
    for key in ("format_version", "sharder_version", "window_length", "samples_per_shard", "source", "bed",
                "params", "splits", "stats"):
        _require(key in manifest, path, key, "missing")
    _require(manifest["format_version"] == FORMAT_VERSION, path, "format_version",
             f"{manifest['format_version']!r} is not supported (this reader knows {FORMAT_VERSION})")
    length, per_shard = manifest["window_length"], manifest["samples_per_shard"]
    _require(_is_int(length) and length > 0, path, "window_length", f"must be a positive integer, got {length!r}")
    _require(_is_int(per_shard) and per_shard > 0, path, "samples_per_shard",
             f"must be a positive integer, got {per_shard!r}")
    source = manifest["source"]
    _require(isinstance(source, dict) and {"fasta", "sha256", "contigs"} <= set(source), path, "source",
             "must hold fasta, sha256, contigs")
    _require(isinstance(manifest["bed"], (dict, type(None))), path, "bed", "must be an object or null")
    splits = manifest["splits"]
    _require(isinstance(splits, dict) and splits, path, "splits", "must be a non-empty object")
    for name, split in splits.items():
        where = f"splits.{name}"
        _require(isinstance(split, dict) and {"samples", "shards"} <= set(split), path, where,
                 "must hold samples and shards")
        shards = split["shards"]
        _require(isinstance(shards, list) and shards, path, f"{where}.shards", "must be a non-empty list")
        total = 0
        for i, shard in enumerate(shards):
            field = f"{where}.shards[{i}]"
            _require(isinstance(shard, dict) and {"path", "samples", "bytes", "sha256"} <= set(shard), path,
                     field, "must hold path, samples, bytes, sha256")
            rel = PurePosixPath(str(shard["path"]))
            _require(not rel.is_absolute() and ".." not in rel.parts and rel.parts[:1] == (name,), path,
                     f"{field}.path", f"{shard['path']!r} must be relative, inside {name}/")
            n = shard["samples"]
            expected_full = i < len(shards) - 1
            _require(_is_int(n) and (n == per_shard if expected_full else 0 < n <= per_shard), path,
                     f"{field}.samples", f"{n!r}: every shard but the last holds samples_per_shard={per_shard}")
            _require(_is_int(shard["bytes"]) and shard["bytes"] > 0, path, f"{field}.bytes", "must be > 0")
            _require(isinstance(shard["sha256"], str) and bool(_SHA256.match(shard["sha256"])), path,
                     f"{field}.sha256", "must be 64 lower-case hex digits")
            total += n
        _require(split["samples"] == total, path, f"{where}.samples",
                 f"{split['samples']!r} != sum of its shards' samples ({total})")
    return manifest


def load_manifest(path: str | Path) -> dict:
    """Read and validate ``manifest.json`` (a directory holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        text = path.read_text()
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot read manifest: {e.strerror}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    return validate(manifest, path)
