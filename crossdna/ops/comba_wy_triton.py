"""The chunk-local matrix of Comba's WY form and its inverse as one Triton kernel: the fused counterpart of
:func:`crossdna.ops.comba.wy_inverse`, replacing fla's ``chunk_scaled_dot_comba_pkt_fwd`` + ``solve_tril``.

Per chunk of 64 tokens and head, M[t,s] = β_t (p_t·k_s) 2^{γ⁰_t − γ_s} for s < t, and the kernel writes (I + M)⁻¹.
fla builds M in one kernel, writes it in fp32, zero-fills the output and inverts in a second kernel whose 16×16
diagonal blocks are solved row by row (15 dependent steps, each a global load and a cross-lane reduction): at
B = 150 on an H200 that pair took 0.94 ms per call, 7× the bytes it moves. Here M never leaves registers:

* the ten 16×16 blocks on and below the diagonal are ten dots of [16, K]·[K, 16];
* a diagonal block N is strictly lower triangular, so N¹⁶ = 0 and (I + N)⁻¹ = (I − N)(I + N²)(I + N⁴)(I + N⁸):
  six dots instead of a serial substitution;
* the off-diagonal blocks of the inverse follow by block forward substitution (as fla's merge), sixteen dots;
* the upper blocks are written as zeros, so the output needs no zero-fill.

The fp32 dots use ``DOT`` precision ("ieee" by default, the exact fp32 product fla's solve uses).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64                                  # fla's Comba chunk, which its other kernels assume
WY_TILE = {"num_warps": 2, "DOT": "ieee"}  # chosen by benchmarks/triton_tiles_bench.py


@triton.jit
def _rows(K, P, BETA, G0, G, row, T, i_h, H: tl.constexpr, DK: tl.constexpr):
    """One 16-token block: β·p [16, DK] (fp32), k [16, DK] (input dtype), γ⁰ and γ [16] (log2 units)."""
    t = row + tl.arange(0, 16)
    ok = t < T
    c = tl.arange(0, DK)
    off = (t.to(tl.int64) * H + i_h) * DK
    k = tl.load(K + off[:, None] + c[None, :], mask=ok[:, None], other=0.0)
    p = tl.load(P + off[:, None] + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    beta = tl.load(BETA + t * H + i_h, mask=ok, other=0.0).to(tl.float32)
    g0 = tl.load(G0 + t * H + i_h, mask=ok, other=0.0)
    g = tl.load(G + t * H + i_h, mask=ok, other=0.0)
    return (p * beta[:, None]).to(k.dtype), k, g0, g


@triton.jit
def _m_block(pb, g0, k, g, DIAG: tl.constexpr, DOT: tl.constexpr):
    """M's block of one row block (pb, g0) and one column block (k, g); on the diagonal only s < t is kept."""
    m = tl.dot(pb, tl.trans(k), input_precision=DOT)
    if DIAG:
        r = tl.arange(0, 16)
        keep = r[:, None] > r[None, :]
        # the kept exponents are ≤ 0; the masked ones could overflow, so they are zeroed before exp2
        return tl.where(keep, m * tl.exp2(tl.where(keep, g0[:, None] - g[None, :], 0.0)), 0.0)
    return m * tl.exp2(g0[:, None] - g[None, :])


@triton.jit
def _unit_lower_inverse(n, DOT: tl.constexpr):
    """(I + n)⁻¹ for a strictly lower triangular 16×16 n: (I − n)(I + n²)(I + n⁴)(I + n⁸), exact since n¹⁶ = 0."""
    r = tl.arange(0, 16)
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    x = eye - n
    n = tl.dot(n, n, input_precision=DOT)
    x += tl.dot(x, n, input_precision=DOT)
    n = tl.dot(n, n, input_precision=DOT)
    x += tl.dot(x, n, input_precision=DOT)
    n = tl.dot(n, n, input_precision=DOT)
    x += tl.dot(x, n, input_precision=DOT)
    return x


@triton.jit
def _store(AI, x, row, col: tl.constexpr, T, i_h, H: tl.constexpr):
    t = row + tl.arange(0, 16)
    c = col + tl.arange(0, 16)
    tl.store(AI + (t.to(tl.int64)[:, None] * H + i_h) * 64 + c[None, :], x.to(AI.dtype.element_ty),
             mask=(t < T)[:, None])


