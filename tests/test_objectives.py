"""Pretraining objective terms on hand-computed cases, schedules, and the Gram term's fast form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossdna.model import PretrainOutput
from crossdna.objectives import (ObjectiveConfig, gate_weight, gram_exact, gram_fast, masked_cross_entropy,
                                 pretrain_loss, sem_weight, semantic_preservation)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _output(B=1, L=4, d=2, block=4, fa=None, fb=None, ta=None, tb=None, gate_logits=None, logits=None,
            logits_a=None, logits_b=None, freeze=5000, temp=2.0) -> PretrainOutput:
    zeros = torch.zeros(B, L, d)
    return PretrainOutput(
        logits=torch.zeros(B, L, 5) if logits is None else logits,
        fa=zeros if fa is None else fa, fb=zeros if fb is None else fb,
        gate_logits=gate_logits,
        target_a=zeros if ta is None else ta, target_b=zeros if tb is None else tb,
        logits_a=torch.zeros(B, L, 5) if logits_a is None else logits_a,
        logits_b=torch.zeros(B, L, 5) if logits_b is None else logits_b,
        a_is_rc=(torch.arange(L) // block % 2).bool(), block_size=block,
        gate_freeze_steps=freeze, gate_temp=temp, gate_frozen=gate_logits is None)


def test_weight_schedules_follow_upstream():
    cfg = ObjectiveConfig()
    assert [sem_weight(s, cfg) for s in (-1, 0, 5000, 10000, 20000)] == [0.0, 0.0, 0.06, 0.12, 0.12]
    assert [gate_weight(s, 5000, cfg) for s in (0, 4999, 5000, 5500, 6000, 9000)] == [0, 0, 0, 0.01, 0.02, 0.02]
    assert gate_weight(9000, 5000, ObjectiveConfig(gate_sup_weight=0.0)) == 0.0
    assert sem_weight(3, ObjectiveConfig(sem_warmup_steps=0)) == 0.12


def test_masked_cross_entropy_by_hand_and_empty_mask():
    logits = torch.tensor([[[2.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0, 0, 0]]], requires_grad=True)
    labels = torch.tensor([[0, 3, 4]])
    mask = torch.tensor([[True, True, False]])
    expected = 0.5 * ((torch.logsumexp(logits[0, 0], 0) - 2.0) + (torch.logsumexp(logits[0, 1], 0) - 0.0))
    assert torch.allclose(masked_cross_entropy(logits, labels, mask), expected)
    empty = masked_cross_entropy(logits, labels, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()
    terms = pretrain_loss(_output(L=3, block=3), labels, torch.zeros_like(mask), 0)
    assert all(torch.isfinite(getattr(terms, k)) for k in ("total", "ce", "acc", "acc_a", "acc_b"))


def test_semantic_preservation_by_hand():
    # B=1, l=3, d=1: H = [0,1,3], R = 0 → recon = (0+1+9)/3, ΔH = [1,2] → local = (1+4)/2.
    h = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 3, 1)
    r = torch.zeros_like(h)
    cfg = ObjectiveConfig()
    assert torch.allclose(semantic_preservation(h, r, cfg), torch.tensor([10 / 3 + 0.5 * 2.5]))
    single = torch.tensor([2.0]).view(1, 1, 1, 1)  # l = 1: no local term
    assert torch.allclose(semantic_preservation(single, torch.zeros_like(single), cfg), torch.tensor([4.0]))


def test_gram_exact_matches_upstream_formula_and_fast_matches_exact():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 2, 40, 8, generator=gen, dtype=torch.float64)
    r = h + 0.3 * torch.randn(3, 2, 40, 8, generator=gen, dtype=torch.float64)

    def upstream(x_h, x_r):  # crossdna.py:369-373 on one block [B,l,d]
        def gram_norm(x):
            g = torch.einsum("bid,bjd->bij", x, x)
            return g / (g.norm(dim=(1, 2), keepdim=True) + 1e-6)
        return F.mse_loss(gram_norm(x_h), gram_norm(x_r))

    exact = gram_exact(h, r)
    for k in range(2):
        assert torch.allclose(exact[:, k].mean(), upstream(h[:, k], r[:, k]), rtol=1e-12)
    fast = gram_fast(h, r)
    assert torch.allclose(fast.double(), exact, rtol=1e-4, atol=1e-12)
    assert gram_fast(h, h).abs().max() < 1e-9
    cfg_exact, cfg_fast = ObjectiveConfig(gram="exact"), ObjectiveConfig(gram="fast")
    assert torch.allclose(semantic_preservation(h, r, cfg_exact), semantic_preservation(h, r, cfg_fast), rtol=1e-6)
    off = semantic_preservation(h, r, ObjectiveConfig())
    assert torch.allclose(semantic_preservation(h, r, cfg_exact) - off, 0.2 * exact.mean(0))


def test_aux_terms_are_averaged_over_blocks_unless_upstream_sum():
    # Two blocks of 2 tokens: FA is off its target by 1 in block 0 and by 3 in block 1 (constant, so local = 0).
    fa = torch.tensor([1.0, 1.0, 3.0, 3.0]).view(1, 4, 1)
    out = _output(L=4, d=1, block=2, fa=fa, freeze=10**9)
    labels, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    step = 10000  # w_sem = 0.12
    mean = pretrain_loss(out, labels, mask, step, ObjectiveConfig())
    total = pretrain_loss(out, labels, mask, step, ObjectiveConfig(aux_block_reduction="sum"))
    assert torch.allclose(mean.sem, torch.tensor((1.0 + 9.0) / 2))
    assert torch.allclose(total.sem, torch.tensor(1.0 + 9.0))
    assert torch.allclose(mean.total - mean.ce, torch.tensor(0.12 * 5.0))
    assert mean.w_sem == 0.12 and mean.gate.item() == 0.0


def test_gate_supervision_targets_the_forward_strand_per_block():
    c, temp = 1.5, 2.0
    gl = torch.full((1, 4, 3), c)
    out = _output(L=4, d=3, block=2, gate_logits=gl, freeze=100, temp=temp)
    labels, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    terms = pretrain_loss(out, labels, mask, 1100, ObjectiveConfig(sem_max_weight=0.0))
    # block 0: A holds the forward strand → target 1: softplus(−c/T); block 1: target 0 → softplus(c/T).
    expected = 0.5 * (F.softplus(torch.tensor(-c / temp)) + F.softplus(torch.tensor(c / temp)))
    assert torch.allclose(terms.gate, expected)
    assert terms.w_gate == 0.02 and torch.allclose(terms.total - terms.ce, 0.02 * expected)
    inactive = pretrain_loss(out, labels, mask, 99, ObjectiveConfig())
    assert inactive.gate.item() == 0.0 and inactive.w_gate == 0.0
    with pytest.raises(ValueError, match="set_step"):
        pretrain_loss(_output(L=4, block=2, freeze=100), labels, mask, 100, ObjectiveConfig())


def test_branch_accuracies_score_both_strands_against_forward_labels():
    # The branch that read the RC strand is flipped back to forward coordinates and shares the forward-label head,
    # so its logits predict the forward base (measured on a trained model: 0.35 vs forward, 0.24 vs complement).
    labels = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    mask = torch.ones_like(labels, dtype=torch.bool)
    complement = torch.tensor([3, 2, 1, 0, 4])[labels]
    a_is_rc = (torch.arange(8) // 4 % 2).bool()   # block 0 forward for A, block 1 RC for A
    out = _output(L=8, block=4, logits=F.one_hot(labels, 5).float() * 5, logits_a=F.one_hot(labels, 5).float(),
                  logits_b=F.one_hot(torch.where(a_is_rc, labels, complement), 5).float())
    terms = pretrain_loss(out, labels, mask, 0)
    assert terms.acc.item() == terms.acc_a.item() == 1.0
    assert terms.acc_b.item() == pytest.approx(0.5)   # B predicted the complement where it read the RC strand
    assert not terms.acc_a.requires_grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_compiled_semantic_preservation_is_the_eager_term(device):
    """pretrain_loss(compiled=True) (inductor: C++ on the CPU, Triton on the GPU) against the eager term, two blocks
    of bf16 features and fp32 targets as the pretraining step has them, values and gradients."""
    if device == "cpu":
        from tests.requires import tool

        tool("g++")  # inductor's CPU code is C++
    g = torch.Generator().manual_seed(0)
    B, L, d, block = 2, 128, 32, 64
    fa, fb = (torch.randn(B, L, d, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    ta, tb = (torch.randn(B, L, d, generator=g).to(device) for _ in range(2))
    labels = torch.randint(0, 5, (B, L), generator=g).to(device)
    mask = (torch.rand(B, L, generator=g) < 0.15).to(device)
    cfg = ObjectiveConfig(sem_warmup_steps=0)
    terms = {}
    torch._dynamo.reset()
    for compiled in (False, True):
        out = _output(B, L, d, block, fa=fa, fb=fb, ta=ta, tb=tb)
        out.logits, out.logits_a, out.logits_b = (x.to(device) for x in (out.logits, out.logits_a, out.logits_b))
        out.a_is_rc = out.a_is_rc.to(device)
        sem = pretrain_loss(out, labels, mask, 10, cfg, compiled=compiled).sem
        terms[compiled] = (sem.detach(), *torch.autograd.grad(sem, (fa, fb)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    for eager, compiled in zip(terms[False], terms[True]):
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-5, atol=1e-7)
    assert terms[False][0].item() > 0
