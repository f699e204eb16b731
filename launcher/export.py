"""Consolidate a checkpoint of any strategy into one safetensors file (``crossdna export-weights CKPT OUT``).

The output is the model's full ``state_dict`` in fp32 (student, EMA teacher, buffers), loadable with
``SSScanDNAHybridModel.load_state_dict(strict=True)``, plus metadata: the step, strategy, config and manifest
hashes, and the resolved model config as JSON. Runs in one process without a process group, whatever world size
wrote the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from launcher.checkpoint import CONFIG_FILE, LATEST, CheckpointError, SafeFileSystemReader, TensorOnlyLoadPlanner


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run's ``checkpoints/`` directory (its ``latest``), or a run directory."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    return path


def _torch_family_state(ckpt: Path) -> dict[str, torch.Tensor]:
    reader = SafeFileSystemReader(str(ckpt / "state"))
    metadata = reader.read_metadata()
    state = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            state[key[len("model."):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load({"model": state}, storage_reader=reader, planner=TensorOnlyLoadPlanner(), no_dist=True)
    return state


def _deepspeed_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from launcher.zero import DS_TAG, weights_only_loads
    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG)
    # The teacher's fp32 masters live in our own flat partition files (launcher/zero.py, ZeroEMA); zero_to_fp32
    # leaves frozen parameters out for ZeRO-1/2. Each teacher parameter has its student's shape.
    from crossdna.model.hybrid import EMA_PAIRS
    student_of = {f"{ema}.": f"{student}." for ema, student in EMA_PAIRS}
    shards = [load_file(str(f)) for f in sorted((ckpt / "ema").glob("rank-*.safetensors"))]
    for name in (shards[0] if shards else {}):
        prefix = name.split(".", 1)[0] + "."
        shape = state[student_of[prefix] + name[len(prefix):]].shape
        flat = torch.cat([s[name] for s in shards])
        state[name] = flat[: shape.numel()].view(shape).clone()
    return state


def export_weights(checkpoint: str | Path, out: str | Path) -> Path:
    from launcher.checkpoint import CheckpointManager

    ckpt = resolve_checkpoint(checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    trainer = CheckpointManager.verify(ckpt)
    family = trainer.get("strategy_family")
    if family == "torch":
        state = _torch_family_state(ckpt)
    elif family == "deepspeed":
        state = _deepspeed_state(ckpt)
    else:
        raise CheckpointError(f"{ckpt}: unknown strategy_family {family!r} in trainer.json")
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in state.items()}
    model_cfg = yaml.safe_load((ckpt / CONFIG_FILE).read_text()).get("model", {})
    metadata = {"format": "crossdna-state-dict", "step": str(trainer["step"]), "strategy": trainer["strategy"],
                "config_hash": trainer.get("config_hash", ""), "manifest_hash": trainer.get("manifest_hash", ""),
                "model_config": json.dumps(model_cfg, sort_keys=True)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out
