"""Normalisations, the SwiGLU product and the causal depthwise short convolution (reference PyTorch).

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


def short_conv(x: torch.Tensor, weight: torch.Tensor, activation: bool = True) -> torch.Tensor:
    """Causal depthwise conv over time (left pad K−1) then SiLU: x [B,T,D], weight [D,1,K] → [B,T,D]."""
    length, kernel = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, padding=kernel - 1, groups=weight.shape[0])[..., :length]
    y = y.transpose(1, 2)
    return F.silu(y) if activation else y
