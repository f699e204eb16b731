"""Rank-0 progress: a tqdm bar (loss, tokens/s, ETA) on a terminal, plain periodic lines otherwise (Slurm logs),
and ``train_log.jsonl`` in the run directory (one JSON record per logged step or evaluation, full precision)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("launcher")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, tty: bool | None = None):
        self.enabled, self.total = enabled, total_steps
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._first_s: float | None = None  # the process's first step: compilation and warm-up
        self._steps, self._sum_s = 0, 0.0
        self._bar = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "train_log.jsonl", "a", buffering=1)
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step_time(self, seconds: float) -> float:
        """Mean seconds per step after the process's first (which carries compilation and warm-up). It includes
        evaluations and checkpoints at the rate they recur, so the ETA does too."""
        if self._first_s is None:
            self._first_s = seconds
            return seconds
        self._steps, self._sum_s = self._steps + 1, self._sum_s + seconds
        return self._sum_s / self._steps

    def eta(self, step: int) -> float:
        per_step = self._sum_s / self._steps if self._steps else (self._first_s or 0.0)
        return per_step * (self.total - step)

    def update(self, step: int, record: dict, print_line: bool) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['train/loss']:.4f}", tok_s=f"{record['perf/tokens_per_s']:.3g}",
                                  refresh=False)
        elif print_line:
            log.info("step %d/%d | loss %.4f ce %.4f acc %.3f | lr %.3g | grad %.3g | %.3g tok/s | eta %s",
                     step, self.total, record["train/loss"], record["train/ce"], record["train/acc"],
                     record["train/lr"], record.get("train/grad_norm", float("nan")),
                     record["perf/tokens_per_s"], _fmt_eta(self.eta(step)))

    def event(self, step: int, record: dict, message: str) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        (self._bar.write if self._bar is not None else log.info)(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
