"""Reference kernels other than Comba, checked against direct formulas, and the backend seam."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crossdna import ops
from crossdna.ops.attention import band_mask, rotary, sliding_window_attention
from crossdna.ops.pointwise import gated_rms_norm, rms_norm, swiglu

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_band_mask_matches_a_loop():
    length, window = 11, 4
    mask = band_mask(length, window)
    for i in range(length):
        for j in range(length):
            assert bool(mask[i, j]) == (i - window < j <= i), (i, j)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window_attention_matches_brute_force(window):
    gen = torch.Generator().manual_seed(0)
    B, l, H, d = 2, 16, 2, 8
    q, k, v = (torch.randn(B, l, H, d, generator=gen, dtype=torch.float64) for _ in range(3))
    scale = 0.3
    out = sliding_window_attention(q, k, v, window, scale)
    expected = torch.zeros_like(out)
    for b in range(B):
        for h in range(H):
            for i in range(l):
                keys = [j for j in range(l) if i - window < j <= i]
                w = torch.softmax(torch.stack([q[b, i, h] @ k[b, j, h] * scale for j in keys]), 0)
                expected[b, i, h] = sum(wj * v[b, j, h] for wj, j in zip(w, keys))
    assert torch.allclose(out, expected, atol=1e-12)


def test_rotary_matches_the_direct_formula():
    gen = torch.Generator().manual_seed(0)
    B, l, H, d, base = 1, 9, 2, 8, 10000.0
    q, k = (torch.randn(B, l, H, d, generator=gen) for _ in range(2))
    rq, rk = rotary(q, k, base)
    half = d // 2
    for x, rx in ((q, rq), (k, rk)):
        for m in range(l):
            for i in range(half):
                theta = m * base ** (-2 * i / d)
                c, s = math.cos(theta), math.sin(theta)
                a, b = x[0, m, :, i], x[0, m, :, i + half]
                assert torch.allclose(rx[0, m, :, i], a * c - b * s, atol=1e-5)
                assert torch.allclose(rx[0, m, :, i + half], b * c + a * s, atol=1e-5)
    # Relative positions only: the score of (m, n) depends on m − n.
    q1 = q[:, :1].expand(B, l, H, d)
    rq1, rk1 = rotary(q1, q1, base)
    s01 = (rq1[0, 1] * rk1[0, 0]).sum(-1)
    s56 = (rq1[0, 6] * rk1[0, 5]).sum(-1)
    assert torch.allclose(s01, s56, atol=1e-5)


def test_norms_and_swiglu_match_formulas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(rms_norm(x, w, 1e-5), rms, atol=1e-12)
    assert torch.allclose(gated_rms_norm(x, z, w, 1e-5), rms * torch.sigmoid(z), atol=1e-12)
    assert torch.allclose(swiglu(x, z), x * torch.sigmoid(x) * z, atol=1e-12)
    assert rms_norm(x.float().bfloat16(), w.float(), 1e-5).dtype == torch.bfloat16



def test_backend_resolution():
    cpu = torch.device("cpu")
    assert ops.resolve("reference", cpu) == "reference"
    assert ops.resolve("auto", cpu) == "reference"
    with pytest.raises(ValueError, match="fused"):
        ops.resolve("fused", cpu)
    with pytest.raises(ValueError, match="not one of"):
        ops.resolve("cudnn", cpu)
    with pytest.raises(ValueError, match="unknown op"):
        ops.register_backend("spy", {"softmax": torch.softmax})


def test_a_registered_backend_is_used_and_falls_back_per_op():
    calls = []

    def spy_swiglu(gate, up):
        calls.append(gate.shape)
        return swiglu(gate, up)

    ops.register_backend("spy", {"swiglu": spy_swiglu})
    try:
        x = torch.randn(2, 3)
        assert torch.equal(ops.swiglu(x, x, backend="spy"), swiglu(x, x))
        assert calls == [x.shape]
        assert torch.equal(ops.rms_norm(x, torch.ones(3), 1e-5, backend="spy"), rms_norm(x, torch.ones(3), 1e-5))
    finally:
        ops._REGISTRY.pop("spy")
