"""One training run of the 8.1M preset at a given precision and seed, for comparing bf16 with fp32 training.

The seed draws the initial weights and the dropout masks; the batches (real chr20 windows, MLM-masked as in
training) are the same for every run, and so are the held-out batches scored every ``eval_every`` steps. Used by
``benchmarks/precision_curves.py`` (several seeds per precision, plotted) and by
``tests/test_ops_fused.py::test_bf16_training_tracks_fp32_on_chr20``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from crossdna.bench.train_step import STEP, make_step, real_batches
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
from crossdna.objectives import ObjectiveConfig, pretrain_loss

# name -> (CombaConfig.precision, bf16 autocast around the step)
PRECISIONS = {"fp32": ("fp32", False), "bf16": ("autocast", True), "upstream": ("fp32", True)}
HELD_OUT_BATCHES = 4


def train_curve(precision: str, seed: int, fasta: str, steps: int = 200, batch: int = 16, lr: float = 1e-3,
                eval_every: int = 50, progress: Callable[[str], None] | None = None) -> dict:
    """``steps`` AdamW steps at a constant ``lr``, every loss term on, fused kernels, TF32 off. Returns the loss
    of every step and the held-out masked-LM CE at step 0, every ``eval_every`` steps and at the end."""
    comba, amp = PRECISIONS[precision]
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        batches = [{k: v.cuda() for k, v in b.items()}
                   for b in real_batches(fasta, batch, 1024, steps + HELD_OUT_BATCHES, seed=3)]
        train, held_out = batches[:steps], batches[steps:]
        torch.manual_seed(seed)
        cfg = CrossDNAConfig.preset("8m").replace(kernels="fused")
        model = SSScanDNAHybridModel(cfg.replace(comba=dataclasses.replace(cfg.comba, precision=comba))).cuda()
        model.set_step(STEP)
        objective = ObjectiveConfig()
        opt = torch.optim.AdamW(model.student_parameters(), lr=lr, weight_decay=0.1, fused=True)
        step = make_step(model.train(), opt, amp, objective, STEP)

        @torch.no_grad()
        def evaluate() -> float:
            model.eval()
            ce = []
            for b in held_out:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = model(b["input_ids"], mode="pretrain")
                ce.append(pretrain_loss(out, b["labels"], b["loss_mask"], STEP, objective).ce)
            model.train()
            return float(torch.stack(ce).mean())

        start = time.perf_counter()
        losses, evals = [], {"0": evaluate()}
        for i, b in enumerate(train, 1):
            losses.append(step(b))
            if i % eval_every == 0 or i == steps:
                evals[str(i)] = evaluate()
                if progress:
                    progress(f"{precision} seed {seed} step {i}: held-out CE {evals[str(i)]:.4f} "
                             f"({time.perf_counter() - start:.0f} s)")
        return {"precision": precision, "seed": seed, "lr": lr, "batch": batch, "steps": steps,
                "loss": torch.stack(losses).float().tolist(), "eval_ce": evals}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