@triton.jit
def _wy_inverse_kernel(K, P, BETA, G0, G, AI, T, H: tl.constexpr, DK: tl.constexpr, DOT: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row = i_t * 64
    K += i_b.to(tl.int64) * T * H * DK
    P += i_b.to(tl.int64) * T * H * DK
    BETA += i_b.to(tl.int64) * T * H
    G0 += i_b.to(tl.int64) * T * H
    G += i_b.to(tl.int64) * T * H
    AI += i_b.to(tl.int64) * T * H * 64

    pb1, k1, g01, g1 = _rows(K, P, BETA, G0, G, row, T, i_h, H, DK)
    pb2, k2, g02, g2 = _rows(K, P, BETA, G0, G, row + 16, T, i_h, H, DK)
    pb3, k3, g03, g3 = _rows(K, P, BETA, G0, G, row + 32, T, i_h, H, DK)
    pb4, k4, g04, g4 = _rows(K, P, BETA, G0, G, row + 48, T, i_h, H, DK)

    x11 = _unit_lower_inverse(_m_block(pb1, g01, k1, g1, True, DOT), DOT)
    x22 = _unit_lower_inverse(_m_block(pb2, g02, k2, g2, True, DOT), DOT)
    x33 = _unit_lower_inverse(_m_block(pb3, g03, k3, g3, True, DOT), DOT)
    x44 = _unit_lower_inverse(_m_block(pb4, g04, k4, g4, True, DOT), DOT)
    m21 = _m_block(pb2, g02, k1, g1, False, DOT)
    m31 = _m_block(pb3, g03, k1, g1, False, DOT)
    m32 = _m_block(pb3, g03, k2, g2, False, DOT)
    m41 = _m_block(pb4, g04, k1, g1, False, DOT)
    m42 = _m_block(pb4, g04, k2, g2, False, DOT)
    m43 = _m_block(pb4, g04, k3, g3, False, DOT)

    # block forward substitution: x_ij = −x_ii Σ_{j≤l<i} m_il x_lj
    x21 = -tl.dot(x22, tl.dot(m21, x11, input_precision=DOT), input_precision=DOT)
    x32 = -tl.dot(x33, tl.dot(m32, x22, input_precision=DOT), input_precision=DOT)
    x43 = -tl.dot(x44, tl.dot(m43, x33, input_precision=DOT), input_precision=DOT)
    x31 = -tl.dot(x33, tl.dot(m31, x11, input_precision=DOT) + tl.dot(m32, x21, input_precision=DOT),
                  input_precision=DOT)
    x42 = -tl.dot(x44, tl.dot(m42, x22, input_precision=DOT) + tl.dot(m43, x32, input_precision=DOT),
                  input_precision=DOT)
    x41 = -tl.dot(x44, tl.dot(m41, x11, input_precision=DOT) + tl.dot(m42, x21, input_precision=DOT)
                  + tl.dot(m43, x31, input_precision=DOT), input_precision=DOT)

    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store(AI, x11, row, 0, T, i_h, H)
    _store(AI, zero, row, 16, T, i_h, H)
    _store(AI, zero, row, 32, T, i_h, H)
    _store(AI, zero, row, 48, T, i_h, H)
    _store(AI, x21, row + 16, 0, T, i_h, H)
    _store(AI, x22, row + 16, 16, T, i_h, H)
    _store(AI, zero, row + 16, 32, T, i_h, H)
    _store(AI, zero, row + 16, 48, T, i_h, H)
    _store(AI, x31, row + 32, 0, T, i_h, H)
    _store(AI, x32, row + 32, 16, T, i_h, H)
    _store(AI, x33, row + 32, 32, T, i_h, H)
    _store(AI, zero, row + 32, 48, T, i_h, H)
    _store(AI, x41, row + 48, 0, T, i_h, H)
    _store(AI, x42, row + 48, 16, T, i_h, H)
    _store(AI, x43, row + 48, 32, T, i_h, H)
    _store(AI, x44, row + 48, 48, T, i_h, H)


def wy_inverse(k: torch.Tensor, p: torch.Tensor, beta: torch.Tensor, g0: torch.Tensor, g: torch.Tensor
               ) -> torch.Tensor:
    """k, p [B,T,H,K], β [B,T,H], γ⁰ and γ [B,T,H] fp32 (fla's per-chunk exclusive and inclusive cumsums of the
    log decay, in log2 units) → (I + M)⁻¹ [B,T,H,64] in k's dtype, fla's layout for ``recompute_w_u_fwd``."""
    B, T, H, DK = k.shape
    if DK & (DK - 1) or DK < 16:
        raise ValueError(f"wy_inverse (Triton): head_dim={DK} must be a power of two ≥ 16")
    k, p, beta, g0, g = (x.contiguous() for x in (k, p, beta, g0, g))
    out = torch.empty(B, T, H, CHUNK, dtype=k.dtype, device=k.device)
    _wy_inverse_kernel[(triton.cdiv(T, CHUNK), B * H)](k, p, beta, g0, g, out, T, H, DK, **WY_TILE)
    return out
