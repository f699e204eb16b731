"""One small training-engine interface over DDP, FSDP2 and DeepSpeed ZeRO-1/2/3.

The loop (launcher/train.py) only ever calls::

    engine.set_step(step)                 # the optimizer step the forwards belong to (gate freeze)
    engine.set_grad_sync(last_micro)      # before the forward of each micro-batch
    out = engine.forward(input_ids)       # autocast as configured
    engine.backward(loss)                 # scaled for accumulation
    norm = engine.clip_grads()            # tensor or None, before the finiteness check
    engine.optimizer_step(lr)             # only when the step's losses are finite
    engine.update_ema()                   # after every optimizer step
    engine.grad_norm()                    # DeepSpeed only (it clips inside its step)
    engine.save_state(dir) / engine.load_state(dir)

so a strategy is a choice in the config, not a fork of the loop.

``TorchEngine(..., graphed=True)`` (DDP only) serves a trainer that captures forward + backward as a CUDA graph:
the module is not wrapped in DDP (its reducer's hooks launch collectives from inside the backward, which a capture
would record with NCCL's capture constraints on every rank); gradients are computed locally and ``clip_grads``
first averages them with one all-reduce of a flat buffer. At 8.1M parameters that is 32 MB per step: well under
a millisecond on NVLink, where DDP's overlap with the backward would save a fraction of it. Gradients are zeroed
in place rather than freed, so a replay writes them at the addresses the capture recorded. The optimizer step
(fused capturable AdamW, lr a device tensor) is captured too, as a second graph replayed only after the trainer
has seen finite losses: its Python and per-group launches are most of the host work left between two steps.
"""
from __future__ import annotations

import contextlib
import inspect
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from crossdna.cuda_graphs import GraphedStep
from crossdna.model.branch import EnhancedHybridCore
from crossdna.model.bridge import TokenBridge
from launcher import checkpoint as ckpt
from launcher.distributed import DistEnv
from launcher.optim import OptimConfig, build_optimizer, set_lr

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
# Buffers (g_step, the complement tables) are identical on every rank by construction; syncing them at each
# forward is a broadcast per step for nothing. torch 2.13 calls the switch forward_sync_buffers (the old name
# warns); earlier releases (the GPU image's 2.11) only know broadcast_buffers.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})


class Engine:
    strategy: str
    family: str  # "torch" (DDP/FSDP, DCP checkpoints) or "deepspeed" (engine checkpoints)
    model: nn.Module  # the unwrapped CrossDNA model (set_step, eval-mode forward, EMA)

    def __init__(self, env: DistEnv, precision: str):
        self.env = env
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def set_step(self, step: int) -> None:
        # compat.gate_step="forward_count" (upstream, defect 8): the model counts its own training forwards.
        if self.model.cfg.compat.gate_step == "optimizer":
            self.model.set_step(step)

    @property
    def ema_after_step(self) -> bool:
        """False when the model reproduces upstream's EMA update inside every training forward (defect 9)."""
        return self.model.cfg.use_ema_teacher and not self.model.cfg.compat.ema_update_in_forward

    def forward(self, input_ids: torch.Tensor, mode: str = "pretrain") -> Any:
        with self.autocast():
            return self.wrapped(input_ids, mode=mode)

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm when ``clip_grads`` could not return it."""
        return None


# --------------------------------------------------------------------------------------------- DDP / FSDP2
def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: every layer of every branch and each bridge, student and EMA teacher
    alike. FSDP2 shards each parameter on dim 0 over the same mesh, so a teacher parameter and its student have
    identical local shards and the EMA lerp stays local."""
    return [m for m in model.modules() if isinstance(m, (EnhancedHybridCore, TokenBridge))]


