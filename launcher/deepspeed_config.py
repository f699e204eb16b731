"""The DeepSpeed JSON generated from our config, with an optional user JSON merged on top.

Ours is the single source of truth for everything the rest of the launcher also depends on (batch geometry,
ZeRO stage, precision, clipping); the user file may tune the rest (bucket sizes, overlap, offload, ...). A user
value that contradicts ours is an error naming the key, not a silent divergence between loader and engine.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# Keys the launcher derives from TrainConfig and relies on elsewhere; an override must agree or be absent.
_OWNED = {
    ("train_micro_batch_size_per_gpu",): "trainer.micro_batch",
    ("gradient_accumulation_steps",): "trainer.grad_accum",
    ("train_batch_size",): "trainer.micro_batch * grad_accum * world_size",
    ("zero_optimization", "stage"): "trainer.strategy",
    ("bf16", "enabled"): "trainer.precision",
    ("fp16", "enabled"): "trainer.precision",
    ("gradient_clipping",): "optim.grad_clip",
    ("zero_optimization", "stage3_param_persistence_threshold"): "the EMA teacher (launcher/zero.py)",
}


def generate(*, stage: int, micro_batch: int, grad_accum: int, world_size: int, bf16: bool,
             grad_clip: float) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # ZeRO-3 keeps parameters below this size whole on every rank and refreshes them by an all-gather inside
        # step(), i.e. before the EMA update; a teacher parameter kept that way would run one step stale. 0 =
        # every parameter partitioned, so the teacher is always gathered from the partitions the EMA updates.
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        # The launcher logs and times steps itself; DeepSpeed's own prints would only duplicate them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # Client torch AdamW: no DeepSpeed optimizer section (its Adam/CPUAdam would JIT-compile C++ ops).
    }


def _deep_merge(base: dict, override: dict, path: tuple[str, ...], where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        key_path = path + (key,)
        if key_path in _OWNED and key in base and base[key] != value:
            raise ValueError(f"{where}: {'.'.join(key_path)}={value!r} contradicts {_OWNED[key_path]} "
                             f"(={base[key]!r}); set it in the training config instead")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, key_path, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(generated: dict[str, Any], user_json: str | Path | None) -> dict[str, Any]:
    """``generated`` with the user's DeepSpeed JSON merged on top (user wins, except on launcher-owned keys)."""
    if user_json is None:
        return generated
    path = Path(user_json)
    try:
        user = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read DeepSpeed config: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(user, dict):
        raise ValueError(f"{path}: top level must be an object")
    if "optimizer" in user or "scheduler" in user:
        raise ValueError(f"{path}: 'optimizer'/'scheduler' sections are not supported: the launcher passes its own "
                         "AdamW (optim.*) and drives the learning rate from schedule.*")
    return _deep_merge(generated, user, (), str(path))
