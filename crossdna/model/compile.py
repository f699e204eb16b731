"""``torch.compile`` for the CrossDNA model, layer by layer, with the fla kernels left opaque.

Each ``EnhancedHybridCore`` (student and EMA teacher) and each TokenBridge is compiled on its own, and so are each
branch's output LayerNorm and the fusion head (``_fuse``: the two residual MLP heads, the gate and the LayerNorm of
their mix); ``dynamic=False``:
shapes are fixed per run. Layers share code, so one compilation serves all layers of a shape; the teacher's no-grad
[2B] shape is a second one. fla's ``chunk_comba`` is ``torch.compiler.disable``d by fla (and its backend dispatch
too), so dynamo breaks the graph there and runs the Triton/tilelang kernels eagerly; everything around them
(projections' epilogues, the short convolutions, SiLU, the q-correction, the gates, RMSNorms, RoPE, SwiGLU,
residuals, LayerNorms) is fused by inductor.
"""
from __future__ import annotations

import torch
import torch._functorch.config  # not imported by `import torch` on every build (e.g. 2.13's CPU wheel)
from torch import nn

from .hybrid import SSScanDNAHybridModel


def _branches(model: SSScanDNAHybridModel) -> list[nn.Module]:
    return [model.branchA_core, model.branchB_core, *[m for m in model.ema_modules() if hasattr(m, "layers")]]


def compiled_modules(model: SSScanDNAHybridModel) -> list[nn.Module]:
    layers = [layer for branch in _branches(model) for layer in branch.layers]
    bridges = [b for b in (model.bridge, getattr(model, "bridge_ema", None)) if b is not None]
    return [*layers, *bridges]


def compile_model(model: SSScanDNAHybridModel, mode: str | None = None,
                  activation_budget: float = 1.0) -> SSScanDNAHybridModel:
    """Compile the model's layers in place (``nn.Module.compile``) and return it. Call after ``.to(device)``.

    ``activation_budget`` < 1 lets the partitioner recompute cheap ops in the backward instead of saving their
    outputs, keeping roughly that fraction of the saved activations (torch's ``activation_memory_budget``: it
    chooses what to recompute by a runtime estimate): memory for time, inside the compiled layers only."""
    if not 0.0 <= activation_budget <= 1.0:
        raise ValueError(f"activation_budget must be in [0, 1], got {activation_budget}")
    torch._functorch.config.activation_memory_budget = activation_budget
    if model.cfg.kernels != "reference" and next(model.parameters()).is_cuda:
        from crossdna.ops import fused

        if fused.swa_kernel() == "flex":  # build the block masks eagerly: compiled code then only reads them
            L, window = model.cfg.block_size, model.cfg.attention.window_size
            fused.band_block_mask(L, min(window, L), next(model.parameters()).device)
    # 24+ layers of one class share their compiled code; each (grad / no-grad, shape) adds an entry.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in compiled_modules(model):
        module.compile(dynamic=False, mode=mode)
    # Instance attributes over the methods. The output norms are eager otherwise (at B = 150 on an H200: an fp32
    # LayerNorm of 0.36 ms per call forward, 4 calls, and its backward).
    model._fuse = torch.compile(model._fuse, dynamic=False, mode=mode)
    for branch in _branches(model):
        branch._output_norm = torch.compile(branch._output_norm, dynamic=False, mode=mode)
    return model
