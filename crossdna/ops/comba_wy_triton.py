"""Comba's chunk-local WY form as one Triton kernel: the fused counterpart of :func:`crossdna.ops.comba.wy_form`,
replacing fla's ``chunk_scaled_dot_comba_pkt_fwd`` + ``solve_tril`` + ``recompute_w_u_fwd`` in the forward.

Per chunk of 64 tokens and head, M[t,s] = β_t (p_t·k_s) 2^{γ⁰_t − γ_s} for s < t; the kernel writes (I + M)⁻¹
(which fla's backward takes) and the WY vectors w = (I + M)⁻¹ diag(β 2^{γ⁰}) P and u = (I + M)⁻¹ diag(β) V. fla
builds M in one kernel, writes it in fp32, zero-fills the output and inverts in a second kernel whose 16×16
diagonal blocks are solved row by row (15 dependent steps, each a global load and a cross-lane reduction): at
B = 150 on an H200 that pair took 0.94 ms per call, 7× the bytes it moves; a third kernel reads the inverse back
for w and u. Here one program per chunk and head holds M and its inverse in registers, as whole 64×64 tiles:

* M is one [64, K]·[K, 64] dot;
* the inverse by block forward substitution with doubling blocks: if X inverts I + M's b×b diagonal blocks,
  X − X·C·X inverts its 2b×2b ones (C: the lower-left b×b block of each). From 1×1 blocks (X = I, so the 2×2
  inverse is I − C) five levels of two dots each reach the whole chunk, the three inside the 16×16 diagonal
  blocks as batched [4, 16, 16] dots. Every factor is an inverse block or a block of M (|m| ≤ 1), as in fla's
  merge, so the products' TF32 rounding stays at the TF32 level (per-chunk relative error ≤ 1.1e-3 on the 8.1M
  model's chr20 inputs; test_ops_comba_wy.py "aligned" keys). Not a power series such as
  (I − D)(I + D²)(I + D⁴)(I + D⁸), which this kernel used before 2026-12-04 in as many dots: once a layer's keys
  align (p is k up to its norm, β near 1), I + M is close to I + (all-ones strictly lower triangle), whose
  inverse is bidiagonal while the series' terms grow like binomial coefficients and cancel; with TF32 products
  the inverse was off by up to 10% per chunk already at initialisation on chr20, and bf16 training went NaN
  (docs/performance.md, Numerics);
* w and u are one dot each of the inverse, rounded to the input dtype first as fla's kernel reads the stored
  inverse (so the backward, which recomputes w and u from it, sees the forward's values);
* the inverse is exactly lower triangular, so the output needs no zero-fill; without gradients (the EMA teacher)
  it is not written at all.

The fp32 products of the inverse use ``DOT`` precision: "tf32", as in fla's own kernels (upstream's numerics).
With fp32 inputs the kernels round each product's operands to TF32 to nearest themselves (``_tf32``): given fp32
operands, the tensor cores truncate them, a one-signed error that products of products accumulate.
With half-precision inputs the inverse is rounded to bf16 for storage and for w and u, a coarser step than
TF32's. With fp32 inputs the exact product ("ieee") is not usable at these tiles: Triton computes it without tensor
cores and the 64×64 fp32 tiles spill (7.7 ms per call at 4 warps, 3.96 at 8, 48.5 at 2, against 0.46 in TF32).
At B = 150 on an H200, bf16 inputs, 4 warps, "tf32": 0.430 ms per call (147 registers; 0.792 ms with fp32
inputs), against 0.459 for the power-series kernel (0.437 without the inverse), 0.595 (0.500) for the kernel
before that, which built the inverse from sixteen 16×16 blocks at one warp (255 registers, spills:
latency-bound), and 1.16-1.19 ms for fla's three kernels. The same algebra on dense 64×64 tiles throughout
(the diagonal blocks' powers as 64×64 dots, 4× the products) took 0.567 (0.548); 8 warps 1.07, "tf32x3" 0.94.
``benchmarks/triton_tiles_bench.py`` sweeps the tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64                                  # fla's Comba chunk, which its other kernels assume
WY_TILE = {"num_warps": 4, "DOT": "tf32"}         # half-precision inputs; benchmarks/triton_tiles_bench.py sweeps it
WY_TILE_FP32 = {"num_warps": 4, "DOT": "tf32"}    # fp32 inputs (exact products spill: see above)


@triton.jit
def _chunk_rows(T, H: tl.constexpr):
    """The 64 tokens of this program's chunk (program 0) and head (program 1, with the batch): which of them exist
    (t < T) and their row offsets in [B, T, H, ·] tensors, in units of the last dim."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    t = i_t * 64 + tl.arange(0, 64)
    return t < T, ((i_bh // H).to(tl.int64) * T + t) * H + i_bh % H


@triton.jit
def _tf32(x, ROUND: tl.constexpr):
    """With ``ROUND``, fp32 x rounded to TF32 to nearest (ties away, as ``cvt.rna.tf32``); else x. A TF32 dot of fp32
    operands truncates them instead (the tensor cores ignore the low 13 mantissa bits): see the module docstring."""
    if ROUND:
        x = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _dot(a, b, DOT: tl.constexpr, ROUND: tl.constexpr):
    return tl.dot(_tf32(a, ROUND), _tf32(b, ROUND), input_precision=DOT)


@triton.jit
def _lower_left(r, b: tl.constexpr):
    """Of a matrix indexed by r × r, the entries in the lower-left b×b block of each 2b×2b diagonal block."""
    return ((r[:, None] // (2 * b)) == (r[None, :] // (2 * b))) & ((r[:, None] // b) > (r[None, :] // b))


@triton.jit
def _wy_form_kernel(K, P, V, BETA, G0, G, AI, W, U, T, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    STORE_INVERSE: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr):
    ok, off = _chunk_rows(T, H)
    c, cv, r = tl.arange(0, DK), tl.arange(0, DV), tl.arange(0, 64)

    k = tl.load(K + off[:, None] * DK + c[None, :], mask=ok[:, None], other=0.0)
    p = tl.load(P + off[:, None] * DK + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + off[:, None] * DV + cv[None, :], mask=ok[:, None], other=0.0)
    beta = tl.load(BETA + off, mask=ok, other=0.0).to(tl.float32)
    g0 = tl.load(G0 + off, mask=ok, other=0.0)
    g = tl.load(G + off, mask=ok, other=0.0)
    pb = p * beta[:, None]
    pg = (pb * tl.exp2(g0)[:, None]).to(k.dtype)
    vb = (v * beta[:, None]).to(v.dtype)

    # For s < t the exponent γ⁰_t − γ_s is ≤ 0 (decays). The others can overflow 2^x to inf: the upper triangle,
    # and the rows past T of a ragged last chunk (γ⁰ loaded as 0 there, against γ_s of −100s under Comba's strong
    # decays); their m is 0, but 0·inf is NaN, which the products then carry into every row. Capping the
    # exponent at 0 changes no kept entry.
    m = _dot(pb.to(k.dtype), tl.trans(k), DOT, ROUND) * tl.exp2(tl.minimum(g0[:, None] - g[None, :], 0.0))
    m = tl.where(r[:, None] > r[None, :], m, 0.0)

    # The inverse by block forward substitution, doubling the block size: with X the inverse of I + M's b×b
    # diagonal blocks, that of its 2b×2b ones is X − X·C·X, C the lower-left b×b block of each 2b block. Every
    # product is of bounded factors (inverse blocks and M's entries, |m| ≤ 1), as in fla's solve_tril; see the
    # module docstring for the power series this replaces. First within the 16×16 diagonal blocks, as batched
    # [4, 16, 16] dots (for b = 1 the blocks' inverses are 1, so X₂ = I − C), then across them on 64×64 tiles.
    blocks = tl.arange(0, 4)
    on_diagonal = (blocks[:, None, None, None] == blocks[None, None, :, None])
    d = tl.sum(tl.where(on_diagonal, tl.reshape(m, [4, 16, 4, 16]), 0.0), axis=2)  # [4, 16, 16]: the blocks
    r16 = tl.arange(0, 16)
    x = tl.where(r16[:, None] == r16[None, :], 1.0, 0.0)[None, :, :] - tl.where(_lower_left(r16, 1), d, 0.0)
    for level in tl.static_range(1, 4):
        x -= _dot(_dot(x, tl.where(_lower_left(r16, 1 << level), d, 0.0), DOT, ROUND), x, DOT, ROUND)
    x = tl.reshape(tl.where(on_diagonal, tl.expand_dims(x, 2), 0.0), [64, 64])
    for level in tl.static_range(4, 6):
        x -= _dot(_dot(x, tl.where(_lower_left(r, 1 << level), m, 0.0), DOT, ROUND), x, DOT, ROUND)
    inverse = x.to(k.dtype)

    # w and u from the inverse rounded to the input dtype, as fla's backward reads the stored inverse
    w = _dot(inverse, pg, DOT, ROUND)
    u = _dot(inverse.to(v.dtype), vb, DOT, ROUND)
    tl.store(W + off[:, None] * DK + c[None, :], w.to(W.dtype.element_ty), mask=ok[:, None])
    tl.store(U + off[:, None] * DV + cv[None, :], u.to(U.dtype.element_ty), mask=ok[:, None])
    if STORE_INVERSE:
        tl.store(AI + off[:, None] * 64 + r[None, :], inverse, mask=ok[:, None])


def _rounds(k: torch.Tensor, tile: dict) -> bool:
    """Whether the kernels round their operands to TF32 themselves (:func:`_tf32`): with fp32 inputs and TF32
    products. With half-precision inputs the inverse's products stay truncated: the inputs' own rounding is coarser,
    and the benchmarked bf16 path keeps its code."""
    return k.dtype == torch.float32 and tile["DOT"] == "tf32"


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
                                                     STORE_INVERSE=keep_inverse, ROUND=_rounds(k, tile), **tile)
    return inverse, w, u


# ----------------------------------------------------------------------------------------------------- backward
WY_BWD_TILE = {"num_warps": 4, "DOT": "tf32"}       # half-precision inputs; triton_tiles_bench.py sweeps it
WY_BWD_TILE_FP32 = {"num_warps": 4, "DOT": "tf32"}  # fp32 inputs ("ieee" spills: 86 ms a call at 4 warps)


@triton.jit
def _wy_form_bwd_kernel(K, P, V, BETA, G0, G, AI, DW, DU, DK, DG, DV, DP, DBETA, T, H: tl.constexpr,
                        DK_: tl.constexpr, DV_: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr):
    # The order keeps few 64×64 tiles alive at once (at 4 warps a fp32 tile is 32 registers a thread): dA first,
    # then the triangle's gradient dS, which consumes it, then what needs dS, and last the products with Aᵀ, whose
    # operands are loaded again (from L2) rather than held.
    ok, off = _chunk_rows(T, H)
    c, cv, r = tl.arange(0, DK_), tl.arange(0, DV_), tl.arange(0, 64)
    lower = r[:, None] > r[None, :]
    at_k = off[:, None] * DK_ + c[None, :]
    at_v = off[:, None] * DV_ + cv[None, :]

    beta = tl.load(BETA + off, mask=ok, other=0.0).to(tl.float32)
    g0 = tl.load(G0 + off, mask=ok, other=0.0)
    g = tl.load(G + off, mask=ok, other=0.0)
    e0 = tl.exp2(g0)
    a = tl.load(AI + off[:, None] * 64 + r[None, :], mask=ok[:, None], other=0.0)   # (I + M)⁻¹, rows t
    dtype = a.dtype

    # w = A·diag(β 2^{γ⁰})P and u = A·diag(β)V: dA = dw·(β 2^{γ⁰} P)ᵀ + du·(βV)ᵀ
    p = tl.load(P + at_k, mask=ok[:, None], other=0.0)
    d_a = _dot(tl.load(DW + at_k, mask=ok[:, None], other=0.0), tl.trans((p * (beta * e0)[:, None]).to(dtype)),
               DOT, ROUND)
    v = tl.load(V + at_v, mask=ok[:, None], other=0.0)
    d_a = tl.dot(_tf32(tl.load(DU + at_v, mask=ok[:, None], other=0.0), ROUND),
                 _tf32(tl.trans((v * beta[:, None]).to(dtype)), ROUND), d_a, input_precision=DOT)

    # A = (I + M)⁻¹ with M strictly lower: dM = −Aᵀ dA Aᵀ on the strict lower triangle; then through
    # M[t,s] = β_t (p_t·k_s) 2^{γ⁰_t − γ_s} (the exponent capped at 0 as in the forward: only kept entries count)
    d_a = tl.where(lower, d_a, 0.0).to(dtype)
    d_m = _dot(tl.trans(a), _dot(d_a, tl.trans(a), DOT, ROUND).to(dtype), DOT, ROUND)
    d_s = tl.where(lower, -d_m * tl.exp2(tl.minimum(g0[:, None] - g[None, :], 0.0)), 0.0).to(dtype)
    k = tl.load(K + at_k, mask=ok[:, None], other=0.0)
    pb = (p * beta[:, None]).to(dtype)
    dk = tl.load(DK + at_k, mask=ok[:, None], other=0.0).to(tl.float32)
    dk = tl.dot(_tf32(tl.trans(d_s), ROUND), _tf32(pb, ROUND), dk, input_precision=DOT)
    tl.store(DK + at_k, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    # the decays: d(γ⁰_t) += Σ_s dM⊙M, d(γ_s) −= Σ_t dM⊙M
    dmm = d_s.to(tl.float32) * _dot(pb, tl.trans(k), DOT, ROUND)
    dg0 = tl.sum(dmm, 1)
    dgam = tl.load(DG + off, mask=ok, other=0.0) - tl.sum(dmm, 0)
    dpb = _dot(d_s, k, DOT, ROUND)

    # d(β 2^{γ⁰} P) = Aᵀdw and d(βV) = Aᵀdu
    p = p.to(tl.float32)
    dpg = _dot(tl.trans(a), tl.load(DW + at_k, mask=ok[:, None], other=0.0), DOT, ROUND)
    tl.store(DP + at_k, ((dpg * e0[:, None] + dpb) * beta[:, None]).to(DP.dtype.element_ty), mask=ok[:, None])
    dbeta = tl.sum((dpg * e0[:, None] + dpb) * p, 1)
    dg0 += tl.sum(dpg * p, 1) * beta * e0
    dvb = _dot(tl.trans(a), tl.load(DU + at_v, mask=ok[:, None], other=0.0), DOT, ROUND)
    tl.store(DV + at_v, (dvb * beta[:, None]).to(DV.dtype.element_ty), mask=ok[:, None])
    dbeta += tl.sum(dvb * v.to(tl.float32), 1)
    tl.store(DBETA + off, dbeta.to(DBETA.dtype.element_ty), mask=ok)

    # from the chunk's cumsums (γ inclusive, γ⁰ exclusive) back to the log decay g:
    # dg_s = Σ_{t≥s} dγ_t + Σ_{t>s} dγ⁰_t
    x = dgam + dg0
    tl.store(DG + off, tl.sum(x, 0) - tl.cumsum(x, 0) + dgam, mask=ok)


def wy_form_backward(k: torch.Tensor, p: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g0: torch.Tensor,
                     g: torch.Tensor, inverse: torch.Tensor, dw: torch.Tensor, du: torch.Tensor, dk: torch.Tensor,
                     dg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`wy_form` from the gradients of w and u, folded into the rest of Comba's backward:
    ``dk`` (k's gradient so far) gains the WY form's share, and ``dg`` (fp32, the gradient of the inclusive cumsum
    γ) becomes the gradient of the log decay g itself (through both cumsums), both in place → (dv, dp, dβ).

    fla's ``prepare_wy_repr_bwd`` computes the same products (here they stay in registers: fla writes dp and reads
    it back) and then needs three more passes: dk += its dk, dg += its dγ, and two chunk-local cumsum kernels."""
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    for name, x in (("dk", dk), ("dg", dg)):
        if not x.is_contiguous():
            raise ValueError(f"wy_form_backward: {name} is updated in place and must be contiguous")
    if dg.dtype != torch.float32:
        raise ValueError(f"wy_form_backward: dg must be fp32, got {dg.dtype}")
    k, p, v, beta, g0, g, inverse, dw, du = (x.contiguous() for x in (k, p, v, beta, g0, g, inverse, dw, du))
    dv, dp, dbeta = torch.empty_like(v), torch.empty_like(p), torch.empty_like(beta)
    tile = WY_BWD_TILE_FP32 if k.dtype == torch.float32 else WY_BWD_TILE
    if k.dtype != torch.float32 and min(DK, DV) < 64:
        # Triton 3.6 on an H200 miscompiles this kernel in bf16 at 4 warps with head dims of 16 or 32 (dv and dβ
        # wrong by 80%, once an illegal address), not at 64; the interpreter and 8 warps are right
        tile = {**tile, "num_warps": 8}
    _wy_form_bwd_kernel[(triton.cdiv(T, CHUNK), B * H)](k, p, v, beta, g0, g, inverse, dw, du, dk, dg, dv, dp,
                                                        dbeta, T, H, DK, DV, ROUND=_rounds(k, tile), **tile)
    return dv, dp, dbeta
