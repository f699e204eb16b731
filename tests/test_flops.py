"""The analytic FLOP model (crossdna.flops) against torch.utils.flop_counter on the tiny preset (CPU)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from crossdna import flops
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
from crossdna.objectives import ObjectiveConfig, pretrain_loss
from crossdna.ops.attention import band_mask

B, L = 2, 128  # two blocks of 64 (tiny preset), attention window 32 < block: the band matters


@pytest.fixture(scope="module")
def model() -> SSScanDNAHybridModel:
    torch.manual_seed(0)
    cfg = CrossDNAConfig.preset("tiny").replace(kernels="reference")
    m = SSScanDNAHybridModel(cfg).train()
    m.set_step(cfg.gate_freeze_steps + 1)  # gate unfrozen: gate_fuse runs
    return m


def _ids() -> torch.Tensor:
    return torch.randint(0, 5, (B, L), generator=torch.Generator().manual_seed(1))


def _linear(counts: dict) -> int:
    return counts.get(torch.ops.aten.mm, 0) + counts.get(torch.ops.aten.addmm, 0)


def test_forward_matches_flop_counter_exactly(model):
    cfg = model.cfg
    # SDPA's math path decomposes into matmuls the counter sees (its CPU fused kernel is not in the registry).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(_ids(), mode="pretrain")
    # The reference short convolution pads both sides and keeps the first T outputs: it computes K−1 outputs per
    # row more than the causal conv needs; the analytic count (the work a causal kernel does) leaves them out.
    c = cfg.comba
    rows = (2 * B + 2 * 2 * B) * (L // cfg.block_size)  # student: 2 branches × B, teacher: 2 EMA branches × 2B
    padding = rows * cfg.depth * (c.conv_size - 1) * c.conv_size * 2 * (2 * c.num_heads * c.head_dim
                                                                     + c.num_heads * c.head_v_dim)
    expected = flops.forward_flops(cfg, B, L, attention="dense", kernel="reference") + padding
    assert counter.get_total_flops() == expected


def test_backward_of_linear_layers_is_twice_their_forward(model):
    """The 2× backward rule, measured: every student Linear needs both input and weight gradients."""
    ids = _ids()
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as student:
            model(ids, mode="logits")
        with FlopCounterMode(display=False) as forward:
            out = model(ids, mode="pretrain")
        with FlopCounterMode(display=False) as step:
            out = model(ids, mode="pretrain")
            terms = pretrain_loss(out, ids, torch.rand(B, L, generator=torch.Generator().manual_seed(2)) < 0.15,
                                  step=20000, cfg=ObjectiveConfig())
            terms.total.backward()
    model.zero_grad(set_to_none=True)
    backward = _linear(step.get_flop_counts()["Global"]) - _linear(forward.get_flop_counts()["Global"])
    assert backward == 2 * _linear(student.get_flop_counts()["Global"])


@pytest.mark.parametrize("length,window", [(1024, 512), (64, 32), (10, 512), (7, 1)])
def test_mean_band_keys_counts_the_mask(length, window):
    assert flops.mean_band_keys(length, window) == pytest.approx(band_mask(length, window).sum().item() / length)


def test_training_step_composition_8m():
    cfg = CrossDNAConfig.preset("8m")
    step = flops.train_step_flops(cfg, 150, 1024)
    assert step["total"] == pytest.approx(sum(v for k, v in step.items() if k != "total"))
    # The teacher runs 4 branch passes forward; the student 2 passes forward + backward (3×): ratio 4/6.
    for part in ("comba_kernel", "comba_proj", "attention_core", "mlp"):
        assert step[f"teacher_{part}"] == pytest.approx(step[f"student_{part}"] * 4 / 6)
    # Per token and branch pass, a layer does ~2 MFLOP; the whole step ~124 MFLOP per token.
    per_token = step["total"] / (150 * 1024)
    assert 1.1e8 < per_token < 1.4e8
    no_teacher = flops.train_step_flops(cfg, 150, 1024, teacher=False)
    assert not any(k.startswith("teacher_") for k in no_teacher)
    assert flops.train_step_flops(cfg, 150, 1024, gram="exact")["total"] > step["total"]


def test_peak_lookup():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert flops.peak_flops("some CPU") is None
    u = flops.utilisation(1e12, 0.01, "NVIDIA H200")
    assert u.achieved == 1e14 and u.mfu == pytest.approx(1e14 / 989.4e12)
