"""Checkpoints: one directory per step, an atomic ``latest`` pointer, keep-last-k, resume, no arbitrary unpickling.

Layout of ``<run_dir>/checkpoints/``::

    latest                         text file naming the newest complete checkpoint (replaced atomically)
    step-00000020/
      trainer.json                 step, loader state, tracking run id, world size, strategy, hashes, file list
      config.yaml                  the resolved TrainConfig of the run that wrote it
      rng/rank-00000.safetensors   each rank's torch RNG states
      state/                       DDP/FSDP: torch.distributed.checkpoint (model incl. EMA, optimizer), sharded
      deepspeed/, ema/             ZeRO: the engine's own checkpoint + the fp32 EMA partitions (launcher/zero_ema.py)

A checkpoint is written into ``step-N.tmp`` and renamed once every rank's files are on disk, so a crash at any
moment leaves either the old ``latest`` or the new one, never a half-written checkpoint behind the pointer.

Loading never unpickles arbitrary objects: DCP's ``.metadata`` (a pickle) goes through an allow-list of DCP's own
metadata classes, only tensors are stored in DCP (optimizer hyper-parameters come from the config), small state
is JSON, RNG states are safetensors, and DeepSpeed's files are read with ``torch.load(weights_only=True)`` plus an
allow-list of DeepSpeed's enum/dataclass types (launcher/parallelize.py).
"""
from __future__ import annotations

import enum
import io
import json
import os
import pickle
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from crossdna.fileio import sha256_file, write_atomic
from launcher.distributed import DistEnv, rng_state, set_rng_state

FORMAT_VERSION = 1
LATEST = "latest"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or incompatible. The message names it."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"



# ---------------------------------------------------------------------------------------------------- DCP
_DCP_ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
# torch.Size, the layout decoder torch.save itself uses, and the checkpoint_id path DCP records.
_DCP_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


def enum_member(cls: Any, name: str) -> enum.Enum:
    """Stands in for ``getattr`` when unpickling: Python 3.11.0-3.11.4 pickle an Enum member as
    ``getattr(EnumClass, "NAME")`` (DCP's item types, DeepSpeed's ZeroStageEnum), later releases as
    ``EnumClass(value)``. Only members of an Enum class the unpickler already allowed resolve; a real ``getattr``
    would let a checkpoint reach any attribute of an allowed object."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"refusing getattr({cls!r}, {name!r}) in a checkpoint: only Enum members resolve")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle of its own dataclasses: allow exactly those, dtypes and layouts."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name == "getattr":
            return enum_member
        if module.startswith(_DCP_ALLOWED_MODULES) or (module, name) in _DCP_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                       torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint's DCP metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read DCP metadata: {e}") from e
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """We never store objects in DCP; a checkpoint that holds one was not written by us."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(f"DCP item {read_item.dest_index.fqn!r} is a pickled object; refusing to load it")


def dcp_save(state: dict, path: Path, process_group=None, async_save: bool = False) -> Future | None:
    writer = dcp.FileSystemWriter(str(path))
    if async_save:
        return dcp.async_save(state, storage_writer=writer, process_group=process_group)
    dcp.save(state, storage_writer=writer, process_group=process_group)
    return None


def dcp_load(state: dict, path: Path) -> set[str]:
    """Load in place into ``state`` = {"model": {fqn: tensor}, "optim": {fqn: {name: tensor}}} (tensors/DTensors
    of the *current* sharding: DCP reshards). Returns the parameter fqns that have no optimizer state in the
    checkpoint (parameters without a gradient so far, e.g. the fusion gate while it is frozen): the caller drops
    their freshly initialised state so that it is created lazily again, exactly as in an uninterrupted run."""
    reader = SafeFileSystemReader(str(path))
    saved = set(reader.read_metadata().state_dict_metadata)
    missing_model = sorted(f"model.{k}" for k in state["model"] if f"model.{k}" not in saved)
    if missing_model:
        raise CheckpointError(f"{path}: model tensors missing from the checkpoint: {missing_model[:5]}"
                              f"{' ...' if len(missing_model) > 5 else ''} (a different model config?)")
    no_state = {fqn for fqn, entries in state["optim"].items()
                if not all(f"optim.{fqn}.{name}" in saved for name in entries)}
    to_load = {"model": state["model"], "optim": {k: v for k, v in state["optim"].items() if k not in no_state}}
    try:
        dcp.load(to_load, storage_reader=reader, planner=TensorOnlyLoadPlanner())
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps per-rank failures in CheckpointException; name the checkpoint once
        raise CheckpointError(f"{path}: cannot load sharded state: {str(e).strip().splitlines()[-1][:500]}") from e
    return no_state


