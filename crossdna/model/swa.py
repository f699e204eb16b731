"""The sliding-window attention block (upstream ``SlidingWindowAttention``, spec §2.5) and its fla-named parts."""
from __future__ import annotations

import math

import torch
from torch import nn

from crossdna import ops

from .config import AttentionConfig


class RMSNorm(nn.Module):
    """fla ``RMSNorm``: weight only, init 1."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, backend=backend)


class Attention(nn.Module):
    """fla ``Attention``: q/k/v/o projections without bias, RoPE per block from position 0, causal window."""

    def __init__(self, d_model: int, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = d_model // cfg.num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.cfg.num_heads, self.head_dim)
        q, k = ops.rotary(self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.cfg.rope_theta, backend=backend)
        o = ops.swa(q, k, self.v_proj(x).view(shape), self.cfg.window_size, self.head_dim ** -0.5, backend=backend)
        return self.o_proj(o.reshape(B, T, -1))


class GatedMLP(nn.Module):
    """fla ``GatedMLP`` (swish): down(SiLU(gate(x)) ⊙ up(x)), no biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch: drop whole samples with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    return x * x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep).div_(keep)


class SlidingWindowAttention(nn.Module):
    """h + Attn(RMSNorm(h)/√2)·√2, then + GatedMLP(RMSNorm(·)).

    The 1/√2 pre-scale (defect 13) halves the attention temperature; it is kept because trained weights depend on it.
    Attention and MLP run in whatever autocast the caller set (upstream forced bf16 per call, defect 25); the
    residual stream stays in its own dtype.
    """

    pre_scale = 1.0 / math.sqrt(2.0)

    def __init__(self, d_model: int, mlp_hidden: int, cfg: AttentionConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.mixer_norm = RMSNorm(d_model, cfg.norm_eps)
        self.mixer = Attention(d_model, cfg)
        self.mlp_norm = RMSNorm(d_model, cfg.norm_eps)
        self.mlp = GatedMLP(d_model, mlp_hidden)

    def forward(self, h: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        attn = self.mixer(self.mixer_norm(h, backend) * self.pre_scale, backend) / self.pre_scale
        h = h + drop_path(attn, self.drop_path_rate, self.training).to(h.dtype)
        mlp = self.mlp(self.mlp_norm(h, backend), backend)
        return h + drop_path(mlp, self.drop_path_rate, self.training).to(h.dtype)
