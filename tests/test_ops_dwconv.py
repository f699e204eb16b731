"""The TokenBridge's dilated depthwise convolutions: the reference (crossdna/ops/dwconv.py) against nn.Conv1d as
upstream builds them, and the Triton kernels (crossdna/ops/dwconv_triton.py) against the reference: on CPU through
Triton's interpreter, on a GPU compiled. Errors are relative L2 norms against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdna.ops.dwconv import dilated_dwconv

from tests.kernel_checks import rel, run_interpreted

CUDA = torch.cuda.is_available()


def test_reference_is_upstreams_conv_stack():
    gen = torch.Generator().manual_seed(0)
    B, T, C, K, dilations = 2, 45, 6, 9, (1, 2, 4, 8, 16)
    convs = [nn.Conv1d(C, C, K, padding=d * (K // 2), dilation=d, groups=C, bias=False).double() for d in dilations]
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    want = torch.cat([conv(x.transpose(1, 2)) for conv in convs], dim=1).transpose(1, 2)   # upstream's [B, T, N·C]
    got = dilated_dwconv(x, torch.stack([c.weight[:, 0] for c in convs]), dilations)
    assert got.shape == (B, T, len(dilations), C)
    assert rel(got.flatten(2), want) < 1e-14


CASES = [  # B, T, C, K, dilations, extra channels (strided rows)
    (2, 37, 20, 9, (1, 2, 4), 3),            # channels not a multiple of the tile; offsets past both ends
    (1, 300, 8, 9, (1, 2, 4, 8, 16), 0),     # crosses a weight-gradient program boundary (256 tokens)
    (2, 16, 5, 3, (16,), 0),                 # every tap but the centre outside the sequence
]


def check_triton_against_reference(device: str, dtype: torch.dtype, cases, compiled: bool = False) -> list[str]:
    from crossdna.ops.dwconv_triton import dilated_dwconv as triton_dwconv

    fn = torch.compile(triton_dwconv, fullgraph=True) if compiled else triton_dwconv
    out_tol, grad_tol = (2e-6, 2e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    failures = []
    for case in cases:
        B, T, C, K, dilations, pad = case
        gen = torch.Generator().manual_seed(1)
        # The reference sees the tested dtype's rounding of x and of the output gradient: only kernel error remains.
        x = torch.randn(B, T, C, generator=gen, dtype=torch.float64).to(dtype).double().to(device).requires_grad_()
        w = (torch.randn(len(dilations), C, K, generator=gen, dtype=torch.float64) * 0.3).to(device).requires_grad_()
        ref = dilated_dwconv(x, w, dilations)
        grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
        ref.backward(grad)
        wide = torch.zeros(B, T, C + pad, dtype=dtype, device=device)
        wide[..., :C] = x.detach()
        xt = wide[..., :C].requires_grad_()
        wt = w.detach().float().requires_grad_()
        out = fn(xt, wt, dilations)
        out.backward(grad.to(dtype))
        for name, got, want, tol in (("out", out, ref, out_tol), ("grad x", xt.grad, x.grad, grad_tol),
                                     ("grad weight", wt.grad, w.grad, grad_tol)):
            err = rel(got, want)
            if got.dtype != (torch.float32 if name == "grad weight" else dtype) or not err < tol:
                failures.append(f"{case} {dtype} {name}: {got.dtype}, rel {err:.2e} (tol {tol:.0e})")
    return failures


def test_triton_kernels_match_reference_interpreted():
    """Index arithmetic, masks and tails on CPU through TRITON_INTERPRET=1 (set before Triton is imported, hence a
    fresh interpreter), at the default tiles and at another set."""
    run_interpreted("test_ops_dwconv", "check_triton_against_reference",
                    "from crossdna.ops import dwconv_triton as k; k.FWD_TILE.update(BT=16, BC=16);"
                    "k.DX_TILE.update(BT=64, BC=16); k.DW_TILE.update(BT=16, BC=32)", retiled_cases=2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_triton_kernels_match_reference_on_gpu(dtype, compiled):
    """At the 8.1M model's bridge shape (512 channels, k = 9, dilations 1..16, 1024 tokens) and the test's tails,
    eager and inside a ``torch.compile``d region (fullgraph: the custom op must not break the graph)."""
    cases = [*CASES, (3, 1024, 512, 9, (1, 2, 4, 8, 16), 0)]
    failures = check_triton_against_reference("cuda", dtype, cases, compiled)
    assert not failures, "\n".join(failures)
