"""Sliding-window causal attention and rotary embeddings (reference PyTorch).

Query i attends keys j with i − window < j ≤ i: a causal, left-only window of ``window`` keys including itself,
which is flash-attn's ``causal=True, window_size=(window − 1, 0)`` (spec §2.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def band_mask(length: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [length, length], True where query i may attend key j (i − window < j ≤ i)."""
    i = torch.arange(length, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < window)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None = None
) -> torch.Tensor:
    """q,k,v [B,l,H,d] (flash-attn layout) → [B,l,H,d]. SDPA with a band mask; plain causal when the window covers l."""
    length = q.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if window >= length:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(length, window, q.device), scale=scale)
    return o.transpose(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_tables(length: int, dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """cos θ and sin θ of GPT-NeoX RoPE at positions 0..l−1, [2, l, d] fp32, each repeated over both halves.

    inv_freq_i = base^(−2i/d), θ[t, i] = t·inv_freq_i.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    theta = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    theta = torch.cat([theta, theta], dim=-1)
    return torch.stack([theta.cos(), theta.sin()])


def apply_rotary(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """x [B,l,H,d] rotated by :func:`rotary_tables` ``tables``: x·cos θ + rotate_half(x)·sin θ, in fp32."""
    cos, sin = tables[0, :, None, :], tables[1, :, None, :]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX (non-interleaved, rotate-half) RoPE on q,k [B,l,H,d] at positions 0..l−1, computed in fp32."""
    tables = rotary_tables(q.shape[1], q.shape[-1], base, q.device)
    return apply_rotary(q, tables), apply_rotary(k, tables)
