"""The pretraining trainer with its step captured as CUDA graphs (forward + backward; the optimizer step) trains as
the eager trainer does, and resumes from its checkpoints. Run with ``-m gpu`` on a CUDA machine."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train(shards: Path, run_dir: Path, cuda_graph: str):
    from launcher.config import load_train_config
    from launcher.distributed import init_distributed
    from launcher.train import Trainer

    # The tiny preset on real chr20 windows: 20 steps, the gate unfreezes at step 10 (a second capture), two
    # evaluations and checkpoints in between; dropout off so that both runs draw no random numbers.
    cfg = load_train_config(REPO / "configs" / "pretrain" / "tiny.yaml", [
        f"data.path={shards}", f"trainer.run_dir={run_dir}", f"trainer.cuda_graph={cuda_graph}",
        "trainer.deterministic=false", "trainer.precision=bf16", "model.dropout=0", "model.bridge_dropout=0"])
    env = init_distributed()
    try:
        trainer = Trainer(cfg, env)
        assert trainer.run() == 0
    finally:
        dist.destroy_process_group()
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # the last record of each step: a resumed run logs the steps after its checkpoint again
    return trainer, {r["step"]: r for r in records if "train/loss" in r}, [r for r in records if "eval/ce" in r]


def test_captured_trainer_matches_the_eager_trainer(chr20_shards, tmp_path):
    eager, eager_steps, eager_evals = _train(chr20_shards, tmp_path / "eager", "off")
    graphed, graph_steps, graph_evals = _train(chr20_shards, tmp_path / "graphed", "auto")
    assert not hasattr(eager._micro_step, "captures")
    # gate frozen: captured at step 3; live: at step 13 (two eager warm-ups each)
    assert graphed._micro_step.captures == 2
    assert sorted(graph_steps) == sorted(eager_steps) == list(range(1, 21))
    for step in range(1, 21):
        for key in ("train/loss", "train/ce", "train/sem", "train/gate", "train/grad_norm"):
            assert graph_steps[step][key] == pytest.approx(eager_steps[step][key], rel=2e-2, abs=1e-4), (step, key)
        # top-1 over ~170 masked tokens per step: one token is 0.006
        assert graph_steps[step]["train/acc"] == pytest.approx(eager_steps[step]["train/acc"], abs=0.03), step
    # same data in the same order, both runs
    assert [graph_steps[s]["train/index_sum"] for s in range(1, 21)] == [eager_steps[s]["train/index_sum"]
                                                                       for s in range(1, 21)]
    assert [e["eval/ce"] for e in graph_evals] == pytest.approx([e["eval/ce"] for e in eager_evals], rel=1e-2)
    assert graph_steps[20]["train/ce"] < graph_steps[1]["train/ce"] - 0.05

    # Resume the captured run from its step-10 checkpoint (optimizer state with device step counters, into a fresh
    # capturable optimizer): steps 11-20 again, captured anew.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "graphed", resumed_dir)
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000010\n")
    shutil.rmtree(resumed_dir / "checkpoints" / "step-00000020")
    resumed, resumed_steps, _ = _train(chr20_shards, resumed_dir, "auto")
    assert resumed._micro_step.captures == 1  # resumed at step 10: the live-gate phase only
    for step in range(11, 21):
        for key in ("train/loss", "train/ce", "train/index_sum"):
            assert resumed_steps[step][key] == pytest.approx(graph_steps[step][key], rel=2e-2), (step, key)
