"""Comba (closed-loop gated delta rule) in plain PyTorch: the chunked WY algorithm and its token-by-token oracle.

Per head, with state S ∈ R^{K×V} starting at 0 (spec §2.4):

    u_t = β_t (v_t − S_{t−1}ᵀ p_t)          # prediction from the UNDECAYED previous state
    S_t = α_t S_{t−1} + k_t u_tᵀ,  α_t = exp(g_t)
    o_t = scale · S_tᵀ q_t

This is the recurrence of fla's Triton kernels and of ``fla.ops.comba.naive.naive_chunk_comba``. fla's
``naive_recurrent_comba`` decays the state *before* the prediction, which is a different function; it is not our
oracle.

Chunked form (chunk C, per chunk with incoming state S₀, inclusive log-decay cumsum γ and exclusive γ⁰ = γ − g):

    (I + M) U = βV − diag(β e^{γ⁰}) P S₀,      M[t,s] = β_t (p_t·k_s) e^{γ⁰_t − γ_s}   (s < t)
    O = scale · [ diag(e^{γ}) Q S₀ + ((Q Kᵀ) ⊙ e^{γ_t − γ_s})_{s≤t} U ]
    S_C = e^{γ_C} S₀ + Σ_s e^{γ_C − γ_s} k_s u_sᵀ

The unit-lower-triangular system is solved with ``torch.linalg.solve_triangular`` (what fla's ``solve_tril`` does
blockwise), and every intra-chunk quantity is computed for all chunks at once; only the state hand-off between
chunks is a loop (T/C steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's in-kernel L2 norm: x / sqrt(‖x‖² + eps) over the last dim."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least (as fla's kernels accumulate), fp64 stays fp64 for the exactness tests.
    return torch.promote_types(dtype, torch.float32)


def comba_inputs(
    qkv: torch.Tensor,
    weight: torch.Tensor,
    decay_gate: torch.Tensor,
    correction: torch.Tensor,
    num_heads: int,
    head_v_dim: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Comba's input stage, from the three projections to the kernel's inputs (spec §2.4).

    qkv [B,T,H·(2K+V)] (q, k, v projections side by side), weight [H·(2K+V), C] (the three causal depthwise
    convs' taps), decay_gate = σ(decay) [H], correction = D [H] →

        q̃, k̃, v = SiLU(causal conv(qkv)),  p = σ(decay)·k̃,  q̂ = q̃ − D·p,  q = l2(q̂), k = l2(k̃), p = l2(p)

    each [B,T,H,·] in qkv's dtype, computed in fp32 (l2 as fla's in-kernel norm: x / √(‖x‖² + eps)). The
    Comba kernel then takes them with ``use_qk_l2norm=False``.
    """
    B, T, channels = qkv.shape
    kernel = weight.shape[-1]
    K = (channels // num_heads - head_v_dim) // 2
    dt = _compute_dtype(qkv.dtype)
    y = F.conv1d(qkv.to(dt).transpose(1, 2), weight.to(dt)[:, None, :], padding=kernel - 1, groups=channels)
    y = F.silu(y[..., :T].transpose(1, 2))
    q, k, v = y.split([num_heads * K, num_heads * K, num_heads * head_v_dim], dim=-1)
    q, k, v = q.view(B, T, num_heads, K), k.view(B, T, num_heads, K), v.view(B, T, num_heads, head_v_dim)
    p = k * decay_gate.to(dt)[:, None]
    q = q - correction.to(dt)[:, None] * p
    q, k, p = (l2_normalize(x, eps) for x in (q, k, p))
    return q.to(qkv.dtype), k.to(qkv.dtype), v.to(qkv.dtype), p.to(qkv.dtype)


def _prepare(q, k, v, p, g, beta, use_qk_l2norm: bool):
    dt = _compute_dtype(q.dtype)
    q, k, v, p, g, beta = (x.to(dt) for x in (q, k, v, p, g, beta))
    if use_qk_l2norm:
        q, k, p = l2_normalize(q), l2_normalize(k), l2_normalize(p)
    return q, k, v, p, g, beta


def _chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B,T,H,...] → [B,H,T/C,C,...] (T a multiple of the chunk size C)."""
    B, T, H = x.shape[:3]
    return x.transpose(1, 2).reshape(B, H, T // chunk_size, chunk_size, *x.shape[3:])


def _decay(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # e^{a_t − b_s} where kept, 0 elsewhere; masking before exp keeps the unused (growing) entries from overflowing.
    return torch.exp((a[..., :, None] - b[..., None, :]).masked_fill(~keep, float("-inf")))


def _wy_matrix(k, p, beta, gam0, gam) -> torch.Tensor:
    """M[t,s] = β_t (p_t·k_s) e^{γ⁰_t − γ_s} for s < t, per chunk ([..., C, K] inputs → [..., C, C])."""
    idx = torch.arange(k.shape[-2], device=k.device)
    return beta[..., None] * (p @ k.transpose(-1, -2)) * _decay(gam0, gam, idx[:, None] > idx[None, :])


def wy_form(k: torch.Tensor, p: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
            chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk-local WY form: (I + M)⁻¹ of every chunk, w = (I + M)⁻¹ diag(β e^{γ⁰}) P and u = (I + M)⁻¹ diag(β) V
    (the U = u − w S₀ of :func:`chunk_comba`). k, p [B,T,H,K], v [B,T,H,V], β and g (log decay) [B,T,H], T a
    multiple of ``chunk_size`` → inverse [B,T,H,C] (row t holds row t mod C of its chunk's inverse: fla's
    layout), w [B,T,H,K], u [B,T,H,V], computed in fp32 at least."""
    B, T, H, K = k.shape
    C = chunk_size
    dt = _compute_dtype(k.dtype)

    def tokens(x: torch.Tensor) -> torch.Tensor:  # back to [B,T,H,...]
        return x.reshape(B, H, T, x.shape[-1]).transpose(1, 2)

    k, p, v, beta, g = (_chunks(x.to(dt), C) for x in (k, p, v, beta, g))
    gam = g.cumsum(-1)
    gam0 = gam - g
    eye = torch.eye(C, dtype=dt, device=k.device)
    inv = torch.linalg.solve_triangular(eye + _wy_matrix(k, p, beta, gam0, gam), eye, upper=False,
                                        unitriangular=True)
    w = inv @ ((beta * gam0.exp())[..., None] * p)
    u = inv @ (beta[..., None] * v)
    return tokens(inv), tokens(w), tokens(u)


