"""A training step captured once as a CUDA graph and replayed with each new batch copied into its input buffers.

A replay launches no Python, autograd bookkeeping or per-kernel work on the host, which is what bounds a step whose
kernels are small: finetuning at ~100 bp (about 10k launches per step), pretraining at batch 32. A step can be
captured when it has no host syncs and no data-dependent control flow: its optimizer keeps the step counter and the
learning rate on the device (``capturable=True``, a tensor ``lr``). Gradients must live at the addresses the
capture recorded: a step that includes the optimizer ends with ``zero_grad(set_to_none=True)`` (each replay's
backward writes them afresh, in the graph's pool); a graph of forward + backward alone, whose gradients the host
reads before a second graph steps the optimizer (the pretraining trainer), zeroes them in place instead.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

Batch = dict[str, torch.Tensor]
Step = Callable[[Batch], torch.Tensor | None]


def capture(step: Step, example: Batch) -> Step:
    """Capture ``step`` on buffers shaped like ``example``; return a step that copies a batch in and replays.

    Call after warm-up steps (autotuning, compilation, lazily created workspaces and optimizer state happen outside
    the capture). The capture records kernels without running them: it is not a training step."""
    static = {k: v.clone() for k, v in example.items()}
    torch.cuda.synchronize()
    # The capture allocates from a private pool: blocks the eager warm-up left cached in the ordinary pool would
    # otherwise stay reserved beside it (at B=150, 42 GiB of activations twice does not fit an 80 GB GPU).
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(static)

    def replay(batch: Batch) -> torch.Tensor | None:
        for k, buffer in static.items():
            buffer.copy_(batch[k], non_blocking=True)
        graph.replay()
        return None if loss is None else loss.clone()

    return replay


def _shapes(batch: Batch) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in batch.items()}


class GraphedStep:
    """``step`` run eagerly for its first ``warmup`` calls (on a side stream, as a capture requires), then replayed.

    Every batch must have the captured one's shapes (pad a short batch). ``phase`` names what the step's structure
    depends on besides the shapes (the fusion gate's warm-up freezes it): a new phase drops the graph and warms up
    again, so only one graph's memory is held at a time."""

    def __init__(self, step: Step, warmup: int = 2) -> None:
        self._step = step
        self._warmup = warmup
        self._side = torch.cuda.Stream()
        self._phase: Hashable = None
        self._replay: Step | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._eager_calls = 0
        self.captures = 0

    def __call__(self, batch: Batch, phase: Hashable = None) -> torch.Tensor | None:
        if phase != self._phase:
            self._phase, self._replay, self._eager_calls = phase, None, 0
        if self._replay is None and self._eager_calls >= self._warmup:
            self._replay, self._shapes = capture(self._step, batch), _shapes(batch)
            self.captures += 1
        if self._replay is not None:
            if _shapes(batch) != self._shapes:
                raise ValueError(f"batch shapes {_shapes(batch)} differ from the captured {self._shapes}: "
                                 "a replay needs one shape (pad short batches)")
            return self._replay(batch)
        self._eager_calls += 1
        main = torch.cuda.current_stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            loss = self._step(batch)
        main.wait_stream(self._side)
        if loss is not None:
            loss.record_stream(main)
        return loss
