"""Comba's chunk recurrence and output kernel (crossdna/ops/comba_output_triton.py) after the WY form, against the
float64 chunked reference (crossdna/ops/comba.py): on CPU through Triton's interpreter, on a GPU compiled and
against fla's ``chunk_gated_delta_rule_fwd_h`` + ``chunk_fwd_o`` it replaces. Errors are relative L2 norms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossdna.ops.comba import chunk_comba

from tests.kernel_checks import rel, run_interpreted
from tests.test_ops_comba_wy import MODEL_SHAPE_CASES, _inputs, _log2_cumsums, _padded_wy_form, _rounded_inputs

CUDA = torch.cuda.is_available()
SCALE = 0.125


def check_against_reference(device: str, dtype: torch.dtype, cases) -> list[str]:
    """The kernel on w, u of the float64 WY form and then on those of the Triton WY kernel, against the float64
    chunked Comba (which runs its own WY form and recurrence)."""
    from crossdna.ops.comba_output_triton import state_output
    from crossdna.ops.comba_wy_triton import WY_TILE_FP32
    from crossdna.ops.comba_wy_triton import wy_form as triton_wy_form

    tol = 2e-5 if dtype == torch.float32 else 2e-2
    # fp32: the WY kernel multiplies in TF32 (as fla's kernels do; in the interpreter too), the output kernel does not
    wy_tol = 5e-3 if dtype == torch.float32 and WY_TILE_FP32["DOT"] != "ieee" else tol
    failures = []
    for case in cases:
        B, T, H, K = case[:4]
        k, p, v, beta, g = _rounded_inputs(*case, dtype)
        q = F.normalize(torch.randn(B, T, H, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                        dim=-1).to(dtype).double()
        want = chunk_comba(q, k, v, p, g, beta, scale=SCALE, use_qk_l2norm=False)
        _, w, u = _padded_wy_form(k, p, v, beta, g)
        g0, gam = _log2_cumsums(g)
        on = lambda x: x.to(device, dtype)  # noqa: E731
        gam_d = gam.float().to(device)
        _, w_t, u_t = triton_wy_form(on(k), on(p), on(v), on(beta), g0.float().to(device), gam_d, keep_inverse=False)
        for source, (w_in, u_in), bound in (("float64 WY form", (on(w), on(u)), tol),
                                            ("Triton WY form", (w_t, u_t), wy_tol)):
            got = state_output(on(q), on(k), w_in, u_in, gam_d, SCALE)
            err = rel(got.cpu(), want)
            if got.dtype != dtype or got.shape != want.shape or not err < bound:
                failures.append(f"{case} {dtype} after the {source}: {got.dtype} "
                                f"{tuple(got.shape)}, rel {err:.2e} (tol {bound:.0e})")
    return failures


CASES = [  # B, T, H, K, V, log-decay scale, keys (tests/test_ops_comba_wy.py _inputs)
    (2, 192, 2, 32, 16, 0.3, "clustered"),     # three chunks: the state carried twice
    (1, 100, 3, 16, 32, 0.3, "clustered"),     # a ragged last chunk; V > K
    (1, 100, 2, 32, 16, 8.0, "clustered"),     # decays past 2^-128 inside a chunk, rows past T
    (1, 192, 2, 16, 16, 0.01, "aligned"),      # keys as after some training
]


def test_triton_kernel_matches_reference_interpreted():
    run_interpreted("test_ops_comba_output", "check_against_reference")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference_and_fla_on_gpu(dtype):
    """At the 8.1M model's shape and a ragged one; and against fla's two kernels on the same w, u (fla's products
    are TF32 in fp32)."""
    failures = check_against_reference("cuda", dtype, [*CASES, *MODEL_SHAPE_CASES])
    assert not failures, "\n".join(failures)

    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o

    from crossdna.ops.comba_output_triton import state_output
    from crossdna.ops.comba_wy_triton import wy_form as triton_wy_form

    k, p, v, beta, g = (x.to("cuda", dtype) if i < 4 else x.float().cuda() for i, x in
                        enumerate(_inputs(3, 1024, 8, 64, 64, seed=2)))
    q = F.normalize(torch.randn_like(k, dtype=torch.float32), dim=-1).to(dtype)
    g0, gam = (x.float().cuda() for x in _log2_cumsums(g.cpu().double()))
    _, w, u = triton_wy_form(k, p, v, beta, g0, gam, keep_inverse=False)
    h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=gam)
    theirs = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=gam, scale=SCALE)
    assert rel(state_output(q, k, w, u, gam, SCALE), theirs) < (5e-3 if dtype == torch.float32 else 1e-2)
