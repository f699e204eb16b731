"""Comba kernels: the chunked WY reference against the token-by-token recurrence of spec §2.4 (and fla's naive)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from crossdna import ops
from crossdna.ops.comba import chunk_comba, l2_normalize, recurrent_comba

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _inputs(T: int, B=2, H=3, K=8, V=4, seed=0, dtype=torch.float64, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, p = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    # log decays spanning 1e-3 … ~8 per token (α from ~1 down to ~3e-4), β over (0, 1).
    g = -torch.exp(torch.randn(B, T, H, generator=gen, dtype=dtype) * (2.0 if strong_decay else 1.0) - 1.0)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, p, g, beta


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300, 1024])
def test_chunk_matches_recurrence_float64(T):
    B, H = (1, 2) if T == 1024 else (2, 3)
    args = _inputs(T, B=B, H=H, strong_decay=T == 300)
    chunk = chunk_comba(*args)
    rec = recurrent_comba(*args)
    assert chunk.shape == rec.shape == (B, T, H, 4)
    assert chunk.dtype == torch.float64
    rel = (chunk - rec).abs().max() / rec.abs().max()
    assert rel <= 1e-10, rel


def test_chunk_gradients_match_recurrence():
    args = [x.requires_grad_() for x in _inputs(70, B=1, H=2)]
    grads_chunk = torch.autograd.grad(chunk_comba(*args).pow(2).sum(), args)
    grads_rec = torch.autograd.grad(recurrent_comba(*args).pow(2).sum(), args)
    for name, a, b in zip("q k v p g beta".split(), grads_chunk, grads_rec):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max() <= 1e-9 * b.abs().max().clamp_min(1.0), name


def test_chunk_size_and_scale_are_respected():
    args = _inputs(100)
    base = chunk_comba(*args, scale=0.3, chunk_size=64)
    assert torch.allclose(chunk_comba(*args, scale=0.3, chunk_size=16), base, rtol=0, atol=1e-12)
    assert torch.allclose(recurrent_comba(*args, scale=0.3), base, rtol=0, atol=1e-12)
    assert torch.allclose(chunk_comba(*args, scale=0.6), 2 * chunk_comba(*args, scale=0.3), atol=1e-12)


def test_recurrence_predicts_from_the_undecayed_state():
    """Two tokens by hand: u₂ = β₂(v₂ − S₁ᵀp₂) with S₁ = k₁u₁ᵀ (no α₂ inside), S₂ = α₂S₁ + k₂u₂ᵀ."""
    q, k, v, p, g, beta = _inputs(2, B=1, H=1, K=4, V=3)
    qn, kn, pn = l2_normalize(q), l2_normalize(k), l2_normalize(p)
    b, a = beta[0, :, 0], g[0, :, 0].exp()
    u1 = b[0] * v[0, 0, 0]
    s1 = torch.outer(kn[0, 0, 0], u1)
    u2 = b[1] * (v[0, 1, 0] - s1.T @ pn[0, 1, 0])
    s2 = a[1] * s1 + torch.outer(kn[0, 1, 0], u2)
    expected = torch.stack([s1.T @ qn[0, 0, 0], s2.T @ qn[0, 1, 0]]) * 0.5  # scale = K^-1/2 = 1/2
    assert torch.allclose(recurrent_comba(q, k, v, p, g, beta)[0, :, 0], expected, atol=1e-12)
    assert torch.allclose(chunk_comba(q, k, v, p, g, beta)[0, :, 0], expected, atol=1e-12)


def test_low_precision_inputs_compute_in_fp32():
    args = _inputs(65, dtype=torch.float32)
    out = chunk_comba(*(x.to(torch.bfloat16) for x in args))
    assert out.dtype == torch.bfloat16
    ref = recurrent_comba(*(x.to(torch.bfloat16).double() for x in args))
    assert (out.double() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_dispatch_uses_the_reference_on_cpu():
    args = _inputs(65)
    assert ops.resolve("auto", torch.device("cpu")) == "reference"
    assert torch.equal(ops.comba(*args, scale=None, chunk_size=64), chunk_comba(*args))


def _fla_naive():
    """fla/ops/comba/naive.py loaded on its own: it needs only torch and einops, while ``import fla`` pulls in
    Triton, dynamo and transformers (10-30 s on a CI box)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla is not installed")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "comba" / "naive.py"
    if not path.is_file():
        pytest.skip(f"{path} not found (fla < 0.6.0 shipped the reference only in its tests)")
    module_spec = importlib.util.spec_from_file_location("fla_comba_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_matches_fla_naive_chunk_comba():
    """Ties our kernel to upstream's definition: fla's naive_chunk_comba (pure torch; it computes in fp32)."""
    naive = _fla_naive()
    q, k, v, p, g, beta = _inputs(150, dtype=torch.float64)
    ours = chunk_comba(q, k, v, p, g, beta)
    theirs, _ = naive.naive_chunk_comba(l2_normalize(q), l2_normalize(k), v, l2_normalize(p), g, beta, chunk_size=64)
    assert (ours - theirs.double()).abs().max() <= 1e-5 * ours.abs().max()
    # …and it is NOT fla's naive_recurrent_comba, which decays the state before the prediction (spec §2.4).
    other, _ = naive.naive_recurrent_comba(l2_normalize(q), l2_normalize(k), v, l2_normalize(p), beta, g)
    assert (ours - other.double()).abs().max() > 1e-3 * ours.abs().max()
