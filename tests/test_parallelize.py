"""The graphed DDP engine (local gradients, one flat all-reduce in ``clip_grads``) trains as DDP does: two real gloo
ranks, each with its own batches, through the gate's unfreezing. The capture itself needs CUDA
(tests/test_launcher_gpu.py); what it changes in the engine is checked here."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
from launcher.distributed import init_distributed, shutdown
from launcher.optim import OptimConfig
from launcher.parallelize import TorchEngine

STEPS, FREEZE = 4, 2


def _model() -> SSScanDNAHybridModel:
    torch.manual_seed(0)
    return SSScanDNAHybridModel(CrossDNAConfig.preset("tiny").replace(gate_freeze_steps=FREEZE, dropout=0.0,
                                                                      bridge_dropout=0.0))


def _train(env, graphed: bool) -> dict[str, torch.Tensor]:
    model = _model()
    engine = TorchEngine(model, "ddp", env, OptimConfig(lr=1e-2), precision="fp32", grad_accum=2, graphed=graphed)
    data = torch.Generator().manual_seed(100 + env.rank)  # each rank its own batches
    for step in range(STEPS):
        engine.set_step(step)
        for micro in range(2):
            engine.set_grad_sync(micro == 1)
            out = engine.forward(torch.randint(0, 5, (2, 64), generator=data))
            engine.backward(out.logits.float().logsumexp(-1).mean() + out.fa.pow(2).mean())
        engine.clip_grads()
        engine.optimizer_step(1e-2)
        engine.update_ema()
        if step == FREEZE - 1:
            frozen = {k: v.clone() for k, v in model.state_dict().items() if "gate_fuse" in k}
    return {"final": {k: v.clone() for k, v in model.state_dict().items()}, "frozen": frozen}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a 2-core box: contending OpenMP threads make it ~5x slower
    env = init_distributed()
    try:
        torch.save({mode: _train(env, graphed) for mode, graphed in (("ddp", False), ("graphed", True))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


def test_graphed_engine_averages_gradients_as_ddp_does(tmp_path, port):
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = _model().state_dict()
    for r in ranks:
        ddp, graphed = r["ddp"]["final"], r["graphed"]["final"]
        for name, value in ddp.items():
            torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-6, msg=name)
        # While the gate is frozen gate_fuse has no gradient and AdamW leaves it alone (no weight decay either).
        for name, value in r["graphed"]["frozen"].items():
            assert torch.equal(value, initial[name]) and torch.equal(r["ddp"]["frozen"][name], initial[name]), name
    # The averaged gradients kept the ranks' replicas identical although their batches differed.
    for name, value in ranks[0]["graphed"]["final"].items():
        assert torch.equal(value, ranks[1]["graphed"]["final"][name]), name
    moved = [k for k, v in ranks[0]["graphed"]["final"].items()
             if k in initial and v.is_floating_point() and "gate_fuse" not in k and not torch.equal(v, initial[k])]
    assert moved, "no parameter moved: the steps did not train"
