"""Comba's chunk-local WY form: the reference (crossdna/ops/comba.py) against its definition, and the Triton kernel
(crossdna/ops/comba_wy_triton.py) against the reference: on CPU through Triton's interpreter, on a GPU compiled and
against fla's three kernels it replaces. Errors are relative L2 norms against a float64 reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from crossdna.ops.comba import _chunks, wy_form
from crossdna.ops.comba_wy_triton import _tf32

from tests.kernel_checks import rel, run_interpreted

CUDA = torch.cuda.is_available()


def _inputs(B, T, H, K, V, seed=0, device="cpu", decay=0.3, keys="clustered"):
    """Unit-norm k and p as the input stage hands them over, v, β in (0, 1), log decays uniform in (−decay, 0).

    * keys "clustered": the keys cluster around three directions (as repeated sequence makes them), so that M's
      powers up to M¹⁵ are far from negligible; p is a perturbed k, so that swapping them shows.
    * keys "aligned": as in a layer after some training: p is k (the layer's p is a normalised multiple of its k),
      the keys lie close to one direction and β is near 1. I + M is then close to I + (all-ones strictly lower
      triangle), whose inverse is bidiagonal, while M's powers grow like binomial coefficients: an inverse summed
      from them cancels terms ~10⁴ times its entries (the kernel's power series did, and bf16 training on chr20
      turned NaN at step 44).
    """
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(3, K, generator=gen, dtype=torch.float64)
    noise = 0.3 if keys == "clustered" else 0.1
    pick = torch.randint(0, 3 if keys == "clustered" else 1, (B, T, H), generator=gen)
    k = F.normalize(directions[pick] + noise * torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    p = F.normalize(k + 0.3 * torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * decay
    if keys == "aligned":
        p, beta = k, 0.9 + 0.1 * beta
    return [x.to(device) for x in (k, p, v, beta, g)]


def test_reference_is_the_definition():
    B, T, H, K, V, C = 2, 32, 2, 4, 3, 16
    k, p, v, beta, g = _inputs(B, T, H, K, V)
    inv, w, u = wy_form(k, p, v, beta, g, chunk_size=C)
    eye = torch.eye(C, dtype=torch.float64)
    for b, h, n in ((0, 0, 0), (1, 1, 1)):
        rows = slice(n * C, (n + 1) * C)
        gam = g[b, rows, h].cumsum(0)
        gam0 = gam - g[b, rows, h]
        m = torch.zeros(C, C, dtype=torch.float64)
        for t in range(C):
            for s in range(t):
                m[t, s] = beta[b, n * C + t, h] * (p[b, n * C + t, h] @ k[b, n * C + s, h]) * math.exp(gam0[t] - gam[s])
        assert rel(inv[b, rows, h] @ (eye + m), eye) < 1e-13
        assert rel((eye + m) @ w[b, rows, h], (beta[b, rows, h] * gam0.exp())[:, None] * p[b, rows, h]) < 1e-13
        assert rel((eye + m) @ u[b, rows, h], beta[b, rows, h, None] * v[b, rows, h]) < 1e-13


def _log2_cumsums(g: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``chunk_comba_cumsum_scalar_fwd``: per-chunk exclusive and inclusive cumsums, in log2 units."""
    B, T, H = g.shape
    pad = (-T) % chunk
    gam = F.pad(g, (0, 0, 0, pad)).view(B, -1, chunk, H).cumsum(2).view(B, -1, H)[:, :T] / math.log(2)
    return gam - g / math.log(2), gam


def _rounded_inputs(B, T, H, K, V, decay, keys, dtype: torch.dtype) -> list[torch.Tensor]:
    """``_inputs`` with k, p, v, β rounded to the kernel's dtype (held in float64, so that the reference sees what
    the kernel reads); g stays float64 (the kernels take its cumsums in fp32). Copies: aligned keys' p is k, and
    autograd must see them apart."""
    inputs = _inputs(B, T, H, K, V, decay=decay, keys=keys)
    return [x.to(dtype).to(torch.float64, copy=True) if i < 4 else x for i, x in enumerate(inputs)]


def _padded_wy_form(k, p, v, beta, g, chunk: int = 64) -> list[torch.Tensor]:
    """The reference WY form (inverse, w, u) at any T: on inputs zero-padded to whole chunks, cropped back. M is
    lower triangular, so the leading rows of a padded chunk's inverse, w and u are those of the chunk's leading
    rows."""
    return [x[:, :k.shape[1]] for x in wy_form(*[_pad_to_chunks(x, chunk) for x in (k, p, v, beta, g)])]


def _pad_to_chunks(x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[B,T,H,...] zero-padded along T to whole chunks: the rows past T that the kernels load as 0."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, (-x.shape[1]) % chunk))


def _stored_as(dtype: torch.dtype):
    """Rounding to half-precision ``dtype`` (held in float64), for where the kernels store an intermediate in the
    input dtype, as fla's kernels do; identity for fp32 and float64."""
    return (lambda x: x) if dtype.itemsize >= 4 else (lambda x: x.to(dtype).double())


def _by_chunk(x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[B,T,H,...] zero-padded to whole chunks → [B,H,T/C,C,...]."""
    return _chunks(_pad_to_chunks(x, chunk), chunk)


def _by_token(x: torch.Tensor, T: int) -> torch.Tensor:
    """The inverse of :func:`_by_chunk`, cropped to T."""
    B, H = x.shape[:2]
    return x.reshape(B, H, -1, *x.shape[4:]).transpose(1, 2)[:, :T]


def _capped_decay(g0: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
    """2^{min(γ⁰_t − γ_s, 0)} per chunk, as both kernels compute M's decay (log2 cumsums, [..., C] → [..., C, C])."""
    return torch.exp2((g0[..., :, None] - gam[..., None, :]).clamp(max=0))


def _rounded_wy_form(k, p, v, beta, g, dtype: torch.dtype) -> list[torch.Tensor]:
    """The WY form (inverse, w, u) in float64 with the forward kernel's roundings to a half-precision ``dtype``: pβ
    for M, pβ2^{γ⁰} and vβ for w and u, the inverse before w and u (fla's stored inverse), and the outputs. Without
    rounding it is ``_padded_wy_form``'s function (test_rounded_reference_is_the_reference).

    The bf16 kernels are held to this, not to the exact form: with aligned keys (p is k, β near 1) consecutive rows
    of pβ2^{γ⁰} nearly cancel in w, and these roundings alone, in exact arithmetic, put w 1.4e-2 and the backward's
    dg 5.7e-2 from the exact form at the model's shape. On an H200 (2026-12-04) the kernels were as far from it as
    that (w 1.4e-2, dg 5.7e-2; fla's three forward kernels: w 1.8e-2) and within 4.2e-3 (forward) and 8.3e-4
    (backward) of this function."""
    T = k.shape[1]
    stored = _stored_as(dtype)
    g0, gam = (_by_chunk(x) for x in _log2_cumsums(g))
    k, p, v, beta = (_by_chunk(x) for x in (k, p, v, beta))
    lower = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    m = stored(p * beta[..., None]) @ k.transpose(-1, -2) * _capped_decay(g0, gam)
    eye = torch.eye(64, dtype=torch.float64)
    inverse = stored(torch.linalg.solve_triangular(eye + m * lower, eye, upper=False, unitriangular=True))
    w = inverse @ stored(p * (beta * torch.exp2(g0))[..., None])
    u = inverse @ stored(v * beta[..., None])
    return [_by_token(stored(x), T) for x in (inverse, w, u)]


def _rounded_wy_backward(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The backward kernel's algebra in float64 with its roundings to a half-precision ``dtype`` (the inputs; pβ,
    pβ2^{γ⁰} and vβ; the tiles dA, dA·Aᵀ and dS before their products; the outputs but dg), on
    ``_backward_case``'s inputs. Without rounding it is autograd's gradient through the reference
    (test_rounded_reference_is_the_reference)."""
    T = inputs["k"].shape[1]
    stored = _stored_as(dtype)
    x = {name: _by_chunk(stored(t) if name not in ("g0", "g", "dg") else t) for name, t in inputs.items()}
    k, p, v, beta, g0, gam, a = (x[n] for n in ("k", "p", "v", "beta", "g0", "g", "inverse"))
    dw, du = x["dw"], x["du"]
    lower = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    e0 = torch.exp2(g0)
    tr = lambda t: t.transpose(-1, -2)  # noqa: E731
    d_a = stored((dw @ tr(stored(p * (beta * e0)[..., None])) + du @ tr(stored(v * beta[..., None]))) * lower)
    d_m = tr(a) @ stored(d_a @ tr(a))
    d_s = stored(-d_m * _capped_decay(g0, gam) * lower)
    pb = stored(p * beta[..., None])
    dmm = d_s * (pb @ tr(k))
    dpg, dvb = tr(a) @ dw, tr(a) @ du
    dpbg = dpg * e0[..., None] + d_s @ k
    dg0 = dmm.sum(-1) + (dpg * p).sum(-1) * beta * e0
    dgam = x["dg"] - dmm.sum(-2)
    dsum = dgam + dg0
    grads = dict(dk=x["dk"] + tr(d_s) @ pb, dv=dvb * beta[..., None], dp=dpbg * beta[..., None],
                 dbeta=(dpbg * p).sum(-1) + (dvb * v).sum(-1),
                 dg=dsum.sum(-1, keepdim=True) - dsum.cumsum(-1) + dgam)
    return {name: _by_token(t if name == "dg" else stored(t), T) for name, t in grads.items()}


def test_rounded_reference_is_the_reference():
    """The two functions above, without rounding, against the reference WY form and autograd through it."""
    for case in CASES:
        k, p, v, beta, g = _rounded_inputs(*case, torch.float64)
        for name, got, want in zip(("inverse", "w", "u"), _rounded_wy_form(k, p, v, beta, g, torch.float64),
                                   _padded_wy_form(k, p, v, beta, g)):
            assert rel(got, want) < 1e-12, (case, name)
        inputs, want = _backward_case(*case, torch.float64)
        got = _rounded_wy_backward(inputs, torch.float64)
        for name in want:
            assert rel(got[name], want[name]) < 1e-12, (case, name)


def check_triton_against_reference(device: str, dtype: torch.dtype, cases) -> list[str]:
    """Against the float64 reference on zero-padded inputs (``_padded_wy_form``; ragged T cropped); in half
    precision rounded where the kernel rounds (``_rounded_wy_form``)."""
    from crossdna.ops.comba_wy_triton import WY_TILE_FP32
    from crossdna.ops.comba_wy_triton import wy_form as triton_wy_form

    # fp32 multiplies in TF32 (as fla's kernels do), the operands rounded by the kernel, which Triton's interpreter
    # runs too; with DOT "ieee" the products are exact
    exact = dtype == torch.float32 and WY_TILE_FP32["DOT"] == "ieee"
    tol = 2e-6 if exact else 5e-3 if dtype == torch.float32 else 1e-2
    failures = []
    for case in cases:
        k, p, v, beta, g = _rounded_inputs(*case, dtype)
        want = _rounded_wy_form(k, p, v, beta, g, dtype) if dtype.itemsize < 4 else _padded_wy_form(k, p, v, beta, g)
        g0, gam = _log2_cumsums(g)
        args = [x.to(device, dtype) for x in (k, p, v, beta)] + [g0.float().to(device), gam.float().to(device)]
        for keep in (True, False):
            got = triton_wy_form(*args, keep_inverse=keep)
            if not keep and got[0] is not None:
                failures.append(f"{case} {dtype}: an inverse without keep_inverse")
            for name, x, ref in zip(("inverse", "w", "u"), got, want):
                if x is None:
                    continue
                err = rel(x.cpu(), ref)
                if x.dtype != dtype or x.shape != ref.shape or not err < tol:
                    failures.append(f"{case} {dtype} keep_inverse={keep} {name}: {x.dtype} "
                                    f"{tuple(x.shape)}, rel {err:.2e} (tol {tol:.0e})")
    return failures


CASES = [  # B, T, H, K, V, log-decay scale, keys (_inputs)
    (2, 128, 3, 16, 32, 0.3, "clustered"),
    (1, 100, 2, 32, 16, 0.3, "clustered"),   # a ragged last chunk that ends inside its third 16-row block
    # at initialisation the 8m model's strongest heads reach γ = −156 (log2) within the 37 tokens of a ragged chunk
    # (T = 101): past T, 2^(0 − γ) of a padded row overflows and 0·inf is NaN
    (1, 100, 2, 32, 16, 8.0, "clustered"),
    (1, 128, 2, 16, 16, 0.01, "aligned"),
]


# and on a GPU, the 8.1M model's shape (8 heads of 64, 1024 tokens; clustered and aligned keys) and a ragged one
# with strong decays
MODEL_SHAPE_CASES = [(3, 1024, 8, 64, 64, 0.3, "clustered"), (2, 300, 8, 64, 64, 8.0, "clustered"),
                     (3, 1024, 8, 64, 64, 0.01, "aligned")]
GPU_CASES = [*CASES, *MODEL_SHAPE_CASES]


def _gpu_inputs(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """``_inputs`` at the 8.1M model's shape on the GPU: k, p, v, β in ``dtype`` and fla's γ⁰, γ (log2 units)."""
    from fla.ops.comba.utils import chunk_comba_cumsum_scalar_fwd
    from fla.ops.utils.constant import RCP_LN2

    k, p, v, beta, g = (x.to("cuda", dtype) if i < 4 else x.float().cuda() for i, x in
                        enumerate(_inputs(3, 1024, 8, 64, 64, seed=seed)))
    return [k, p, v, beta, *chunk_comba_cumsum_scalar_fwd(g, chunk_size=64, scale=RCP_LN2)]


EXACT_PRODUCTS = ("import crossdna.ops.comba_wy_triton as m; "
                  "m.WY_TILE_FP32['DOT'] = m.WY_BWD_TILE_FP32['DOT'] = 'ieee'")


def test_triton_kernel_matches_reference_interpreted():
    """Index arithmetic, masks and the block algebra on CPU through TRITON_INTERPRET=1 (set before Triton is imported,
    hence a fresh interpreter): with the operands rounded to TF32 as on a GPU, and with exact products at the tight
    bound."""
    run_interpreted("test_ops_comba_wy", "check_triton_against_reference", EXACT_PRODUCTS, len(CASES))


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, _tf32(tl.load(X + i), True))


def check_tf32_rounding(device: str, dtype: torch.dtype, cases) -> list[str]:
    """The kernels' ``_tf32``: fp32 to the nearest TF32 value (10 mantissa bits), ties away from zero, as
    ``cvt.rna.tf32.f32``; not the truncation a TF32 dot applies to fp32 operands."""
    ulp = 2.0 ** -10   # TF32's spacing in [1, 2)
    want = {1 + ulp / 2: 1 + ulp, 1 + ulp / 4: 1.0, 1 + 3 * ulp / 4: 1 + ulp, -(1 + ulp / 2): -(1 + ulp),
            3.0: 3.0, 1 + ulp / 2 - 2.0 ** -23: 1.0, 0.0: 0.0}
    x = torch.cat([torch.tensor(list(want), dtype=torch.float32),
                   torch.randn(121, generator=torch.Generator().manual_seed(0)) * 100]).to(device)
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, N=x.numel())
    failures = [f"_tf32({a!r}) = {b!r}, want {want[a]!r}" for a, b in zip(list(want), y[:len(want)].tolist())
                if b != want[a]]
    bits = y.view(torch.int32)
    if (bits & 0x1FFF).any():
        failures.append("low 13 mantissa bits not cleared")
    if ((y - x).abs() > x.abs() * 2.0 ** -11).any():
        failures.append(f"error above half a TF32 ulp: {((y - x).abs() / x.abs()).max().item():.2e}")
    return failures


def test_tf32_rounding_interpreted():
    run_interpreted("test_ops_comba_wy", "check_tf32_rounding")


def _chunk_cumsum(g: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """γ: the inclusive log-decay cumsum of each chunk, in natural units."""
    B, T, H = g.shape
    pad = (-T) % chunk
    return F.pad(g, (0, 0, 0, pad)).view(B, -1, chunk, H).cumsum(2).view(B, -1, H)[:, :T]


def _backward_case(B, T, H, K, V, decay, keys, dtype: torch.dtype, seed: int = 0):
    """Inputs of the WY form's backward and its float64 gradients: with dw, du, and the gradients of k and of γ
    that the rest of Comba's backward has so far (dk_in, dγ_in), the gradients of k, v, p, β and g of
    Σ dw·w + Σ du·u + Σ dγ_in·γ, plus dk_in on k's."""
    k, p, v, beta, g = (x.requires_grad_() for x in _rounded_inputs(B, T, H, K, V, decay, keys, dtype))
    gen = torch.Generator().manual_seed(seed + 1)
    dw, du, dk_in = (torch.randn(*x.shape, generator=gen, dtype=torch.float64).to(dtype).double() for x in (k, v, k))
    dgam_in = torch.randn(B, T, H, generator=gen, dtype=torch.float64).float().double()
    inverse, w, u = _padded_wy_form(k, p, v, beta, g)
    loss = (dw * w).sum() + (du * u).sum() + (dgam_in * _chunk_cumsum(g)).sum()
    grads = torch.autograd.grad(loss, (k, v, p, beta, g))
    want = dict(zip(("dk", "dv", "dp", "dbeta", "dg"), (grads[0] + dk_in, *grads[1:])))
    g0, gam = _log2_cumsums(g.detach())
    inputs = dict(k=k.detach(), p=p.detach(), v=v.detach(), beta=beta.detach(), g0=g0, g=gam,
                  inverse=inverse.detach(), dw=dw, du=du, dk=dk_in, dg=dgam_in)
    return inputs, want


def check_triton_backward_against_reference(device: str, dtype: torch.dtype, cases) -> list[str]:
    """Against float64 autograd through the reference; in half precision against its algebra rounded where the
    kernel rounds (``_rounded_wy_backward``)."""
    from crossdna.ops.comba_wy_triton import WY_BWD_TILE_FP32, wy_form_backward

    exact = dtype == torch.float32 and WY_BWD_TILE_FP32["DOT"] == "ieee"   # as in the forward's check
    tol = 2e-5 if exact else 5e-3 if dtype == torch.float32 else 2e-2
    failures = []
    for case in cases:
        inputs, want = _backward_case(*case, dtype)
        if dtype.itemsize < 4:
            want = _rounded_wy_backward(inputs, dtype)
        args = {name: x.to(device, torch.float32 if name in ("g0", "g", "dg") else dtype)
                for name, x in inputs.items()}
        dv, dp, dbeta = wy_form_backward(**args)
        got = dict(dk=args["dk"], dv=dv, dp=dp, dbeta=dbeta, dg=args["dg"])
        for name, ref in want.items():
            err = rel(got[name].cpu(), ref)
            if got[name].shape != ref.shape or not err < tol:
                failures.append(f"{case} {dtype} {name}: {tuple(got[name].shape)}, rel {err:.2e} (tol {tol:.0e})")
    return failures


def test_triton_backward_matches_reference_interpreted():
    """The backward kernel against float64 autograd through the reference WY form, on CPU in Triton's interpreter
    (the gradients of k and γ accumulate onto what the rest of Comba's backward passes in; γ's becomes g's)."""
    run_interpreted("test_ops_comba_wy", "check_triton_backward_against_reference", EXACT_PRODUCTS, len(CASES))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference_and_fla_on_gpu(dtype):
    """At the 8.1M model's shape (8 heads of 64, 1024 tokens) and a ragged one; and against fla's
    chunk_scaled_dot_comba_pkt_fwd + solve_tril + recompute_w_u_fwd on the same inputs (in fp32 fla builds M and w
    with TF32 dots)."""
    failures = check_triton_against_reference("cuda", dtype, GPU_CASES)
    assert not failures, "\n".join(failures)

    from fla.ops.comba.wy_fast import chunk_scaled_dot_comba_pkt_fwd, recompute_w_u_fwd
    from fla.ops.utils import solve_tril

    from crossdna.ops.comba_wy_triton import wy_form as triton_wy_form

    k, p, v, beta, g0, gam = _gpu_inputs(dtype, seed=2)
    inverse = solve_tril(chunk_scaled_dot_comba_pkt_fwd(k=k, p=p, beta=beta, g0=g0, g=gam,
                                                        output_dtype=torch.float32), output_dtype=dtype)
    w, u = recompute_w_u_fwd(k=p, v=v, beta=beta, A=inverse, g_cumsum=g0, cu_seqlens=None)
    tol = 5e-3 if dtype == torch.float32 else 1e-2
    for name, ours, theirs in zip(("inverse", "w", "u"), triton_wy_form(k, p, v, beta, g0, gam), (inverse, w, u)):
        assert rel(ours, theirs) < tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_matches_reference_and_fla_on_gpu(dtype):
    """At the 8.1M model's shape and a ragged one against float64; and against what it replaces in fla's
    ``chunk_comba_bwd``: ``prepare_wy_repr_bwd``, the two adds and the two chunk-local cumsums."""
    failures = check_triton_backward_against_reference("cuda", dtype, GPU_CASES)
    assert not failures, "\n".join(failures)

    from fla.ops.comba.utils import chunk_comba_cumsum_scalar_bwd
    from fla.ops.comba.wy_fast import prepare_wy_repr_bwd
    from fla.ops.utils import chunk_local_cumsum

    from crossdna.ops.comba_wy_triton import wy_form as triton_wy_form
    from crossdna.ops.comba_wy_triton import wy_form_backward

    k, p, v, beta, g0, gam = _gpu_inputs(dtype, seed=3)
    inverse = triton_wy_form(k, p, v, beta, g0, gam)[0]
    gen = torch.Generator(device="cuda").manual_seed(4)
    dw, du, dk = (torch.randn(x.shape, generator=gen, device="cuda").to(dtype) for x in (k, v, k))
    dg = torch.randn(gam.shape, generator=gen, device="cuda")
    dk2, dv, dp, dbeta, dg0, dg2 = prepare_wy_repr_bwd(k=k, v=v, p=p, beta=beta, g0=g0, g=gam, A=inverse, dw=dw,
                                                       du=du, cu_seqlens=None)
    theirs = dict(dk=dk + dk2, dv=dv, dp=dp, dbeta=dbeta,
                  dg=chunk_local_cumsum(dg + dg2, chunk_size=64, reverse=True)
                  + chunk_comba_cumsum_scalar_bwd(dg0, chunk_size=64))
    dv, dp, dbeta = wy_form_backward(k, p, v, beta, g0, gam, inverse, dw, du, dk, dg)
    ours = dict(dk=dk, dv=dv, dp=dp, dbeta=dbeta, dg=dg)
    tol = 5e-3 if dtype == torch.float32 else 2e-2
    errors = {name: rel(ours[name], theirs[name]) for name in theirs}
    assert all(e < tol for e in errors.values()), errors
