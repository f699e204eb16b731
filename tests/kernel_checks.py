"""Helpers of the kernel parity tests: the relative error they all measure and the fresh Triton interpreter the
Triton kernels' CPU tests run in."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.conftest import REPO


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_interpreted(code: str) -> None:
    """Run ``code`` with TRITON_INTERPRET=1 in a fresh interpreter (the switch is read when Triton is imported);
    it exits non-zero, printing its failures, when a check fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
