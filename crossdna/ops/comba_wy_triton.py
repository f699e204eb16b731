"""Comba's chunk-local WY form as one Triton kernel: the fused counterpart of :func:`crossdna.ops.comba.wy_form`,
replacing fla's ``chunk_scaled_dot_comba_pkt_fwd`` + ``solve_tril`` + ``recompute_w_u_fwd`` in the forward.

Per chunk of 64 tokens and head, M[t,s] = β_t (p_t·k_s) 2^{γ⁰_t − γ_s} for s < t; the kernel writes (I + M)⁻¹
(which fla's backward takes) and the WY vectors w = (I + M)⁻¹ diag(β 2^{γ⁰}) P and u = (I + M)⁻¹ diag(β) V. fla
builds M in one kernel, writes it in fp32, zero-fills the output and inverts in a second kernel whose 16×16
diagonal blocks are solved row by row (15 dependent steps, each a global load and a cross-lane reduction): at
B = 150 on an H200 that pair took 0.94 ms per call, 7× the bytes it moves; a third kernel reads the inverse back
for w and u. Here M and its inverse never leave registers:

* the ten 16×16 blocks on and below the diagonal are ten dots of [16, K]·[K, 16];
* a diagonal block N is strictly lower triangular, so N¹⁶ = 0 and (I + N)⁻¹ = (I − N)(I + N²)(I + N⁴)(I + N⁸):
  six dots instead of a serial substitution;
* the off-diagonal blocks of the inverse follow by block forward substitution (as fla's merge), sixteen dots;
* w and u are twenty dots of the inverse's blocks, rounded to the input dtype first as fla's kernel reads the
  stored inverse (so the backward, which recomputes w and u from it, sees the forward's values);
* the upper blocks of the inverse are written as zeros, so the output needs no zero-fill; without gradients
  (the EMA teacher) the inverse is not written at all.

The 16×16 fp32 dots of the inverse use ``DOT`` precision. With half-precision inputs that is "tf32", as in fla's
own kernels: the inverse is rounded to bf16 for storage and for w and u, a coarser step than TF32's; with fp32
inputs (the faithful precision) "ieee", the exact fp32 product. Tiles from ``benchmarks/triton_tiles_bench.py``
at B = 150 on an H200, bf16 (`benchmarks/results/triton_tiles_h200_wy_form.json`): 0.595 ms per call at 1 warp
and "tf32" (2 warps: 0.597), against 1.009 ms at the first tile (2 warps, "ieee") and 1.19 ms for fla's three
kernels; "tf32x3" gave 0.769. Every tile takes ≥ 215 registers per thread, which caps occupancy at 8 warps per
SM: the kernel is latency-bound, at 2.6× its byte floor. Loading each 16-row block where it is used instead of
once (fewer live registers on paper) was slower (0.626 ms): the compiler hoists the loads and spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64                                  # fla's Comba chunk, which its other kernels assume
WY_TILE = {"num_warps": 1, "DOT": "tf32"}         # half-precision inputs; benchmarks/triton_tiles_bench.py sweeps it
WY_TILE_FP32 = {"num_warps": 2, "DOT": "ieee"}    # fp32 inputs: exact products (1.01 ms; 1 warp took 1.87)


@triton.jit
def _rows(K, P, V, BETA, G0, G, row, T, i_h, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """One 16-token block: β·p and β·2^{γ⁰}·p [16, DK], k [16, DK], β·v [16, DV] (input dtype), γ⁰ and γ [16]
    (log2 units, fp32)."""
    t = row + tl.arange(0, 16)
    ok = t < T
    c, cv = tl.arange(0, DK), tl.arange(0, DV)
    off = t.to(tl.int64) * H + i_h
    k = tl.load(K + off[:, None] * DK + c[None, :], mask=ok[:, None], other=0.0)
    p = tl.load(P + off[:, None] * DK + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + off[:, None] * DV + cv[None, :], mask=ok[:, None], other=0.0)
    beta = tl.load(BETA + off, mask=ok, other=0.0).to(tl.float32)
    g0 = tl.load(G0 + off, mask=ok, other=0.0)
    g = tl.load(G + off, mask=ok, other=0.0)
    pb = p * beta[:, None]
    return (pb.to(k.dtype), (pb * tl.exp2(g0)[:, None]).to(k.dtype), k, (v * beta[:, None]).to(v.dtype), g0, g)


@triton.jit
def _m_block(pb, g0, k, g, DIAG: tl.constexpr, DOT: tl.constexpr):
    """M's block of one row block (pb, g0) and one column block (k, g); on the diagonal only s < t is kept."""
    m = tl.dot(pb, tl.trans(k), input_precision=DOT)
    # For s < t the exponent γ⁰_t − γ_s is ≤ 0 (decays). The others can overflow 2^x to inf: the upper triangle,
    # and the rows past T of a ragged last chunk (γ⁰ loaded as 0 there, against γ_s of −100s under Comba's strong
    # decays); their m is 0, but 0·inf is NaN, which the block products then carry into every row. Capping the
    # exponent at 0 changes no kept entry.
    decay = tl.exp2(tl.minimum(g0[:, None] - g[None, :], 0.0))
    if DIAG:
        r = tl.arange(0, 16)
        return tl.where(r[:, None] > r[None, :], m * decay, 0.0)
    return m * decay


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
def _wu(x, pg, vb, w, u, DOT: tl.constexpr):
    """w += x·(β 2^{γ⁰} P)_block, u += x·(β V)_block for one block x of the inverse."""
    x = x.to(vb.dtype)
    return w + tl.dot(x, pg, input_precision=DOT), u + tl.dot(x, vb, input_precision=DOT)


