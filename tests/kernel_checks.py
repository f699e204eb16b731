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


def run_interpreted(module: str, check: str, retile: str = "", retiled_cases: int = 0) -> None:
    """In a fresh interpreter with TRITON_INTERPRET=1 (the switch is read when Triton is imported), run the test
    module's ``check(device, dtype, cases) -> failures`` on its ``CASES`` on the CPU in fp32; with ``retile`` (a
    statement setting other tiles of the kernels), again on the first ``retiled_cases`` of them. Fails with the
    failures it printed."""
    second = f"{retile}; f += c('cpu', torch.float32, CASES[:{retiled_cases}]);" if retile else ""
    code = (f"import torch, sys; from tests.{module} import CASES, {check} as c; f = c('cpu', torch.float32, CASES);"
            f"{second} print('\\n'.join(f)); sys.exit(1 if f else 0)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
