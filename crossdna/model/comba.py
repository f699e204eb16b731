"""The Comba mixer layer with fla's parameter names and initialisation (fla ``fla/layers/comba.py::Comba``)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from crossdna import ops

from .config import CombaConfig
from .swa import RMSNorm


class ShortConvolution(nn.Conv1d):
    """Causal depthwise conv taps (weight [D,1,K], no bias), keyed like fla's ``ShortConvolution``. The layer applies
    the q, k and v taps together, with SiLU, inside ``ops.comba_inputs``; nn.Conv1d's own forward is not causal."""

    def __init__(self, hidden_size: int, kernel_size: int):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ShortConvolution holds taps only: Comba applies them through crossdna.ops.comba_inputs")


class GatedRMSNorm(RMSNorm):
    """fla ``FusedRMSNormGated(activation='sigmoid')``: weight only."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, backend: str = "auto") -> torch.Tensor:  # type: ignore[override]
        return ops.gated_rms_norm(x, gate, self.weight, self.eps, backend=backend)


class Comba(nn.Module):
    """x [B,T,d] → [B,T,d]. In fp32 whatever the ambient autocast (upstream calls it outside autocast), unless
    ``cfg.precision == "autocast"``.

    q̃,k̃,v = SiLU(causal dwconv(x·W)); p̃ = σ(decay)·k̃; q̂ = q̃ − D·p̃; β = σ(x·Wb); g = −exp(A_log)·softplus(x·Wa + dt_bias);
    o = Comba(l2(q̂), l2(k̃), v, l2(p̃), g, β); y = RMSNorm(o)·σ(x·Wg) per head; out = y·Wo. The first line and the
    L2 norms are ``ops.comba_inputs``.
    """

    def __init__(self, d_model: int, cfg: CombaConfig):
        super().__init__()
        self.cfg = cfg
        h, dk, dv = cfg.num_heads, cfg.head_dim, cfg.head_v_dim
        self.q_proj = nn.Linear(d_model, h * dk, bias=False)
        self.k_proj = nn.Linear(d_model, h * dk, bias=False)
        self.v_proj = nn.Linear(d_model, h * dv, bias=False)
        self.a_proj = nn.Linear(d_model, h, bias=False)
        self.b_proj = nn.Linear(d_model, h, bias=False)
        self.decay = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.q_conv1d = ShortConvolution(h * dk, cfg.conv_size)
        self.k_conv1d = ShortConvolution(h * dk, cfg.conv_size)
        self.v_conv1d = ShortConvolution(h * dv, cfg.conv_size)
        self.g_proj = nn.Linear(d_model, h * dv, bias=False)
        self.o_norm = GatedRMSNorm(dv, cfg.norm_eps)
        self.o_proj = nn.Linear(h * dv, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's init of the per-head scalars (the Linear/Conv layers keep torch's default init)."""
        nn.init.ones_(self.decay)
        nn.init.constant_(self.D, self.cfg.correction_factor)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        dt_min, dt_max, dt_floor = 0.001, 0.1, 1e-4
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        cfg = self.cfg
        fp32 = cfg.precision == "fp32"
        with torch.autocast(x.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            if fp32:
                x = x.to(self.q_proj.weight.dtype)
            B, T, _ = x.shape
            # q, k, v as one projection and one input-stage kernel: x is read once, the three convolutions, the
            # correction and the L2 norms run in one pass (the kernel then skips its own L2 norm).
            qkv = F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            taps = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]
            q, k, v, p = ops.comba_inputs(qkv, taps, torch.sigmoid(self.decay), self.D, cfg.num_heads,
                                          cfg.head_v_dim, backend=backend)
            beta = torch.sigmoid(self.b_proj(x))
            g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
            # Before the kernel, with the other projections of x: compiled, the kernel call splits this forward
            # into two graphs, and x read by both would be cast to bf16 twice, saved twice, and its gradient
            # summed outside them.
            gate = self.g_proj(x).view(B, T, cfg.num_heads, cfg.head_v_dim)
            o = ops.comba(q, k, v, p, g, beta, scale=cfg.head_dim ** -0.5, chunk_size=cfg.chunk_size,
                          use_qk_l2norm=False, backend=backend)
            o = self.o_norm(o, gate, backend).reshape(B, T, -1)
            return self.o_proj(o)
