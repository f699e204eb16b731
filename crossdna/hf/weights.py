"""Backbone weights on disk, and one resolver for every place a model can come from.

A *consolidated weights file* is a single safetensors file holding the backbone's full state dict (EMA copies
included when the model has them) with the model config in its metadata (``model_config``: the ``CrossDNAConfig``
as JSON; ``format``: ``crossdna-state-dict``), the format of ``launcher.export`` (``crossdna export-weights``).
``crossdna import-upstream`` writes it too; finetuning, ``crossdna export`` and ``crossdna embed`` read it.

:func:`load_backbone` accepts ``scratch``, a consolidated ``.safetensors`` file, an exported HF directory
(``config.json`` + ``model.safetensors``), or a pretraining checkpoint directory (consolidated through
``launcher.export`` when that module is installed).
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from crossdna import config as _config
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel

CONFIG_KEY = "model_config"  # the keys and format name of launcher/export.py
FORMAT_KEY = "format"
FORMAT = "crossdna-state-dict"
HF_PREFIX = "backbone."
EMA_PREFIXES = ("branchA_core_ema.", "branchB_core_ema.", "bridge_ema.")


def config_from_dict(data: Mapping, where: str) -> CrossDNAConfig:
    return _config.from_dict(CrossDNAConfig, dict(data), where)


def apply_model_overrides(cfg: CrossDNAConfig, overrides: list[str] | tuple[str, ...]) -> CrossDNAConfig:
    if not overrides:
        return cfg
    data = _config.apply_overrides(_config.to_dict(cfg), list(overrides))
    return _config.from_dict(CrossDNAConfig, data, "model")


def save_weights(path: str | Path, cfg: CrossDNAConfig, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a consolidated weights file atomically (a crash leaves the old file or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {FORMAT_KEY: FORMAT, CONFIG_KEY: json.dumps(_config.to_dict(cfg), sort_keys=True), **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e


def load_weights(path: str | Path) -> tuple[CrossDNAConfig, dict[str, torch.Tensor]]:
    """Read a consolidated weights file: (model config, state dict)."""
    state, meta = read_safetensors(path)
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no '{CONFIG_KEY}' in the safetensors metadata; not a consolidated CrossDNA "
                         f"weights file (upstream checkpoints go through `crossdna import-upstream` first)")
    try:
        data = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata '{CONFIG_KEY}' is not JSON: {e}") from e
    return config_from_dict(data, f"{path}:{CONFIG_KEY}"), state


def load_hf_dir(path: str | Path) -> tuple[CrossDNAConfig, dict[str, torch.Tensor]]:
    """Read an exported HF directory (``config.json`` ``backbone`` section + ``model.safetensors``)."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: cannot read: {e}") from e
    if "backbone" not in hf:
        raise ValueError(f"{path / 'config.json'}: no 'backbone' section; not a `crossdna export` directory "
                         f"(an upstream HF release goes through `crossdna import-upstream` first)")
    cfg = config_from_dict(hf["backbone"], f"{path / 'config.json'}:backbone")
    state, _ = read_safetensors(path / "model.safetensors")
    return cfg, {k[len(HF_PREFIX):]: v for k, v in state.items() if k.startswith(HF_PREFIX)}


def _consolidate_checkpoint(path: Path) -> tuple[CrossDNAConfig, dict[str, torch.Tensor]]:
    try:
        export = importlib.import_module("launcher.export")
    except ModuleNotFoundError as e:
        raise ValueError(f"{path}: a pretraining checkpoint directory needs launcher.export to consolidate it "
                         f"({e}); run `crossdna export-weights` and pass the .safetensors file") from e
    if not hasattr(export, "export_weights"):
        raise ValueError(f"{path}: launcher.export has no export_weights(checkpoint_dir, out_path); run "
                         f"`crossdna export-weights` and pass the .safetensors file")
    with tempfile.TemporaryDirectory() as tmp:
        out = export.export_weights(path, Path(tmp) / "weights.safetensors")
        return load_weights(out)


def read_model_source(source: str | Path) -> tuple[CrossDNAConfig, dict[str, torch.Tensor]]:
    """(config, state) from a consolidated file, an exported HF dir or a pretraining checkpoint dir."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        return load_weights(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return load_hf_dir(path)
    return _consolidate_checkpoint(path)


def load_state(model: SSScanDNAHybridModel, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Strict load, except for the EMA teacher: copies in the file are dropped when the model has no teacher, and
    a teacher the file lacks starts as a copy of the student (as at initialisation)."""
    if not model.cfg.use_ema_teacher:
        state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIXES)}
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing and all(k.startswith(EMA_PREFIXES) for k in missing):
        model.copy_student_to_ema()
        missing = []
    if missing or unexpected:
        raise ValueError(f"{where}: state does not fit the model config: missing {sorted(missing)[:5]}"
                         f"{'…' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
                         f"{'…' if len(unexpected) > 5 else ''}")


def load_backbone(source: str, preset: str = "8m", overrides: list[str] | tuple[str, ...] = ()
                  ) -> tuple[SSScanDNAHybridModel, str]:
    """A backbone from ``scratch`` (preset, seeded by the caller) or any saved source, with config overrides.

    Returns the model and a one-line description of where it came from (for run tags and logs)."""
    if source == "scratch":
        model = SSScanDNAHybridModel(apply_model_overrides(CrossDNAConfig.preset(preset), overrides))
        return model, f"scratch:{preset}"
    cfg, state = read_model_source(source)
    model = SSScanDNAHybridModel(apply_model_overrides(cfg, overrides))
    load_state(model, state, str(source))
    return model, str(Path(source).resolve())
