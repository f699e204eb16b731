"""Centred dilated depthwise convolutions over time, channel-last (reference PyTorch): the TokenBridge's context."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dilated_dwconv(x: torch.Tensor, weight: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """x [B,T,C], weight [N,C,K] (K odd), N dilations → [B,T,N,C]:

    y[:, t, i] = Σ_j weight[i, :, j] · x[:, t + (j − K//2)·dilations[i]]   (zero outside the sequence),

    which is ``nn.Conv1d(C, C, K, padding=d·(K//2), dilation=d, groups=C, bias=False)`` per dilation d.
    """
    C, K = x.shape[-1], weight.shape[-1]
    xt = x.transpose(1, 2)
    ys = [F.conv1d(xt, weight[i, :, None], padding=d * (K // 2), dilation=d, groups=C) for i, d in enumerate(dilations)]
    return torch.stack(ys, dim=1).permute(0, 3, 1, 2)
