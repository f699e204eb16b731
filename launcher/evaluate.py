"""Validation with fixed masks (spec defect 31): token-weighted masked CE, perplexity = exp(CE) (of the MLM
cross-entropy alone, not of CE + aux as upstream reported, defect 14), top-1 accuracy, per-branch accuracies.

Each rank sums ``metric × masked tokens`` over its batches; one all-reduce makes the result exact over the split
(EvalStream gives every sample to exactly one rank and pads with unscored rows).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from crossdna.objectives import ObjectiveConfig, pretrain_loss


@torch.no_grad()
def evaluate(engine, stream, objective: ObjectiveConfig, step: int, max_batches: int = 0) -> dict[str, float]:
    engine.train(False)
    device = engine.env.device
    # sums of: ce·n, acc·n, acc_a·n, acc_b·n, sem·n, n
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for i, batch in enumerate(stream):
        if max_batches and i >= max_batches:
            break
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        mask = batch["loss_mask"].to(device, non_blocking=True)
        out = engine.forward(ids, mode="pretrain")
        terms = pretrain_loss(out, labels, mask, step, objective)
        n = mask.sum().double()
        sums += torch.stack([terms.ce.double() * n, terms.acc.double() * n, terms.acc_a.double() * n,
                             terms.acc_b.double() * n, terms.sem.double() * n, n])
    dist.all_reduce(sums)
    ce, acc, acc_a, acc_b, sem, n = sums.tolist()
    engine.train(True)
    if n == 0:
        raise ValueError("evaluation: the validation split has no masked positions (empty split?)")
    return {"eval/ce": ce / n, "eval/ppl": math.exp(ce / n), "eval/acc": acc / n, "eval/acc_a": acc_a / n,
            "eval/acc_b": acc_b / n, "eval/sem": sem / n, "eval/masked_tokens": n}
