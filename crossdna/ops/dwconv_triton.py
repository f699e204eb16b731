"""The TokenBridge's dilated depthwise convolutions as Triton kernels: the fused counterpart of
:func:`crossdna.ops.dwconv.dilated_dwconv`.

Channel-last throughout: the bridge's activations are [B, T, C] and its 1×1 mix is a GEMM over the stacked
[B, T, N·C] outputs, so nothing is transposed (cuDNN/ATen's depthwise kernels ran channel-first on transposed
copies, at ~6× their byte floor). One forward launch covers every dilation; the backward is one kernel for the
input gradient (summing all dilations and taps) and one for the weight gradient (per-program partial sums added in
PyTorch). Wrapped as ``torch.library`` custom ops like ``comba_inputs_triton``: opaque to torch.compile, capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_NS = __name__.replace(".", "_")  # an HF export's flat copy registers its own ops
# Tile shapes (tokens × channels per program), chosen by benchmarks/triton_tiles_bench.py on an H200 at B = 150.
FWD_TILE = {"BT": 32, "BC": 64, "num_warps": 2}
DX_TILE = {"BT": 16, "BC": 128, "num_warps": 4}
DW_TILE = {"BT": 64, "BC": 64, "num_warps": 4}
_T_SPLIT = 256    # tokens per weight-gradient program


@triton.jit
def _dilation(i_n, DILS: tl.constexpr, N: tl.constexpr):
    """DILS[i_n] for a program index i_n (the dilations are compile-time constants: no device tensor to copy)."""
    dil = 0
    for i in tl.static_range(N):
        dil += tl.where(i_n == i, DILS[i], 0)
    return dil


@triton.jit
def _dwconv_fwd_kernel(X, W, DILS: tl.constexpr, Y, T, stride_b, stride_t,
                       C: tl.constexpr, N: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_bn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_n = i_bn // N, i_bn % N
    t = i_t * BT + tl.arange(0, BT)
    ch = i_c * BC + tl.arange(0, BC)
    cok = ch < C
    dil = _dilation(i_n, DILS, N)
    row0 = i_b.to(tl.int64) * stride_b
    y = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(KC):
        src = t + (j - KC // 2) * dil
        ok = (src >= 0) & (src < T)
        x = tl.load(X + row0 + src[:, None] * stride_t + ch[None, :], mask=ok[:, None] & cok[None, :],
                    other=0.0).to(tl.float32)
        y += x * tl.load(W + (i_n * C + ch) * KC + j, mask=cok, other=0.0)[None, :]
    out = ((i_b.to(tl.int64) * T + t)[:, None] * N + i_n) * C + ch[None, :]      # Y [B, T, N, C]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=(t < T)[:, None] & cok[None, :])


@triton.jit
def _dwconv_dx_kernel(W, DILS: tl.constexpr, DY, DX, T,
                      C: tl.constexpr, N: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx[t] = Σ_i Σ_j w[i, j]·dy[t − (j − KC//2)·d_i, i]: output t − offset read input t through tap j."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    ch = i_c * BC + tl.arange(0, BC)
    cok = ch < C
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(N):
        for j in tl.static_range(KC):
            dst = t - (j - KC // 2) * DILS[i]
            ok = (dst >= 0) & (dst < T)
            g = tl.load(DY + ((i_b.to(tl.int64) * T + dst)[:, None] * N + i) * C + ch[None, :],
                        mask=ok[:, None] & cok[None, :], other=0.0).to(tl.float32)
            dx += g * tl.load(W + (i * C + ch) * KC + j, mask=cok, other=0.0)[None, :]
    tl.store(DX + (i_b.to(tl.int64) * T + t)[:, None] * C + ch[None, :], dx.to(DX.dtype.element_ty),
             mask=(t < T)[:, None] & cok[None, :])


@triton.jit
def _dwconv_dw_kernel(X, DILS: tl.constexpr, DY, DW, T, stride_b, stride_t,
                      C: tl.constexpr, N: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                      TS: tl.constexpr):
    """This program's partial sum over TS tokens of dw[i, c, j] = Σ_t dy[t, i, c]·x[t + (j − KC//2)·d_i, c]
    (DW [B · splits, N, C, KC]). One pass over the tokens per tap: the tile stays in cache between passes, and a
    [BT, BC] accumulator per tap costs one multiply-add per product (a tap-indexed 3-D one cost KC)."""
    i_s, i_c, i_bn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_n = i_bn // N, i_bn % N
    ch = i_c * BC + tl.arange(0, BC)
    cok = ch < C
    dil = _dilation(i_n, DILS, N)
    row0 = i_b.to(tl.int64) * stride_b
    part = (i_b * tl.num_programs(0) + i_s).to(tl.int64) * N + i_n
    for j in tl.static_range(KC):
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for t0 in range(i_s * TS, tl.minimum(i_s * TS + TS, T), BT):
            t = t0 + tl.arange(0, BT)
            dy = tl.load(DY + ((i_b.to(tl.int64) * T + t)[:, None] * N + i_n) * C + ch[None, :],
                         mask=(t < T)[:, None] & cok[None, :], other=0.0).to(tl.float32)
            src = t + (j - KC // 2) * dil
            ok = (src >= 0) & (src < T)
            x = tl.load(X + row0 + src[:, None] * stride_t + ch[None, :], mask=ok[:, None] & cok[None, :],
                        other=0.0).to(tl.float32)
            acc += dy * x
        tl.store(DW + (part * C + ch) * KC + j, tl.sum(acc, axis=0), mask=cok)


def _check(x: torch.Tensor, weight: torch.Tensor, dilations: list[int]) -> None:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (len(dilations), x.shape[-1]):
        raise ValueError(f"dilated_dwconv: x {tuple(x.shape)} must be [B, T, C] and weight {tuple(weight.shape)} "
                         f"[{len(dilations)} dilations, C, K]")
    if weight.shape[-1] % 2 == 0 or x.stride(-1) != 1:
        raise ValueError("dilated_dwconv (Triton): the kernel size must be odd and x's channels contiguous")


@torch.library.custom_op(f"{_NS}::dilated_dwconv", mutates_args=())
def _dilated_dwconv(x: torch.Tensor, weight: torch.Tensor, dilations: list[int]) -> torch.Tensor:
    _check(x, weight, dilations)
    B, T, C = x.shape
    N, _, K = weight.shape
    y = x.new_empty(B, T, N, C)
    grid = (triton.cdiv(T, FWD_TILE["BT"]), triton.cdiv(C, FWD_TILE["BC"]), B * N)
    _dwconv_fwd_kernel[grid](x, weight.float().contiguous(), tuple(dilations), y, T, x.stride(0), x.stride(1), C, N, K, **FWD_TILE)
    return y


@_dilated_dwconv.register_fake
def _(x, weight, dilations):
    B, T, C = x.shape
    return x.new_empty(B, T, weight.shape[0], C)


@torch.library.custom_op(f"{_NS}::dilated_dwconv_backward", mutates_args=())
def dilated_dwconv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilations: list[int]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x ([B, T, C], x's dtype) and weight (its dtype)."""
    _check(x, weight, dilations)
    grad, dilations = grad.contiguous(), tuple(dilations)
    dx = input_grad(grad, weight.float().contiguous(), dilations, x.dtype)
    return dx, weight_grad(grad, x, dilations, weight.shape[-1]).to(weight.dtype)