# ---------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Save/find/load/prune checkpoints under ``root``. Every rank calls ``save``/``load`` (collective)."""

    def __init__(self, root: str | Path, env: DistEnv, keep_last: int = 3, async_save: bool = False):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last: must be >= 1, got {keep_last}")
        self.root, self.env, self.keep_last, self.async_save = Path(root), env, keep_last, async_save
        self._pending: tuple[Future, Path, Path] | None = None
        # Async saves run their collectives on a side group so they never interleave with training collectives.
        self._pg = dist.new_group(backend="gloo") if async_save else None

    # -- discovery
    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not name or not (path / TRAINER_FILE).is_file():
            raise CheckpointError(f"{pointer}: points to {name!r}, which is not a complete checkpoint")
        return path

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    # -- save
    def save(self, step: int, engine, trainer_state: dict, config_yaml: str) -> Path:
        """Write checkpoint ``step``; returns its final path. With async saves the pointer moves in ``wait``: the
        trainer calls it at the first step after every rank's background write has finished."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # debris of an earlier crash at this same step
            tmp.mkdir(parents=True)
        dist.barrier()
        (tmp / "rng").mkdir(exist_ok=True)
        save_file(rng_state(), str(tmp / "rng" / f"rank-{self.env.rank:05d}.safetensors"))
        future = engine.save_state(tmp, process_group=self._pg, async_save=self.async_save)
        if self.env.is_main:
            state = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.env.world_size,
                     "time": time.time(), **trainer_state}
            (tmp / CONFIG_FILE).write_text(config_yaml)
            write_atomic(tmp / TRAINER_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
        if future is not None:
            self._pending = (future, tmp, final)
            return final
        dist.barrier()  # every rank's shards are on disk
        self._finalize(tmp, final)
        dist.barrier()
        return final

    def pending_done(self) -> bool:
        """True when no async save is pending or this rank's part of it is on disk (then ``wait`` won't block
        on it; it still meets the other ranks)."""
        return self._pending is None or self._pending[0].done()

    def wait(self) -> None:
        """Block until a pending async save is on disk and published."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        dist.barrier(group=self._pg)
        self._finalize(tmp, final)
        # As in the synchronous path: no rank may leave (e.g. exit for a requeue, which makes torchrun kill the
        # others) while rank 0 is still publishing the checkpoint and moving `latest`.
        dist.barrier(group=self._pg)

    def _finalize(self, tmp: Path, final: Path) -> None:
        if not self.env.is_main:
            return
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != "files.json"}
        write_atomic(tmp / "files.json", json.dumps(files, indent=1).encode())
        if final.exists():  # re-saving a step after a resume: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(self.root / LATEST, (final.name + "\n").encode())
        for old in self.checkpoints()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load
    @staticmethod
    def verify(path: Path) -> dict:
        """Check the file list (sizes and sha256) and read trainer.json; a clear CheckpointError otherwise."""
        listing = path / "files.json"
        try:
            files = json.loads(listing.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{listing}: missing or corrupt file list ({e})") from e
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in the checkpoint but missing")
            if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                raise CheckpointError(f"{f}: corrupt (size or sha256 differs from {listing.name})")
        try:
            state = json.loads((path / TRAINER_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({e})") from e
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path / TRAINER_FILE}: format_version {state.get('format_version')!r}, "
                                  f"this launcher reads {FORMAT_VERSION}")
        return state

    def load(self, path: Path, engine) -> dict:
        """Restore model/optimizer/EMA into ``engine`` and this rank's RNG; return trainer state."""
        # Rank 0 hashes every file once; the verdict (or its error message) is shared so all ranks fail alike.
        verdict: list[Any] = [None]
        if self.env.is_main:
            try:
                verdict[0] = self.verify(path)
            except CheckpointError as e:
                verdict[0] = str(e)
        dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], str):
            raise CheckpointError(verdict[0])
        state = verdict[0]
        if state["strategy_family"] != engine.family:
            raise CheckpointError(f"{path}: written by a {state['strategy_family']} strategy "
                                  f"({state['strategy']}); cannot resume it as {engine.strategy} "
                                  "(export the weights with `crossdna export-weights` to switch)")
        engine.load_state(path, saved_world_size=state["world_size"])
        rng_file = path / "rng" / f"rank-{self.env.rank:05d}.safetensors"
        if rng_file.is_file():
            set_rng_state(load_file(str(rng_file)))
        # else: a rank that did not exist in the saved world keeps its freshly derived seed stream.
        return state
