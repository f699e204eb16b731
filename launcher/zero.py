"""DeepSpeed ZeRO-1/2/3 behind the engine interface of launcher/parallelize.py.

EMA teacher under ZeRO (the model's own ``update_ema`` cannot be used here):
- with ``bf16`` DeepSpeed holds module parameters in bf16 (the fp32 masters live inside its optimizer), and a
  bf16 lerp with weight 1e-3 rounds most updates away; under ZeRO-3 a partitioned parameter's ``.data`` is
  empty and its values live in ``p.ds_tensor``.
- so :class:`ZeroEMA` keeps an **fp32 master of this rank's piece** of every teacher parameter (the whole
  tensor for stages 1/2, the ``ds_tensor`` partition for stage 3), lerps it towards the student's matching
  piece after each optimizer step and writes it back into the module's teacher piece. DeepSpeed partitions a
  parameter by its flat numel, and each teacher parameter has the same numel as its student, so the two
  pieces cover the same elements: the update is purely local, no gather, no collective.
- it is saved as ``ema/rank-XXXXX.safetensors`` (flat pieces + numel): a load concatenates the pieces and
  re-slices them for the current world size, so the teacher survives a world-size change.

DeepSpeed's files are loaded with ``torch.load(weights_only=True)`` and an allow-list of the three DeepSpeed
classes its ZeRO checkpoints contain (no arbitrary unpickling): :func:`weights_only_loads`.

Under ZeRO-3 the generated config sets ``stage3_param_persistence_threshold: 0`` (launcher/deepspeed_config.py):
DeepSpeed would otherwise keep small parameters whole on every rank and refresh them inside ``step()``, before
the EMA update, so the teacher would read stale copies of its small parameters.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from launcher import deepspeed_config
from launcher.checkpoint import CheckpointError, enum_member
from launcher.distributed import DistEnv
from launcher.optim import OptimConfig, build_optimizer, set_lr
from launcher.parallelize import Engine

DS_TAG = "state"
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op (~85 s on a CI core) whenever the
    accelerator is the CPU one. The op only serves ``inference_all_reduce`` (not training); the CUDA accelerator
    has no such builder (``create_op_builder`` returns None), so this only ever changes CPU runs."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        # importlib, not ``import deepspeed.comm.torch``: deepspeed.comm has an attribute named ``torch``.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside (DeepSpeed's engine, zero_to_fp32, ...) runs with ``weights_only=True`` even
    where DeepSpeed passes False, with DeepSpeed's three checkpoint classes allow-listed (and ``getattr`` only as
    :func:`~launcher.checkpoint.enum_member`, for Enum members as Python 3.11.0-3.11.4 pickle them): no arbitrary
    unpickling.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address,
                                               (enum_member, "builtins.getattr")]):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"DeepSpeed checkpoint refused by the weights-only loader: "
                              f"{str(e).strip().splitlines()[0][:300]}") from e
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def ema_parameter_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(teacher name, teacher parameter, student parameter) for every EMA'd parameter of the model."""
    from crossdna.model.hybrid import EMA_PAIRS
    pairs = []
    for ema_name, student_name in EMA_PAIRS:
        ema, student = getattr(model, ema_name, None), getattr(model, student_name, None)
        if ema is None or student is None:
            continue
        for (name, p_ema), p_student in zip(ema.named_parameters(), student.parameters()):
            pairs.append((f"{ema_name}.{name}", p_ema, p_student))
    return pairs


