"""TokenBridge: the cross-strand exchange between the two branches' outputs (spec §2.7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossdna import ops


class TokenBridge(nn.Module):
    """Each side receives the other side's multi-dilation context plus its global mean token, through a gate.

    ctx_X = Conv1x1(cat_d DWConv_k9,dil d(x_X)),  d ∈ {1,2,4,8,16} (centred, same length)
    loc_A = W_B2A(x_B + ctx_B) + W_glbB2A(mean_l x_B)       (and symmetrically for B)
    [g_A, g_B] = σ(W_gate[x_A, x_B, x_A − x_B, x_A ⊙ x_B])
    y_A = LayerNorm_A(x_A + Dropout(g_A ⊙ loc_A))
    """

    def __init__(self, d_model: int, dropout: float, kernel_size: int = 9, dilations: tuple[int, ...] = (1, 2, 4, 8, 16)):
        super().__init__()
        d = d_model

        def dw_convs() -> nn.ModuleList:
            return nn.ModuleList(
                nn.Conv1d(d, d, kernel_size, padding=dil * (kernel_size // 2), dilation=dil, groups=d, bias=False)
                for dil in dilations
            )

        # Registration order as upstream so that state_dict() lists keys in the same order.
        self.dw_B = dw_convs()
        self.mix_B = nn.Conv1d(d * len(dilations), d, 1)
        self.dw_A = dw_convs()
        self.mix_A = nn.Conv1d(d * len(dilations), d, 1)
        self.proj_B2A = nn.Linear(d, d)
        self.proj_A2B = nn.Linear(d, d)
        self.glb_B2A = nn.Linear(d, d)
        self.glb_A2B = nn.Linear(d, d)
        self.gate = nn.Linear(4 * d, 2 * d)
        self.dropout = nn.Dropout(dropout)
        self.normA = nn.LayerNorm(d)
        self.normB = nn.LayerNorm(d)

    @staticmethod
    def _context(x: torch.Tensor, convs: nn.ModuleList, mix: nn.Conv1d, backend: str) -> torch.Tensor:
        """Channel-last: the convs' outputs stacked as [B, L, dilation, d] are the 1×1 mix's input channels in
        upstream's concatenation order, so the mix is a GEMM on them."""
        weight = torch.stack([conv.weight[:, 0] for conv in convs])
        ctx = ops.dilated_dwconv(x, weight, tuple(conv.dilation[0] for conv in convs), backend=backend)
        return F.linear(ctx.flatten(2), mix.weight[:, :, 0], mix.bias)

    def forward(self, xA: torch.Tensor, xB: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        ctxB = self._context(xB, self.dw_B, self.mix_B, backend)
        ctxA = self._context(xA, self.dw_A, self.mix_A, backend)
        locA = self.proj_B2A(xB + ctxB) + self.glb_B2A(xB.mean(1, keepdim=True))
        locB = self.proj_A2B(xA + ctxA) + self.glb_A2B(xA.mean(1, keepdim=True))
        gA, gB = torch.sigmoid(self.gate(torch.cat([xA, xB, xA - xB, xA * xB], dim=-1))).chunk(2, dim=-1)
        return self.normA(xA + self.dropout(gA * locA)), self.normB(xB + self.dropout(gB * locB))