def chunk_comba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Chunked Comba. q,k,p [B,T,H,K], v [B,T,H,V], g (log decay ≤ 0) and beta [B,T,H] → o [B,T,H,V] (v's dtype).

    Any T ≥ 1 works: the sequence is right-padded to a multiple of ``chunk_size`` with g = 0, β = 0, which leaves
    the (causal) outputs of real positions unchanged, and the padding is cut off again.
    """
    out_dtype = v.dtype
    q, k, v, p, g, beta = _prepare(q, k, v, p, g, beta, use_qk_l2norm)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K ** -0.5 if scale is None else scale
    pad = (-T) % C
    if pad:
        q, k, v, p = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, p))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v, p, g, beta = (_chunks(x, C) for x in (q, k, v, p, g, beta))
    gam = g.cumsum(-1)          # inclusive log decay inside each chunk
    gam0 = gam - g              # exclusive
    idx = torch.arange(C, device=q.device)
    causal = idx[:, None] >= idx[None, :]

    m = _wy_matrix(k, p, beta, gam0, gam)
    rhs = torch.cat([beta[..., None] * v, (beta * gam0.exp())[..., None] * p], dim=-1)
    uw = torch.linalg.solve_triangular(m, rhs, upper=False, unitriangular=True)
    u0, w = uw[..., :V], uw[..., V:]                          # U = u0 − w S₀
    qk = (q @ k.transpose(-1, -2)) * _decay(gam, gam, causal)
    q_in = q * gam.exp()[..., None]                            # reads the incoming state
    k_out = k * (gam[..., -1:] - gam).exp()[..., None]         # writes into the outgoing state
    chunk_decay = gam[..., -1].exp()[..., None, None]          # [B,H,N,1,1]

    state = q.new_zeros(B, H, K, V)
    outs = []
    for n in range(N):
        u = u0[:, :, n] - w[:, :, n] @ state
        outs.append(q_in[:, :, n] @ state + qk[:, :, n] @ u)
        state = chunk_decay[:, :, n] * state + k_out[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    return (scale * o).transpose(1, 2).to(out_dtype)


def recurrent_comba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """The token-by-token recurrence of spec §2.4 (the test oracle for every Comba kernel; O(T) Python steps)."""
    out_dtype = v.dtype
    q, k, v, p, g, beta = _prepare(q, k, v, p, g, beta, use_qk_l2norm)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    state = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", state, p[:, t]))
        state = g[:, t].exp()[..., None, None] * state + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1).to(out_dtype)
