"""Normalisations and the SwiGLU product (reference PyTorch).

Norms compute in fp32 and return the input's dtype, as fla's fused kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fla ``FusedRMSNormGated(activation='sigmoid')``: RMSNorm(x)·w·σ(gate)."""
    return (rms_norm(x, weight, eps).float() * torch.sigmoid(gate.float())).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
