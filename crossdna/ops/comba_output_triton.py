"""Comba's chunk recurrence and output as one Triton kernel, replacing fla's ``chunk_gated_delta_rule_fwd_h`` +
``chunk_fwd_o`` in the forward.

From the WY form (w, u: :mod:`crossdna.ops.comba_wy_triton`) the forward of chunk n, with the state S before it
(K × V, fp32), γ the inclusive log2 decay inside the chunk and γ_L its last row's:

    v_new = u − w·S;   o = scale·(diag(2^γ)·q·S + tril(q·kᵀ ⊙ 2^{γ_t − γ_s})·v_new);
    S ← 2^{γ_L}·S + kᵀ·diag(2^{γ_L − γ})·v_new.

fla runs this as two kernels: the first walks the chunks of each sequence, writing every chunk's state S (bf16,
K·V per chunk and head) and v_new; the second reads them back for o. Here one program per sequence, head and
block of V walks the chunks and writes o alone: nothing else is read back, and the backward (fla's, which
recomputes S and v_new itself) is unchanged. The products round S and v_new to the input dtype exactly where
fla's stored copies are, so in half precision the outputs are fla's up to summation order; fp32 inputs (the
faithful precision) take exact fp32 products where fla's take TF32. On an H200 at B = 150, T = 1024, 8 heads of 64
in bf16: 0.219 ms against fla's 0.455 ms for the two (byte floor 0.187 ms;
benchmarks/results/triton_tiles_h200_state_output.json).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

STATE_TILE = {"BV": 64, "num_warps": 4}      # V columns of the state per program


@triton.jit
def _state_output_kernel(Q, K, W, U, G, O, T, scale, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BV: tl.constexpr, DOT: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ck, cv = tl.arange(0, DK), i_v * BV + tl.arange(0, BV)
    r = tl.arange(0, 64)                     # fla's Comba chunk: γ restarts every 64 tokens
    state = tl.zeros([DK, BV], dtype=tl.float32)
    for i_t in range(tl.cdiv(T, 64)):
        t = i_t * 64 + r
        ok = t < T
        tok = (i_b.to(tl.int64) * T + t) * H + i_h
        q = tl.load(Q + tok[:, None] * DK + ck[None, :], mask=ok[:, None], other=0.0)
        k = tl.load(K + tok[:, None] * DK + ck[None, :], mask=ok[:, None], other=0.0)
        w = tl.load(W + tok[:, None] * DK + ck[None, :], mask=ok[:, None], other=0.0)
        u = tl.load(U + tok[:, None] * DV + cv[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        g = tl.load(G + tok, mask=ok, other=0.0)
        s = state.to(q.dtype)
        v_new = u - tl.dot(w, s, input_precision=DOT)
        # the exponent of a kept pair is ≤ 0; where() drops the others (inf above the diagonal and past T)
        a = tl.dot(q, tl.trans(k), input_precision=DOT)
        a = tl.where((r[:, None] >= r[None, :]) & ok[None, :], a * tl.exp2(g[:, None] - g[None, :]), 0.0)
        vs = v_new.to(U.dtype.element_ty)                  # what fla stores and its output kernel reads back
        o = (tl.dot(q, s, input_precision=DOT) * tl.exp2(g)[:, None]
             + tl.dot(a.to(vs.dtype), vs, input_precision=DOT))
        tl.store(O + tok[:, None] * DV + cv[None, :], (o * scale).to(O.dtype.element_ty), mask=ok[:, None])
        g_last = tl.load(G + (i_b.to(tl.int64) * T + tl.minimum(i_t * 64 + 63, T - 1)) * H + i_h)
        decayed = tl.where(ok, tl.exp2(g_last - g), 0.0)[:, None] * v_new
        state = state * tl.exp2(g_last) + tl.dot(tl.trans(k), decayed.to(k.dtype), input_precision=DOT)


def state_output(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, g: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q, k, w [B,T,H,K], u [B,T,H,V] (the WY form's), γ [B,T,H] fp32 (fla's per-chunk inclusive cumsum of the
    log decay, log2 units) → o [B,T,H,V] in u's dtype, with no initial state."""
    B, T, H, DK = q.shape
    DV = u.shape[-1]
    for name, d in (("head_dim", DK), ("head_v_dim", DV)):
        if d & (d - 1) or d < 16:
            raise ValueError(f"state_output (Triton): {name}={d} must be a power of two ≥ 16")
    q, k, w, u, g = (x.contiguous() for x in (q, k, w, u, g))
    o = torch.empty_like(u)
    bv = min(STATE_TILE["BV"], DV)
    _state_output_kernel[(triton.cdiv(DV, bv), B * H)](q, k, w, u, g, o, T, scale, H, DK, DV, BV=bv,
                                                        DOT="ieee" if q.dtype == torch.float32 else "tf32",
                                                        num_warps=STATE_TILE["num_warps"])
    return o