@triton.jit
def _store(OUT, x, row, col: tl.constexpr, width: tl.constexpr, T, i_h, H: tl.constexpr):
    """A [16, n] block into rows row..row+15 and columns col..col+n−1 of a [T, H, width] tensor."""
    t = row + tl.arange(0, 16)
    c = col + tl.arange(0, x.shape[1])
    tl.store(OUT + (t.to(tl.int64)[:, None] * H + i_h) * width + c[None, :], x.to(OUT.dtype.element_ty),
             mask=(t < T)[:, None])


@triton.jit
def _store_inverse_row(AI, x1, x2, x3, x4, row, T, i_h, H: tl.constexpr):
    """Rows row..row+15 of the inverse [T, H, 64], as its four 16×16 blocks."""
    _store(AI, x1, row, 0, 64, T, i_h, H)
    _store(AI, x2, row, 16, 64, T, i_h, H)
    _store(AI, x3, row, 32, 64, T, i_h, H)
    _store(AI, x4, row, 48, 64, T, i_h, H)


@triton.jit
def _wy_form_kernel(K, P, V, BETA, G0, G, AI, W, U, T, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    STORE_INVERSE: tl.constexpr, DOT: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row = i_t * 64
    tokens = i_b.to(tl.int64) * T * H
    K += tokens * DK
    P += tokens * DK
    W += tokens * DK
    V += tokens * DV
    U += tokens * DV
    BETA += tokens
    G0 += tokens
    G += tokens

    pb1, pg1, k1, vb1, g01, g1 = _rows(K, P, V, BETA, G0, G, row, T, i_h, H, DK, DV)
    pb2, pg2, k2, vb2, g02, g2 = _rows(K, P, V, BETA, G0, G, row + 16, T, i_h, H, DK, DV)
    pb3, pg3, k3, vb3, g03, g3 = _rows(K, P, V, BETA, G0, G, row + 32, T, i_h, H, DK, DV)
    pb4, pg4, k4, vb4, g04, g4 = _rows(K, P, V, BETA, G0, G, row + 48, T, i_h, H, DK, DV)

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

    w0 = tl.zeros([16, DK], dtype=tl.float32)
    u0 = tl.zeros([16, DV], dtype=tl.float32)
    w, u = _wu(x11, pg1, vb1, w0, u0, DOT)
    _store(W, w, row, 0, DK, T, i_h, H)
    _store(U, u, row, 0, DV, T, i_h, H)
    w, u = _wu(x21, pg1, vb1, w0, u0, DOT)
    w, u = _wu(x22, pg2, vb2, w, u, DOT)
    _store(W, w, row + 16, 0, DK, T, i_h, H)
    _store(U, u, row + 16, 0, DV, T, i_h, H)
    w, u = _wu(x31, pg1, vb1, w0, u0, DOT)
    w, u = _wu(x32, pg2, vb2, w, u, DOT)
    w, u = _wu(x33, pg3, vb3, w, u, DOT)
    _store(W, w, row + 32, 0, DK, T, i_h, H)
    _store(U, u, row + 32, 0, DV, T, i_h, H)
    w, u = _wu(x41, pg1, vb1, w0, u0, DOT)
    w, u = _wu(x42, pg2, vb2, w, u, DOT)
    w, u = _wu(x43, pg3, vb3, w, u, DOT)
    w, u = _wu(x44, pg4, vb4, w, u, DOT)
    _store(W, w, row + 48, 0, DK, T, i_h, H)
    _store(U, u, row + 48, 0, DV, T, i_h, H)

    if STORE_INVERSE:
        AI += tokens * 64
        zero = tl.zeros([16, 16], dtype=tl.float32)
        _store_inverse_row(AI, x11, zero, zero, zero, row, T, i_h, H)
        _store_inverse_row(AI, x21, x22, zero, zero, row + 16, T, i_h, H)
        _store_inverse_row(AI, x31, x32, x33, zero, row + 32, T, i_h, H)
        _store_inverse_row(AI, x41, x42, x43, x44, row + 48, T, i_h, H)


def wy_form(k: torch.Tensor, p: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g0: torch.Tensor,
            g: torch.Tensor, keep_inverse: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """k, p [B,T,H,K], v [B,T,H,V], β [B,T,H], γ⁰ and γ [B,T,H] fp32 (fla's per-chunk exclusive and inclusive
    cumsums of the log decay, in log2 units) → ((I + M)⁻¹ [B,T,H,64] in k's dtype (fla's layout, None unless
    ``keep_inverse``), w [B,T,H,K] in k's dtype, u [B,T,H,V] in v's dtype)."""
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    for name, d in (("head_dim", DK), ("head_v_dim", DV)):
        if d & (d - 1) or d < 16:
            raise ValueError(f"wy_form (Triton): {name}={d} must be a power of two ≥ 16")
    k, p, v, beta, g0, g = (x.contiguous() for x in (k, p, v, beta, g0, g))
    inverse = torch.empty(B, T, H, CHUNK, dtype=k.dtype, device=k.device) if keep_inverse else None
    w, u = torch.empty_like(k), torch.empty_like(v)
    tile = WY_TILE_FP32 if k.dtype == torch.float32 else WY_TILE
    _wy_form_kernel[(triton.cdiv(T, CHUNK), B * H)](k, p, v, beta, g0, g, inverse, w, u, T, H, DK, DV,
                                                     STORE_INVERSE=keep_inverse, **tile)
    return inverse, w, u