def input_grad(grad: torch.Tensor, w: torch.Tensor, dilations: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """grad [B, T, N, C] contiguous, w fp32 [N, C, K] → the input gradient [B, T, C] in ``dtype``."""
    B, T, N, C = grad.shape
    dx = torch.empty(B, T, C, dtype=dtype, device=grad.device)
    grid = (triton.cdiv(T, DX_TILE["BT"]), triton.cdiv(C, DX_TILE["BC"]), B)
    _dwconv_dx_kernel[grid](w, dilations, grad, dx, T, C, N, w.shape[-1], **DX_TILE)
    return dx


def weight_grad(grad: torch.Tensor, x: torch.Tensor, dilations: tuple[int, ...], kernel: int) -> torch.Tensor:
    """grad [B, T, N, C] contiguous, x [B, T, C] → the weight gradient, fp32 [N, C, kernel]."""
    B, T, N, C = grad.shape
    n_split = triton.cdiv(T, _T_SPLIT)
    dw = torch.empty(B * n_split, N, C, kernel, dtype=torch.float32, device=x.device)
    grid = (n_split, triton.cdiv(C, DW_TILE["BC"]), B * N)
    _dwconv_dw_kernel[grid](x, dilations, grad, dw, T, x.stride(0), x.stride(1), C, N, kernel, TS=_T_SPLIT, **DW_TILE)
    return dw.sum(0)


@dilated_dwconv_backward.register_fake
def _(grad, x, weight, dilations):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, dilations = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilations = dilations


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return (*dilated_dwconv_backward(grad, x, weight, ctx.dilations), None)


_dilated_dwconv.register_autograd(_backward, setup_context=_setup_context)


def dilated_dwconv(x: torch.Tensor, weight: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """Same contract as :func:`crossdna.ops.dwconv.dilated_dwconv`."""
    return _dilated_dwconv(x, weight, list(dilations))
