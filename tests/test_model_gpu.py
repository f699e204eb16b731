"""The reference model on CUDA: no host syncs on the training path, and CPU/GPU agreement. Run with ``-m gpu``."""
from __future__ import annotations

import pytest
import torch

from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
from crossdna.objectives import ObjectiveConfig, pretrain_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batch(B: int, L: int, device: str):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (B, L), generator=gen)
    mask = torch.rand(B, L, generator=gen) < 0.15
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("length", [1024, 2048 + 300])  # one block (pretraining) and K>1 with a tail
def test_training_step_has_no_host_sync(length):
    torch.manual_seed(0)
    model = SSScanDNAHybridModel(CrossDNAConfig.preset("8m").replace(kernels="reference")).cuda().train()
    opt = torch.optim.AdamW(model.student_parameters(), lr=1e-4, fused=True)
    ids, mask = _batch(4, length, "cuda")
    cfg = ObjectiveConfig(gram="fast", sem_warmup_steps=10, gate_sup_warmup_steps=10)
    for step in (0, 6000):  # gate frozen, then gate live with supervision
        model.set_step(step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                terms = pretrain_loss(model(ids, mode="pretrain"), ids, mask, step, cfg)
            terms.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_ema()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(terms.total).item()


def test_cpu_and_cuda_agree():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = SSScanDNAHybridModel(CrossDNAConfig.preset("tiny").replace(kernels="reference")).eval()
    ids, _ = _batch(3, 64 * 2 + 30, "cpu")
    with torch.no_grad():
        cpu = model(ids, mode="pretrain")
        gpu = model.cuda()(ids.cuda(), mode="pretrain")
    for name in ("logits", "fa", "fb", "target_a", "target_b"):
        a, b = getattr(cpu, name), getattr(gpu, name).cpu()
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), name
