"""Comba's input stage as two Triton kernels: the fused counterpart of :func:`crossdna.ops.comba.comba_inputs`.

Forward, per token and head, in one pass over the projections: the three causal depthwise convolutions, SiLU,
p = σ(decay)·k̃, q̂ = q̃ − D·p and the L2 norms of q̂, k̃, p; it reads q, k, v once and writes the four kernel inputs
once. Compiled, the same math took four inductor kernels, a materialised pad and three of fla's L2-norm passes
(forward and backward) per layer.

Backward, two kernels: the first recomputes the forward from the saved projections (the only saved tensors) and
applies the per-token chain L2 norm → correction → SiLU, writing the gradient at the conv outputs; the second is
the transposed convolution, which needs that gradient at the K − 1 following tokens, hence the split (a single
kernel that recomputed the chain at each of the K shifts measured 7.3 ms per call at B = 150, 23× its byte
floor). The convolution-weight, D and σ(decay) gradients are summed per program and the partial sums added up in
PyTorch.

Wrapped as ``torch.library`` custom ops with a registered autograd formula, so ``torch.compile`` keeps them as one
opaque call each (no graph break) and CUDA graphs capture them (no host work).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The op namespace follows the module's name: an HF export carries a flat copy of this module, and both copies can
# be imported into one process.
_NS = __name__.replace(".", "_")
# Tile shapes, chosen by benchmarks/triton_tiles_bench.py on an H200 at B = 150
# (results/triton_tiles_h200_comba_inputs.json).
FWD_TILE = {"BT": 16, "num_warps": 2}                 # tokens per program, one head
CHAIN_TILE = {"BT": 32, "num_warps": 2}               # the backward's per-token chain: tokens per program
CONV_TILE = {"BT": 16, "BC": 128, "num_warps": 2}     # the conv backward: tokens per tile, channels per program
_T_SPLIT = 256    # tokens per conv-backward program (its tiles run in a loop and share one partial sum)


@triton.jit
def _conv_silu(X, W, row0, t, T, stride_t, ch, KC: tl.constexpr):
    """y = Σ_j w[ch, j]·x[t − KC + 1 + j, ch] (zero before the sequence start) → (SiLU(y), y), fp32 [BT, C]."""
    y = tl.zeros([t.shape[0], ch.shape[0]], dtype=tl.float32)
    for j in tl.static_range(KC):
        src = t - (KC - 1) + j
        ok = (src >= 0) & (src < T)
        x = tl.load(X + row0 + src[:, None] * stride_t + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        y += x * tl.load(W + ch * KC + j)[None, :]
    return y * tl.sigmoid(y), y


@triton.jit
def _inputs_fwd_kernel(X, W, SD, DC, Q, K, V, P, T, stride_b, stride_t,
                       H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr,
                       EPS: tl.constexpr):
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    ck, cv = tl.arange(0, DK), tl.arange(0, DV)
    row0 = i_b.to(tl.int64) * stride_b
    ok = (t < T)[:, None]
    tok = (i_b.to(tl.int64) * T + t) * H + i_h                     # outputs are [B, T, H, D] contiguous
    out_k = tok[:, None] * DK + ck[None, :]
    # one tensor at a time, each stored as soon as it is final, so that few [BT, D] tiles are live at once (all
    # three convs first spilled registers at every tile); p = σ(decay)·k̃ shares k̃'s sum of squares
    k, _ = _conv_silu(X, W, row0, t, T, stride_t, H * DK + i_h * DK + ck, KC)
    sd = tl.load(SD + i_h)
    kk = tl.sum(k * k, axis=1)[:, None]
    tl.store(K + out_k, (k * tl.rsqrt(kk + EPS)).to(K.dtype.element_ty), mask=ok)
    tl.store(P + out_k, (k * (sd * tl.rsqrt(sd * sd * kk + EPS))).to(P.dtype.element_ty), mask=ok)
    q, _ = _conv_silu(X, W, row0, t, T, stride_t, i_h * DK + ck, KC)
    q = q - (tl.load(DC + i_h) * sd) * k
    tl.store(Q + out_k, (q * tl.rsqrt(tl.sum(q * q, axis=1) + EPS)[:, None]).to(Q.dtype.element_ty), mask=ok)
    v, _ = _conv_silu(X, W, row0, t, T, stride_t, 2 * H * DK + i_h * DV + cv, KC)
    tl.store(V + tok[:, None] * DV + cv[None, :], v.to(V.dtype.element_ty), mask=ok)


@triton.jit
def _l2_bwd(x, g, EPS: tl.constexpr):
    """x̂ = x / √(‖x‖² + eps) per row; from dL/dx̂ = g, return dL/dx."""
    r = tl.rsqrt(tl.sum(x * x, axis=1) + EPS)[:, None]
    xn = x * r
    return r * (g - xn * tl.sum(g * xn, axis=1)[:, None])


@triton.jit
def _inputs_chain_bwd_kernel(X, W, SD, DC, GQ, GK, GV, GP, DY, DSD, DDC, T, stride_b, stride_t,
                             H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr,
                             BT: tl.constexpr, EPS: tl.constexpr):
    """Recompute the forward at a tile of tokens, apply the chain L2 norm → correction → SiLU and store the
    gradient at the conv outputs (before SiLU) of q, k, v in DY [B, T, C]; the tile's sums of the D and σ(decay)
    gradients go to DDC, DSD [B · tiles, H]."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    ck, cv = tl.arange(0, DK), tl.arange(0, DV)
    chq, chk, chv = i_h * DK + ck, H * DK + i_h * DK + ck, 2 * H * DK + i_h * DV + cv
    C: tl.constexpr = H * (2 * DK + DV)
    row0 = i_b.to(tl.int64) * stride_b
    sd, dc = tl.load(SD + i_h), tl.load(DC + i_h)
    ok = (t < T)[:, None]
    tok = (i_b.to(tl.int64) * T + t) * H + i_h
    g_k = tok[:, None] * DK + ck[None, :]
    dy_row = (i_b.to(tl.int64) * T + t)[:, None] * C
    # k's norms first, then q's, then v: few [BT, D] tiles live at once (as in the forward). p = σ(decay)·k̃ shares
    # k̃'s sum of squares, and its gradient is folded into k's before q is touched:
    # dk = dk̂-path + sd·dp with dp = dp̂-path − D·dq̂-path, so dk = (dk̂-path + sd·dp̂-path) − sd·D·dq̂-path.
    sk, yk = _conv_silu(X, W, row0, t, T, stride_t, chk, KC)
    kk = tl.sum(sk * sk, axis=1)[:, None]
    rk, rp = tl.rsqrt(kk + EPS), tl.rsqrt(sd * sd * kk + EPS)
    gk = tl.load(GK + g_k, mask=ok, other=0.0).to(tl.float32)
    gp = tl.load(GP + g_k, mask=ok, other=0.0).to(tl.float32)
    # L2 backward, x̂ = x·r: dx = r·(g − x̂·Σ g·x̂); for p = sd·k̃ (r = rp) written in k̃
    dp = rp * (gp - (sd * sd * rp * rp) * sk * tl.sum(gp * sk, axis=1)[:, None])
    dk = rk * (gk - (rk * rk) * sk * tl.sum(gk * sk, axis=1)[:, None]) + sd * dp
    dsd = tl.sum(tl.sum(dp * sk, axis=1), axis=0)
    sq, yq = _conv_silu(X, W, row0, t, T, stride_t, chq, KC)
    dqh = _l2_bwd(sq - (dc * sd) * sk, tl.load(GQ + g_k, mask=ok, other=0.0).to(tl.float32), EPS)
    s = tl.sigmoid(yq)                                   # SiLU'(y) = σ(y)·(1 + y·(1 − σ(y)))
    tl.store(DY + dy_row + chq[None, :], (dqh * s * (1 + yq * (1 - s))).to(DY.dtype.element_ty), mask=ok)
    dqk = tl.sum(tl.sum(dqh * sk, axis=1), axis=0)
    part = i_b * tl.num_programs(0) + i_t
    tl.store(DDC + part * H + i_h, -sd * dqk)            # q̂ = q̃ − D·p
    tl.store(DSD + part * H + i_h, dsd - dc * dqk)
    dk = dk - (sd * dc) * dqh
    s = tl.sigmoid(yk)
    tl.store(DY + dy_row + chk[None, :], (dk * s * (1 + yk * (1 - s))).to(DY.dtype.element_ty), mask=ok)
    _, yv = _conv_silu(X, W, row0, t, T, stride_t, chv, KC)
    gv = tl.load(GV + tok[:, None] * DV + cv[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(yv)
    tl.store(DY + dy_row + chv[None, :], (gv * s * (1 + yv * (1 - s))).to(DY.dtype.element_ty), mask=ok)


@triton.jit
def _inputs_conv_bwd_kernel(X, W, DY, DX, DW, T, stride_b, stride_t,
                            C: tl.constexpr, KC: tl.constexpr, KCP: tl.constexpr, BT: tl.constexpr,
                            BC: tl.constexpr, TS: tl.constexpr):
    """The causal depthwise conv's backward over TS tokens × BC channels: dx[t] = Σ_s w[KC − 1 − s]·dy[t + s]
    and this program's partial sum of dw[c, j] = Σ_t dy[t, c]·x[t − KC + 1 + j, c] (DW [B · splits, C, KC])."""
    i_s, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ch = i_c * BC + tl.arange(0, BC)
    cok = ch < C
    taps = tl.arange(0, KCP)
    row0 = i_b.to(tl.int64) * stride_b
    dy0 = i_b.to(tl.int64) * T * C
    # the gradient at the KC following tokens as one [BT, BC, KCP] gather, g[t, c, j] = dy[t + KC − 1 − j, c]:
    # dx[t] = Σ_j w[j]·g[t, j] and dw[j] = Σ_t g[t, j]·x[t] (the sum over t of dy[t]·x[t − KC + 1 + j], shifted);
    # the products accumulate per token and tap and the sum over tokens is taken once, at the end (a cross-warp
    # reduction per tile cost more than the loads)
    wt = tl.load(W + ch[:, None] * KC + taps[None, :], mask=cok[:, None] & (taps[None, :] < KC), other=0.0)
    acc = tl.zeros([BT, BC, KCP], dtype=tl.float32)
    for t0 in range(i_s * TS, tl.minimum(i_s * TS + TS, T), BT):
        t = t0 + tl.arange(0, BT)
        tok = (t < T)[:, None] & cok[None, :]
        x = tl.load(X + row0 + t[:, None] * stride_t + ch[None, :], mask=tok, other=0.0).to(tl.float32)
        dst = t[:, None] + (KC - 1) - taps[None, :]                                       # [BT, KCP]
        ok = (dst < T)[:, None, :] & cok[None, :, None] & (taps < KC)[None, None, :]
        g = tl.load(DY + dy0 + dst[:, None, :] * C + ch[None, :, None], mask=ok, other=0.0).to(tl.float32)
        acc += g * x[:, :, None]
        dx = tl.sum(g * wt[None, :, :], axis=2)
        tl.store(DX + dy0 + t[:, None] * C + ch[None, :], dx.to(DX.dtype.element_ty), mask=tok)
    part = i_b * tl.num_programs(0) + i_s
    tl.store(DW + part.to(tl.int64) * C * KC + ch[:, None] * KC + taps[None, :], tl.sum(acc, axis=0),
             mask=cok[:, None] & (taps[None, :] < KC))


def _check(qkv: torch.Tensor, weight: torch.Tensor, num_heads: int, head_v_dim: int) -> int:
    B, T, C = qkv.shape
    head_k = (C // num_heads - head_v_dim) // 2
    if num_heads * (2 * head_k + head_v_dim) != C or weight.shape[0] != C:
        raise ValueError(f"comba_inputs: {C} channels / weight {tuple(weight.shape)} do not split into "
                         f"{num_heads} heads of q, k (K) and v ({head_v_dim})")
    for name, d in (("head_dim", head_k), ("head_v_dim", head_v_dim)):
        if d & (d - 1):
            raise ValueError(f"comba_inputs (Triton): {name}={d} must be a power of two")
    if qkv.stride(-1) != 1:
        raise ValueError("comba_inputs (Triton): qkv's channel dimension must be contiguous")
    return head_k


@torch.library.custom_op(f"{_NS}::comba_inputs", mutates_args=())
def comba_inputs(qkv: torch.Tensor, weight: torch.Tensor, decay_gate: torch.Tensor, correction: torch.Tensor,
                 num_heads: int, head_v_dim: int, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`crossdna.ops.comba.comba_inputs` (weight [C, K_conv])."""
    head_k = _check(qkv, weight, num_heads, head_v_dim)
    B, T, _ = qkv.shape
    q, k, p = (qkv.new_empty(B, T, num_heads, head_k) for _ in range(3))
    v = qkv.new_empty(B, T, num_heads, head_v_dim)
    grid = (triton.cdiv(T, FWD_TILE["BT"]), num_heads, B)
    _inputs_fwd_kernel[grid](qkv, weight.float().contiguous(), decay_gate.float().contiguous(),
                      correction.float().contiguous(), q, k, v, p, T, qkv.stride(0), qkv.stride(1),
                      num_heads, head_k, head_v_dim, weight.shape[-1], EPS=eps, **FWD_TILE)
    return q, k, v, p


@comba_inputs.register_fake
def _(qkv, weight, decay_gate, correction, num_heads, head_v_dim, eps=1e-6):
    B, T, C = qkv.shape
    head_k = (C // num_heads - head_v_dim) // 2
    return (qkv.new_empty(B, T, num_heads, head_k), qkv.new_empty(B, T, num_heads, head_k),
            qkv.new_empty(B, T, num_heads, head_v_dim), qkv.new_empty(B, T, num_heads, head_k))


@torch.library.custom_op(f"{_NS}::comba_inputs_backward", mutates_args=())
def comba_inputs_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, grad_p: torch.Tensor,
                          qkv: torch.Tensor, weight: torch.Tensor, decay_gate: torch.Tensor,
                          correction: torch.Tensor, num_heads: int, head_v_dim: int, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of qkv, weight, decay_gate and correction."""
    head_k = _check(qkv, weight, num_heads, head_v_dim)
    w, sd, dc = weight.float().contiguous(), decay_gate.float().contiguous(), correction.float().contiguous()
    grads = [g.contiguous() for g in (grad_q, grad_k, grad_v, grad_p)]
    dy, dsd, ddc = chain_backward(grads, qkv, w, sd, dc, num_heads, head_k, head_v_dim, eps)
    grad_qkv, dw = conv_backward(dy, qkv, w)
    return (grad_qkv, dw.to(weight.dtype), dsd.to(decay_gate.dtype), ddc.to(correction.dtype))


def chain_backward(grads, qkv, w, sd, dc, num_heads, head_k, head_v_dim, eps):
    """The gradient at the conv outputs [B, T, C] and those of σ(decay) and D (fp32 [H])."""
    B, T, C = qkv.shape
    n_tiles = triton.cdiv(T, CHAIN_TILE["BT"])
    dy = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
    dsd = torch.empty(B * n_tiles, num_heads, dtype=torch.float32, device=qkv.device)
    ddc = torch.empty_like(dsd)
    _inputs_chain_bwd_kernel[(n_tiles, num_heads, B)](qkv, w, sd, dc, *grads, dy, dsd, ddc, T, qkv.stride(0), qkv.stride(1),
                                               num_heads, head_k, head_v_dim, w.shape[-1], EPS=eps, **CHAIN_TILE)
    return dy, dsd.sum(0), ddc.sum(0)


def conv_backward(dy, qkv, w):
    """The causal depthwise conv's input gradient [B, T, C] and weight gradient (fp32 [C, taps])."""
    B, T, C = qkv.shape
    kernel = w.shape[-1]
    n_split = triton.cdiv(T, _T_SPLIT)
    grad_qkv = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
    dw = torch.empty(B * n_split, C, kernel, dtype=torch.float32, device=qkv.device)
    _inputs_conv_bwd_kernel[(n_split, triton.cdiv(C, CONV_TILE["BC"]), B)](
        qkv, w, dy, grad_qkv, dw, T, qkv.stride(0), qkv.stride(1), C, kernel, triton.next_power_of_2(kernel),
        TS=_T_SPLIT, **CONV_TILE)
    return grad_qkv, dw.sum(0)


@comba_inputs_backward.register_fake
def _(grad_q, grad_k, grad_v, grad_p, qkv, weight, decay_gate, correction, num_heads, head_v_dim, eps):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(decay_gate), torch.empty_like(correction))


def _setup_context(ctx, inputs, output):
    qkv, weight, decay_gate, correction, num_heads, head_v_dim, eps = inputs
    ctx.save_for_backward(qkv, weight, decay_gate, correction)
    ctx.num_heads, ctx.head_v_dim, ctx.eps = num_heads, head_v_dim, eps


def _backward(ctx, grad_q, grad_k, grad_v, grad_p):
    qkv, weight, decay_gate, correction = ctx.saved_tensors
    grads = comba_inputs_backward(grad_q, grad_k, grad_v, grad_p, qkv, weight, decay_gate, correction,
                                  ctx.num_heads, ctx.head_v_dim, ctx.eps)
    return (*grads, None, None, None)


comba_inputs.register_autograd(_backward, setup_context=_setup_context)
