"""One strand's encoder: ``DeepEnhancedBranch`` = depth × ``EnhancedHybridCore`` + LayerNorm (spec §2.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comba import Comba
from .config import CrossDNAConfig
from .swa import SlidingWindowAttention


class EnhancedHybridCore(nn.Module):
    """m = Comba(x); t = SWA(m); g = σ(W[m‖t]); LayerNorm(g⊙t + (1−g)⊙m).

    No residual and no pre-norm around Comba (defect 19, the architecture): x reaches the output only through it.
    """

    def __init__(self, cfg: CrossDNAConfig, layer: int):
        super().__init__()
        d = cfg.d_model
        self.comba = Comba(d, cfg.comba)
        self.transformer = SlidingWindowAttention(d, cfg.mlp_hidden, cfg.attention, cfg.layer_drop_path(layer))
        self.gate = nn.Linear(2 * d, d)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        m = self.comba(x, backend)
        t = self.transformer(m, backend)
        # W[m‖t] + b as W_m·m + W_t·t + b: the weight's gradient would keep the concatenation until the backward, a
        # copy of m and t, which the mix below keeps anyway (0.9 GiB of the step's peak at B = 150 and L = 1024)
        w_m, w_t = self.gate.weight.split(m.shape[-1], dim=1)
        g = torch.sigmoid(F.linear(m, w_m, self.gate.bias) + F.linear(t, w_t))
        return self.out_norm(g * t + (1 - g) * m)


class DeepEnhancedBranch(nn.Module):
    def __init__(self, cfg: CrossDNAConfig):
        super().__init__()
        self.layers = nn.ModuleList(EnhancedHybridCore(cfg, i) for i in range(cfg.depth))
        self.output_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, backend)
        return self._output_norm(x)

    def _output_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The output LayerNorm, in this module's code so that :func:`crossdna.model.compile.compile_model` can
        compile it: dynamo skips a compiled ``nn.LayerNorm`` module (its code is torch's), which then runs eagerly."""
        return self.output_norm(x)
