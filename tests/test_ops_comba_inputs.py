"""Comba's input stage: the reference (crossdna/ops/comba.py) against the layer's formulas, and the Triton kernels
(crossdna/ops/comba_inputs_triton.py) against the reference: on CPU through Triton's interpreter, on a GPU compiled.
Errors are relative L2 norms against a float64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossdna.ops.comba import chunk_comba, comba_inputs, l2_normalize

from tests.kernel_checks import rel, run_interpreted

CUDA = torch.cuda.is_available()


def _inputs(B, T, H, K, V, taps, seed=0, pad=0, device="cpu"):
    """Projections with ``pad`` extra channels per row (a strided view, as a slice of a wider GEMM output)."""
    gen = torch.Generator().manual_seed(seed)
    C = H * (2 * K + V)
    qkv = torch.randn(B, T, C + pad, generator=gen, dtype=torch.float64)[..., :C]
    weight = torch.randn(C, taps, generator=gen, dtype=torch.float64) * 0.5
    decay_gate = torch.rand(H, generator=gen, dtype=torch.float64)
    correction = torch.randn(H, generator=gen, dtype=torch.float64) * 0.5
    return [x.to(device) for x in (qkv, weight, decay_gate, correction)]


def test_reference_matches_the_layer_formulas():
    B, T, H, K, V, taps = 2, 9, 2, 4, 3, 4
    qkv, weight, decay_gate, correction = _inputs(B, T, H, K, V, taps)
    q, k, v, p = comba_inputs(qkv, weight, decay_gate, correction, H, V)
    C = qkv.shape[-1]
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):  # causal: y_t = Σ_j w[j]·x_{t−taps+1+j}
        for j in range(taps):
            if t - taps + 1 + j >= 0:
                y[:, t] += weight[:, j] * qkv[:, t - taps + 1 + j]
    y = y * torch.sigmoid(y)
    qt, kt, vt = y[..., :H * K].view(B, T, H, K), y[..., H * K:2 * H * K].view(B, T, H, K), y[..., 2 * H * K:]
    pt = kt * decay_gate[:, None]
    qh = qt - correction[:, None] * pt
    unit = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    for got, want in ((q, unit(qh)), (k, unit(kt)), (v, vt.view(B, T, H, V)), (p, unit(pt))):
        assert rel(got, want) < 1e-12


def test_normalising_before_the_kernel_is_the_kernels_own_norm():
    """The layer now hands the kernel L2-normalised q, k, p with use_qk_l2norm=False: the same function."""
    gen = torch.Generator().manual_seed(1)
    B, T, H, K = 2, 70, 2, 8
    q, k, v, p = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(4))
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    inside = chunk_comba(q, k, v, p, g, beta, use_qk_l2norm=True)
    before = chunk_comba(l2_normalize(q), l2_normalize(k), v, l2_normalize(p), g, beta, use_qk_l2norm=False)
    assert rel(before, inside) < 1e-12


# ------------------------------------------------------------------------------------ Triton against reference
CASES = [  # B, T, H, K, V, taps, extra channels (strided rows)
    (2, 37, 2, 16, 16, 4, 5),
    (1, 300, 1, 8, 16, 3, 0),   # crosses a backward program boundary (256 tokens); V ≠ K; 3 taps
]


def check_triton_against_reference(device: str, dtype: torch.dtype, cases, compiled: bool = False) -> list[str]:
    """Forward outputs and every gradient of the Triton op against the float64 reference; returns failures."""
    from crossdna.ops.comba_inputs_triton import comba_inputs as triton_inputs

    fn = torch.compile(triton_inputs, fullgraph=True) if compiled else triton_inputs
    # Per-head gradients (D, σ(decay)) are sums over every token with cancellation: fp32 gives ~1e-5 there.
    out_tol, grad_tol = (2e-6, 1e-4) if dtype == torch.float32 else (1e-2, 2e-2)
    failures = []
    for case in cases:
        B, T, H, K, V, taps, pad = case
        # The reference runs on the tested dtype's rounding of qkv and of the output gradients: the D and σ(decay)
        # gradients are sums over tokens with cancellation, which input rounding alone moves by percents in bf16.
        qkv64, *params64 = _inputs(B, T, H, K, V, taps, pad=pad, device=device)
        ref_in = [x.requires_grad_() for x in (qkv64.to(dtype).double(), *params64)]
        ref_out = comba_inputs(*ref_in, H, V)
        gen = torch.Generator().manual_seed(2)
        grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device).to(dtype).double()
                 for o in ref_out]
        torch.autograd.backward(ref_out, grads)
        wide = torch.zeros(B, T, ref_in[0].shape[-1] + pad, dtype=dtype, device=device)
        wide[..., :ref_in[0].shape[-1]] = ref_in[0].detach()
        qkv = wide[..., :ref_in[0].shape[-1]].requires_grad_()
        params = [x.detach().float().requires_grad_() for x in ref_in[1:]]
        out = fn(qkv, *params, H, V)
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        checks = [(f"out {n}", o, r, out_tol) for n, o, r in zip("qkvp", out, ref_out)]
        checks += [(f"grad {n}", t.grad, r.grad, grad_tol)
                   for n, t, r in zip(("qkv", "weight", "decay_gate", "correction"), [qkv, *params], ref_in)]
        for name, got, want, tol in checks:
            if got.dtype != (dtype if name.startswith("out") or name == "grad qkv" else torch.float32):
                failures.append(f"{case} {name}: dtype {got.dtype}")
            err = rel(got, want)
            if not err < tol:
                failures.append(f"{case} {dtype} {name}: rel {err:.2e} > {tol:.0e}")
    return failures


def test_triton_kernels_match_reference_interpreted():
    """The kernels' index arithmetic, masks, tails and gradient chain, on CPU through TRITON_INTERPRET=1 (set
    before Triton is imported, hence a fresh interpreter)."""
    # other tile shapes too: the benchmark may choose any of them
    run_interpreted("test_ops_comba_inputs", "check_triton_against_reference",
                    "from crossdna.ops import comba_inputs_triton as k; k.FWD_TILE['BT'] = k.CHAIN_TILE['BT'] = 128;"
                    "k.CONV_TILE.update(BT=16, BC=128)", retiled_cases=1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_triton_kernels_match_reference_on_gpu(dtype, compiled):
    """At the 8.1M model's shapes (8 heads of 64, 4 taps, 1024 tokens) and the test's tails, eager and inside a
    ``torch.compile``d region (fullgraph: the custom op must not break the graph)."""
    cases = [*CASES, (3, 1024, 8, 64, 64, 4, 0)]
    failures = check_triton_against_reference("cuda", dtype, cases, compiled)
    assert not failures, "\n".join(failures)