class ZeroEMA:
    def __init__(self, model: nn.Module, stage: int, env: DistEnv, decay: float):
        self.env, self.partitioned, self.weight = env, stage == 3, 1.0 - decay
        pairs = ema_parameter_pairs(model)
        self.names = [n for n, _, _ in pairs]
        self.numel = [p.ds_numel if self.partitioned else p.numel() for _, p, _ in pairs]
        self.teacher_params = [p for _, p, _ in pairs]
        self.student_params = [p for _, _, p in pairs]
        self.master = [t.detach().float().clone() for t in self._pieces(self.teacher_params)]

    def _pieces(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        # Resolved on every use: DeepSpeed may re-point .data / .ds_tensor (bf16 flat buffers, checkpoint loads).
        return [p.ds_tensor.data if self.partitioned else p.data for p in params]

    @torch.no_grad()
    def update(self) -> None:
        if not self.master:
            return
        student = [s.float() for s in self._pieces(self.student_params)]  # no copy when the module is fp32
        torch._foreach_lerp_(self.master, student, self.weight)
        torch._foreach_copy_(self._pieces(self.teacher_params), self.master)

    def _file(self, path: Path, rank: int) -> Path:
        return path / "ema" / f"rank-{rank:05d}.safetensors"

    def save(self, path: Path) -> None:
        if not self.partitioned and not self.env.is_main:
            return  # stages 1/2: every rank holds the same full teacher
        (path / "ema").mkdir(exist_ok=True)
        pieces = {n: m.reshape(-1) for n, m in zip(self.names, self.master)}
        meta = {"partitioned": str(self.partitioned), "world_size": str(self.env.world_size if self.partitioned else 1)}
        save_file(pieces, str(self._file(path, self.env.rank)), metadata=meta)

    @torch.no_grad()
    def load(self, path: Path) -> None:
        files = sorted((path / "ema").glob("rank-*.safetensors"))
        if not files:
            raise CheckpointError(f"{path / 'ema'}: no EMA teacher files")
        shards = [load_file(str(f)) for f in files]
        world, rank = self.env.world_size, self.env.rank
        for i, name in enumerate(self.names):
            try:
                flat = torch.cat([s[name] for s in shards])[: self.numel[i]]
            except KeyError as e:
                raise CheckpointError(f"{path / 'ema'}: teacher parameter {name} missing") from e
            if self.partitioned:
                part = math.ceil(self.numel[i] / world)
                piece = torch.zeros(self.master[i].numel(), dtype=torch.float32)
                chunk = flat[rank * part: (rank + 1) * part]
                piece[: chunk.numel()] = chunk
            else:
                piece = flat
            self.master[i].copy_(piece.view_as(self.master[i]))
        torch._foreach_copy_(self._pieces(self.teacher_params), self.master)


class DeepSpeedEngine(Engine):
    family = "deepspeed"

    def __init__(self, model: nn.Module, strategy: str, env: DistEnv, optim_cfg: OptimConfig, precision: str,
                 micro_batch: int, grad_accum: int, user_config: str | None):
        super().__init__(env, precision)
        if model.cfg.compat.ema_update_in_forward:
            raise ValueError("model.compat.ema_update_in_forward: the in-forward EMA update (upstream, defect 9) "
                             "works on whole parameters; use trainer.strategy=ddp or fsdp with it")
        import deepspeed
        _skip_cpu_shm_build()
        self.strategy, self.model = strategy, model
        self.stage = int(strategy[-1])
        self.config = deepspeed_config.resolve(
            deepspeed_config.generate(stage=self.stage, micro_batch=micro_batch, grad_accum=grad_accum,
                                      world_size=env.world_size, bf16=precision == "bf16",
                                      grad_clip=optim_cfg.grad_clip),
            user_config)
        optimizer = build_optimizer(model.named_parameters(), optim_cfg)
        model.to(env.device)
        self.wrapped, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.ema = ZeroEMA(model, self.stage, env, model.cfg.ema_decay) if model.cfg.use_ema_teacher else None
        self._last_micro = True

    def set_grad_sync(self, sync: bool) -> None:
        self._last_micro = sync  # DeepSpeed tracks accumulation boundaries itself; we only defer the last step()

    def backward(self, loss: torch.Tensor) -> None:
        self.wrapped.backward(loss)  # scales by 1/gradient_accumulation_steps
        if not self._last_micro:
            self.wrapped.step()  # a no-op for the weights before the accumulation boundary

    def clip_grads(self) -> None:
        return None  # DeepSpeed clips inside step() (gradient_clipping in its config)

    def optimizer_step(self, lr: float) -> None:
        set_lr(self.wrapped.optimizer, lr)
        self.wrapped.step()

    def grad_norm(self) -> float | None:
        norm = self.wrapped.get_global_grad_norm()
        return None if norm is None else float(norm)

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def save_state(self, path: Path, process_group=None, async_save: bool = False) -> None:
        self.wrapped.save_checkpoint(str(path / "deepspeed"), tag=DS_TAG, save_latest=False)
        if self.ema is not None:
            self.ema.save(path)
        return None  # DeepSpeed writes synchronously

    def load_state(self, path: Path, saved_world_size: int) -> None:
        if saved_world_size != self.env.world_size:
            raise CheckpointError(
                f"{path}: a ZeRO checkpoint written by {saved_world_size} ranks cannot be resumed on "
                f"{self.env.world_size}: resume it on {saved_world_size} ranks, or start a new run from its weights "
                "(`crossdna export-weights` then trainer.init_weights=...; the optimizer state starts fresh), "
                "see docs/training.md, 'Changing the world size'")
        with weights_only_loads():
            load_path, _ = self.wrapped.load_checkpoint(str(path / "deepspeed"), tag=DS_TAG, load_module_strict=True,
                                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"{path / 'deepspeed'}: DeepSpeed found no checkpoint with tag {DS_TAG!r}")
        if self.ema is not None:
            self.ema.load(path)
        dist.barrier()
