"""Comba's input stage as two Triton kernels: the fused counterpart of :func:`crossdna.ops.comba.comba_inputs`.

Forward, per token and head, in one pass over the projections: the three causal depthwise convolutions, SiLU,
p = σ(decay)·k̃, q̂ = q̃ − D·p and the L2 norms of q̂, k̃, p; it reads q, k, v once and writes the four kernel inputs
once. Compiled, the same math took four inductor kernels, a materialised pad and three of fla's L2-norm passes
(forward and backward) per layer.

Backward: one kernel recomputes the forward from the saved projections (they are the only saved tensors) and
applies the chain L2 norm → correction → SiLU → transposed convolution. The transposed conv needs the upstream
gradient at the K − 1 following tokens, so each tile recomputes the per-token chain at the K shifts (the shifted
reloads hit L1/L2, not HBM). The convolution-weight, D and σ(decay) gradients are summed per program over its
tokens and the partial sums are added up in PyTorch.

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
_BT_FWD = 32      # tokens per forward program
_BT_BWD = 16      # tokens per backward tile
_T_SPLIT = 256    # tokens per backward program (its tiles run in a loop and share one partial sum)


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
def _fwd_kernel(X, W, SD, DC, Q, K, V, P, T, stride_b, stride_t,
                H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr,
                EPS: tl.constexpr):
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    ck, cv = tl.arange(0, DK), tl.arange(0, DV)
    row0 = i_b.to(tl.int64) * stride_b
    q, _ = _conv_silu(X, W, row0, t, T, stride_t, i_h * DK + ck, KC)
    k, _ = _conv_silu(X, W, row0, t, T, stride_t, H * DK + i_h * DK + ck, KC)
    v, _ = _conv_silu(X, W, row0, t, T, stride_t, 2 * H * DK + i_h * DV + cv, KC)
    p = k * tl.load(SD + i_h)
    q = q - tl.load(DC + i_h) * p
    q = q * tl.rsqrt(tl.sum(q * q, axis=1) + EPS)[:, None]
    k = k * tl.rsqrt(tl.sum(k * k, axis=1) + EPS)[:, None]
    p = p * tl.rsqrt(tl.sum(p * p, axis=1) + EPS)[:, None]
    ok = (t < T)[:, None]
    tok = (i_b.to(tl.int64) * T + t) * H + i_h                     # outputs are [B, T, H, D] contiguous
    out_k = tok[:, None] * DK + ck[None, :]
    tl.store(Q + out_k, q.to(Q.dtype.element_ty), mask=ok)
    tl.store(K + out_k, k.to(K.dtype.element_ty), mask=ok)
    tl.store(P + out_k, p.to(P.dtype.element_ty), mask=ok)
    tl.store(V + tok[:, None] * DV + cv[None, :], v.to(V.dtype.element_ty), mask=ok)


@triton.jit
def _l2_bwd(x, g, EPS: tl.constexpr):
    """x̂ = x / √(‖x‖² + eps) per row; from dL/dx̂ = g, return (dL/dx, x̂)."""
    r = tl.rsqrt(tl.sum(x * x, axis=1) + EPS)[:, None]
    xn = x * r
    return r * (g - xn * tl.sum(g * xn, axis=1)[:, None]), xn


@triton.jit
def _chain_bwd(X, W, GQ, GK, GV, GP, row0, t, T, stride_t, i_b, i_h, sd, dc,
               H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr, EPS: tl.constexpr):
    """Recompute the forward at tokens t and return the gradients at the conv outputs (before SiLU) of q, k, v,
    and the per-token-summed gradients of D and σ(decay) (fp32)."""
    ck, cv = tl.arange(0, DK), tl.arange(0, DV)
    sq, yq = _conv_silu(X, W, row0, t, T, stride_t, i_h * DK + ck, KC)
    sk, yk = _conv_silu(X, W, row0, t, T, stride_t, H * DK + i_h * DK + ck, KC)
    sv, yv = _conv_silu(X, W, row0, t, T, stride_t, 2 * H * DK + i_h * DV + cv, KC)
    ok = (t < T)[:, None]
    tok = (i_b.to(tl.int64) * T + t) * H + i_h
    g_k = tok[:, None] * DK + ck[None, :]
    p = sk * sd
    qh = sq - dc * p
    dqh, _ = _l2_bwd(qh, tl.load(GQ + g_k, mask=ok, other=0.0).to(tl.float32), EPS)
    dk, _ = _l2_bwd(sk, tl.load(GK + g_k, mask=ok, other=0.0).to(tl.float32), EPS)
    dp, _ = _l2_bwd(p, tl.load(GP + g_k, mask=ok, other=0.0).to(tl.float32), EPS)
    dp = dp - dc * dqh                                   # q̂ = q̃ − D·p
    dk = dk + sd * dp                                    # p = σ(decay)·k̃
    d_dc = -tl.sum(tl.sum(dqh * p, axis=1), axis=0)
    d_sd = tl.sum(tl.sum(dp * sk, axis=1), axis=0)
    gv = tl.load(GV + tok[:, None] * DV + cv[None, :], mask=ok, other=0.0).to(tl.float32)
    # SiLU'(y) = σ(y)·(1 + y·(1 − σ(y)))
    s = tl.sigmoid(yq)
    dyq = dqh * s * (1 + yq * (1 - s))
    s = tl.sigmoid(yk)
    dyk = dk * s * (1 + yk * (1 - s))
    s = tl.sigmoid(yv)
    dyv = gv * s * (1 + yv * (1 - s))
    return dyq, dyk, dyv, d_dc, d_sd


@triton.jit
def _conv_weight_grad(X, row0, t, T, stride_t, ch, dy, acc, KC: tl.constexpr, KCP: tl.constexpr):
    """acc[c, j] += Σ_t dy[t, c]·x[t − KC + 1 + j, c]."""
    taps = tl.arange(0, KCP)
    for j in tl.static_range(KC):
        src = t - (KC - 1) + j
        ok = (src >= 0) & (src < T)
        x = tl.load(X + row0 + src[:, None] * stride_t + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.where(taps[None, :] == j, tl.sum(dy * x, axis=0)[:, None], 0.0)
    return acc


@triton.jit
def _bwd_kernel(X, W, SD, DC, GQ, GK, GV, GP, DX, DW, DSD, DDC, T, stride_b, stride_t,
                H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr, KCP: tl.constexpr,
                BT: tl.constexpr, TS: tl.constexpr, EPS: tl.constexpr):
    i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_split = tl.num_programs(0)
    ck, cv = tl.arange(0, DK), tl.arange(0, DV)
    chq, chk, chv = i_h * DK + ck, H * DK + i_h * DK + ck, 2 * H * DK + i_h * DV + cv
    C: tl.constexpr = H * (2 * DK + DV)
    row0 = i_b.to(tl.int64) * stride_b
    sd, dc = tl.load(SD + i_h), tl.load(DC + i_h)
    acc_q = tl.zeros([DK, KCP], dtype=tl.float32)
    acc_k = tl.zeros([DK, KCP], dtype=tl.float32)
    acc_v = tl.zeros([DV, KCP], dtype=tl.float32)
    acc_dc = 0.0
    acc_sd = 0.0
    for t0 in range(i_s * TS, tl.minimum(i_s * TS + TS, T), BT):
        t = t0 + tl.arange(0, BT)
        dxq = tl.zeros([BT, DK], dtype=tl.float32)
        dxk = tl.zeros([BT, DK], dtype=tl.float32)
        dxv = tl.zeros([BT, DV], dtype=tl.float32)
        # dx[t] = Σ_s w[KC − 1 − s]·dy[t + s]: the chain is recomputed at each shift s.
        for s in tl.static_range(KC):
            dyq, dyk, dyv, d_dc, d_sd = _chain_bwd(X, W, GQ, GK, GV, GP, row0, t + s, T, stride_t, i_b, i_h,
                                                   sd, dc, H, DK, DV, KC, EPS)
            dxq += dyq * tl.load(W + chq * KC + (KC - 1 - s))[None, :]
            dxk += dyk * tl.load(W + chk * KC + (KC - 1 - s))[None, :]
            dxv += dyv * tl.load(W + chv * KC + (KC - 1 - s))[None, :]
            if s == 0:
                acc_dc += d_dc
                acc_sd += d_sd
                acc_q = _conv_weight_grad(X, row0, t, T, stride_t, chq, dyq, acc_q, KC, KCP)
                acc_k = _conv_weight_grad(X, row0, t, T, stride_t, chk, dyk, acc_k, KC, KCP)
                acc_v = _conv_weight_grad(X, row0, t, T, stride_t, chv, dyv, acc_v, KC, KCP)
        ok = (t < T)[:, None]
        dx_row = (i_b.to(tl.int64) * T + t)[:, None] * C
        tl.store(DX + dx_row + chq[None, :], dxq.to(DX.dtype.element_ty), mask=ok)
        tl.store(DX + dx_row + chk[None, :], dxk.to(DX.dtype.element_ty), mask=ok)
        tl.store(DX + dx_row + chv[None, :], dxv.to(DX.dtype.element_ty), mask=ok)
    part = i_b * n_split + i_s                               # one partial sum per program
    taps = tl.arange(0, KCP)
    keep = taps[None, :] < KC
    dw_row = part.to(tl.int64) * C * KC
    tl.store(DW + dw_row + chq[:, None] * KC + taps[None, :], acc_q, mask=keep)
    tl.store(DW + dw_row + chk[:, None] * KC + taps[None, :], acc_k, mask=keep)
    tl.store(DW + dw_row + chv[:, None] * KC + taps[None, :], acc_v, mask=keep)
    tl.store(DDC + part * H + i_h, acc_dc)
    tl.store(DSD + part * H + i_h, acc_sd)


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
    grid = (triton.cdiv(T, _BT_FWD), num_heads, B)
    _fwd_kernel[grid](qkv, weight.float().contiguous(), decay_gate.float().contiguous(),
                      correction.float().contiguous(), q, k, v, p, T, qkv.stride(0), qkv.stride(1),
                      num_heads, head_k, head_v_dim, weight.shape[-1], _BT_FWD, eps, num_warps=4)
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
    B, T, C = qkv.shape
    kernel = weight.shape[-1]
    n_split = triton.cdiv(T, _T_SPLIT)
    grad_qkv = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
    dw = torch.empty(B * n_split, C, kernel, dtype=torch.float32, device=qkv.device)
    dsd = torch.empty(B * n_split, num_heads, dtype=torch.float32, device=qkv.device)
    ddc = torch.empty_like(dsd)
    grads = [g.contiguous() for g in (grad_q, grad_k, grad_v, grad_p)]
    _bwd_kernel[(n_split, num_heads, B)](
        qkv, weight.float().contiguous(), decay_gate.float().contiguous(), correction.float().contiguous(),
        *grads, grad_qkv, dw, dsd, ddc, T, qkv.stride(0), qkv.stride(1),
        num_heads, head_k, head_v_dim, kernel, triton.next_power_of_2(kernel), _BT_BWD, _T_SPLIT, eps,
        num_warps=4)
    return (grad_qkv, dw.sum(0).to(weight.dtype), dsd.sum(0).to(decay_gate.dtype),
            ddc.sum(0).to(correction.dtype))


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