class TorchEngine(Engine):
    family = "torch"

    def __init__(self, model: nn.Module, strategy: str, env: DistEnv, optim_cfg: OptimConfig, precision: str,
                 grad_accum: int, graphed: bool = False):
        super().__init__(env, precision)
        self.strategy, self.model, self.grad_accum, self.grad_clip = strategy, model, grad_accum, optim_cfg.grad_clip
        self.graphed = graphed
        model.to(env.device)
        if graphed:
            if strategy != "ddp":
                raise ValueError(f"trainer.cuda_graph: supported with strategy ddp, not {strategy}")
            self.wrapped = model  # gradients are averaged in clip_grads (module docstring)
        elif strategy == "ddp":
            self._find_unused: bool | None = None
            self._wrap_ddp(find_unused=model.gate_frozen())
        elif strategy == "fsdp":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if precision == "bf16" else MixedPrecisionPolicy()
            for unit in fsdp_units(model):
                fully_shard(unit, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            self.wrapped = model
        else:
            raise ValueError(f"trainer.strategy: {strategy!r} is not a torch strategy")
        # Off CUDA a graphed engine runs the same steps uncaptured (what the CPU tests of the gradient path use).
        cuda_ddp = strategy == "ddp" and env.device.type == "cuda"
        capture = graphed and cuda_ddp
        self.optimizer = build_optimizer(model.named_parameters(), optim_cfg,
                                         fused_on=env.device if cuda_ddp else None, capturable=capture)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._update = GraphedStep(self._update_weights) if capture else None

    def train(self, mode: bool = True) -> None:
        if self.strategy == "fsdp" and mode:
            # FSDP2 keeps the root's parameters unsharded after a forward (it expects the backward next); after
            # forward-only evaluation they must be resharded, or optimizer, clipping and checkpoint would see the
            # unsharded tensors instead of the sharded parameters they own.
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        super().train(mode)

    def _wrap_ddp(self, find_unused: bool) -> None:
        """While the fusion gate is frozen ``gate_fuse`` takes no part in the forward, so DDP must look for unused
        parameters; afterwards every parameter is used and the per-backward graph walk is dropped (upstream kept
        ``find_unused_parameters=True`` for the whole run, spec defect 29). Re-wrapping happens at most once."""
        if find_unused == self._find_unused:
            return
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.wrapped = DDP(self.model, device_ids=device_ids, find_unused_parameters=find_unused, **_NO_BUFFER_SYNC)
        self._find_unused = find_unused

    def set_step(self, step: int) -> None:
        super().set_step(step)
        if self.strategy == "ddp" and not self.graphed:
            self._wrap_ddp(find_unused=self.model.gate_frozen())

    def set_grad_sync(self, sync: bool) -> None:
        if self.graphed:
            return  # one all-reduce after the last micro-batch, in clip_grads
        if self.strategy == "ddp":
            self.wrapped.require_backward_grad_sync = sync  # what DDP.no_sync() toggles
        else:
            self.wrapped.set_requires_gradient_sync(sync)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def clip_grads(self) -> torch.Tensor:
        if self.graphed and self.env.world_size > 1:
            average_gradients(self.params, self.env.world_size)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_step(self, lr: float) -> None:
        set_lr(self.optimizer, lr)
        if self._update is None:
            self._update_weights({})
        else:  # which parameters have gradients (and so take a step) depends on the gate's phase
            self._update({}, phase=self.model.gate_frozen())

    def _update_weights(self, _: dict) -> None:
        self.optimizer.step()
        # Graphed: zeroed in place (a replay accumulates into the captured addresses); a parameter that took no
        # part in the step (gate_fuse while frozen) keeps no gradient, so AdamW leaves it alone as in eager mode.
        self.optimizer.zero_grad(set_to_none=not self.graphed)

    def update_ema(self) -> None:
        # Under FSDP2 teacher and student parameters are DTensors with the same placements: local lerp, no gather.
        self.model.update_ema()

    # -- checkpoint (DCP: sharded save, resharding load)
    def _state(self) -> dict:
        opts = StateDictOptions(strict=True)
        optim = get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts)
        return {"model": get_model_state_dict(self.wrapped, options=opts), "optim": optim["state"]}

    def save_state(self, path: Path, process_group=None, async_save: bool = False) -> Future | None:
        return ckpt.dcp_save(self._state(), path / "state", process_group=process_group, async_save=async_save)

    def load_state(self, path: Path, saved_world_size: int) -> None:
        state = self._state()  # current placements; DCP fills them from whatever world size wrote the files
        no_state = ckpt.dcp_load(state, path / "state")
        opts = StateDictOptions(strict=True)
        set_model_state_dict(self.wrapped, state["model"], options=opts)
        # Hyper-parameters (param_groups) come from this run's config, never from the file.
        groups = get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts)["param_groups"]
        set_optimizer_state_dict(self.wrapped, self.optimizer, {"state": state["optim"], "param_groups": groups},
                                 options=opts)
        params = dict(self.model.named_parameters())
        for fqn in no_state:
            self.optimizer.state.pop(params[fqn], None)


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Mean of every rank's gradients, through one all-reduce of a flat copy (every rank holds gradients for the
    same parameters: the same phase of the same step)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def build_engine(model: nn.Module, strategy: str, env: DistEnv, optim_cfg: OptimConfig, precision: str,
                 micro_batch: int, grad_accum: int, deepspeed_config: str | None, graphed: bool = False) -> Engine:
    if strategy in ("ddp", "fsdp"):
        return TorchEngine(model, strategy, env, optim_cfg, precision, grad_accum, graphed)
    from launcher.zero import DeepSpeedEngine
    return DeepSpeedEngine(model, strategy, env, optim_cfg, precision, micro_batch, grad_accum, deepspeed_config)
