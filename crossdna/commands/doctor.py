"""``crossdna doctor``: is this machine ready to train? One line per check, ``--json`` for machines.

The checks follow what breaks DNA-LM training environments in practice (docs/troubleshooting.md): a driver older
than torch's CUDA build, a Triton without a working compiler, fla kernels that import but compute wrong gradients
(fla #640 on Hopper), DeepSpeed falling back to an unexpected accelerator, an unreachable MLflow server. GPU checks
report ``skipped: no CUDA device`` on a CPU machine, and the exit status is 0 when nothing failed: the CPU path
(the reference kernels, a forward and backward of the tiny model on real chr20 bases) is healthy on its own.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

from crossdna.versions import installed_version

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skipped"
NO_CUDA = "no CUDA device"


class Skip(Exception):
    """A check that does not apply here (its message says why)."""


class Warn(Exception):
    """A check that passed with a problem worth fixing (its message says which)."""


@dataclass
class Result:
    name: str
    status: str
    detail: str
    seconds: float

    def line(self) -> str:
        return f"{self.name:<10} {self.status}: {self.detail}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check driver, CUDA, torch, Triton, fla kernels, DeepSpeed, NVML and MLflow")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI to probe (default: $MLFLOW_TRACKING_URI; none: per-run sqlite)")
    p.set_defaults(handler=run)


# ------------------------------------------------------------------------------------------------- helpers
def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _require_cuda() -> None:
    if not _cuda():
        raise Skip(NO_CUDA)


def _rel_err(a, b) -> float:
    """Relative L2 error of a against the reference b (float64 accumulation)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _real_bases(count: int, length: int):
    """``count`` windows of ``length`` bases of real GRCh37 chr20 from the packaged demo FASTA, as token ids."""
    import gzip
    from pathlib import Path

    import numpy as np

    from crossdna.tokens import encode

    fasta = Path(__file__).resolve().parents[1] / "demo" / "data" / "chr20_slices.fa.gz"
    want = count * length
    seq = bytearray()
    with gzip.open(fasta, "rb") as f:
        for line in f:
            if line.startswith(b">"):
                if seq:
                    break
                continue
            seq += line.strip()
            if len(seq) >= want:
                break
    if len(seq) < want:
        raise RuntimeError(f"{fasta}: first record has {len(seq)} bases, need {want}")
    return np.frombuffer(encode(bytes(seq[:want])), dtype=np.uint8).reshape(count, length)


# -------------------------------------------------------------------------------------------------- checks
def check_python() -> str:
    if sys.version_info < (3, 11):
        raise RuntimeError(f"Python {sys.version.split()[0]}: crossdna needs >= 3.11")
    return f"{sys.version.split()[0]} ({sys.executable})"


def check_torch() -> str:
    import torch
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"torch {torch.__version__} ({build})"


def check_driver() -> str:
    """The driver must support the CUDA version torch was built for (the usual 'CUDA unavailable' cause)."""
    import pynvml
    import torch

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        if not _cuda():
            raise Skip(NO_CUDA) from e
        raise RuntimeError(f"NVML: {e}") from e
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        supported = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12080 = CUDA 12.8
    finally:
        pynvml.nvmlShutdown()
    driver = driver.decode() if isinstance(driver, bytes) else driver
    have = (supported // 1000, supported % 1000 // 10)
    detail = f"NVIDIA driver {driver}, supports CUDA {have[0]}.{have[1]}"
    if torch.version.cuda:
        need = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
        if have < need:
            raise RuntimeError(f"{detail}, but torch {torch.__version__} needs CUDA {torch.version.cuda}: "
                               "upgrade the driver or install a torch built for an older CUDA")
    return detail


def check_cuda() -> str:
    import torch

    _require_cuda()
    names = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        names.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        a = torch.randn(64, 64, device=f"cuda:{i}")
        if not torch.allclose((a @ a.T).cpu(), a.cpu() @ a.cpu().T, rtol=1e-2, atol=1e-2):
            raise RuntimeError(f"cuda:{i}: a 64x64 matmul disagrees with the CPU")
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
    return f"{len(names)} device(s): {', '.join(names)}; {bf16}"


def check_nccl() -> str:
    import torch

    _require_cuda()
    if not torch.distributed.is_nccl_available():
        raise RuntimeError("torch was built without NCCL: multi-GPU training cannot run")
    version = ".".join(str(x) for x in torch.cuda.nccl.version())
    # NCCL_VERSION is a label set by NVIDIA's images, not a setting NCCL reads.
    knobs = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                     if k.startswith("NCCL_") and k != "NCCL_VERSION")
    return f"NCCL {version}" + (f"; {knobs}" if knobs else "")


def check_nvml() -> str:
    """Per-node telemetry (launcher/telemetry.py) reads NVML; without it training runs but logs no GPU metrics."""
    import pynvml

    _require_cuda()
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
    finally:
        pynvml.nvmlShutdown()
    return f"{count} device(s); GPU0 {mem.used / 2**30:.1f}/{mem.total / 2**30:.1f} GiB used, {temp} C, {power:.0f} W"


def check_triton() -> str:
    """Import, then on a GPU compile and launch one kernel: Triton builds its launcher with the system C compiler
    and Python headers at run time, which slim images lack."""
    import triton

    if not _cuda():
        return f"triton {triton.__version__} (kernel launch skipped: {NO_CUDA})"
    import torch
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=keep) + tl.load(y_ptr + offs, mask=keep), mask=keep)

    x, y = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    out = torch.empty_like(x)
    add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
    if not torch.equal(out, x + y):
        raise RuntimeError(f"triton {triton.__version__}: a vector-add kernel gave wrong results")
    return f"triton {triton.__version__}, a JIT kernel compiled and ran"


def check_fla() -> str:
    import fla.ops.comba  # noqa: F401  (imports fla's Triton kernels; fails without triton)

    version = installed_version("fla-core") or installed_version("flash-linear-attention")
    if _cuda():
        from crossdna.ops.fused import hopper_backward_problem
        problem = hopper_backward_problem()
        if problem:
            raise RuntimeError(problem)
    return f"fla {version}, fla.ops.comba imports"


def check_kernels() -> str:
    """The fused kernels (fla Comba, sliding-window attention) against the reference ops, forward and backward."""
    import torch

    from crossdna import ops

    _require_cuda()
    reason = ops._fused_unavailable_reason()
    if reason:
        raise RuntimeError(f"fused backend unavailable: {reason}")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    B, T, H, K = 2, 128, 2, 16
    comba_inputs = [rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, K),
                    -torch.nn.functional.softplus(rand(B, T, H)), torch.sigmoid(rand(B, T, H))]
    swa_inputs = [rand(B, T, H, K) for _ in range(3)]
    cases = {"comba": (lambda *x, backend: ops.comba(*x, backend=backend), comba_inputs),
             "swa": (lambda *x, backend: ops.swa(*x, 32, backend=backend), swa_inputs)}
    worst = []
    for name, (fn, inputs) in cases.items():
        grads = {}
        for backend in ("reference", "fused"):
            xs = [x.detach().clone().requires_grad_() for x in inputs]
            out = fn(*xs, backend=backend)
            out.backward(torch.ones_like(out) / out.numel() ** 0.5)
            grads[backend] = [out.detach()] + [x.grad for x in xs]
        errs = [_rel_err(f, r) for f, r in zip(grads["fused"], grads["reference"])]
        # fla runs its chunk dots in TF32: ~1e-3 relative at these sizes (spec appendix); 1e-2 is a real bug.
        if max(errs) > 1e-2:
            raise RuntimeError(f"{name}: fused vs reference relative error fwd {errs[0]:.1e}, "
                               f"bwd up to {max(errs[1:]):.1e} (> 1e-2)")
        worst.append(f"{name} fwd {errs[0]:.0e} bwd {max(errs[1:]):.0e}")
    return "fused vs reference: " + ", ".join(worst)


def check_model() -> str:
    """The CPU path: the tiny preset on the reference kernels, MLM-masked real chr20, one forward + backward."""
    import numpy as np
    import torch

    from crossdna.data import DataConfig
    from crossdna.data.keys import sample_keys, stream_key
    from crossdna.data.masking import Masker
    from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
    from crossdna.objectives import ObjectiveConfig, pretrain_loss

    torch.manual_seed(0)
    cfg = CrossDNAConfig.preset("tiny").replace(kernels="reference")
    model = SSScanDNAHybridModel(cfg).train()
    clean = _real_bases(2, 128)
    masked, loss_mask = Masker(DataConfig())(clean, sample_keys(stream_key(0), np.arange(len(clean))))
    out = model(torch.from_numpy(masked).long(), mode="pretrain")
    terms = pretrain_loss(out, torch.from_numpy(clean).long(), torch.from_numpy(loss_mask), 1, ObjectiveConfig())
    terms.total.backward()
    if not torch.isfinite(terms.total):
        raise RuntimeError(f"tiny model: non-finite loss {terms.total.item()}")
    grads = [p.grad for p in model.student_parameters() if p.grad is not None]
    if not grads or not all(torch.isfinite(g).all() for g in grads):
        raise RuntimeError("tiny model: missing or non-finite gradients")
    if not any(g.abs().sum() > 0 for g in grads):
        raise RuntimeError("tiny model: every gradient is zero")
    return f"tiny preset, reference kernels, 2x128 chr20 bases: loss {terms.total.item():.3f}, {len(grads)} finite grads"


def check_deepspeed() -> str:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    detail = (f"deepspeed {deepspeed.__version__}, accelerator {acc.device_name()}, "
              f"backend {acc.communication_backend_name()}")
    if _cuda() and acc.device_name() != "cuda":
        raise Warn(f"{detail}: a CUDA device is present but DeepSpeed chose {acc.device_name()} (DS_ACCELERATOR?)")
    return detail


def check_mlflow(uri: str | None) -> str:
    """Reachability of the tracking store; training itself never blocks on it (launcher/tracking.py)."""
    import urllib.error
    import urllib.request
    from pathlib import Path
    from urllib.parse import urlsplit

    from launcher.tracking import redact_uri

    version = installed_version("mlflow") or installed_version("mlflow-skinny")
    if version is None:
        raise RuntimeError("mlflow is not installed (pip install 'crossdna[train]')")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"mlflow {version}; no MLFLOW_TRACKING_URI: each run logs to sqlite in its run directory"
    scheme = urlsplit(uri).scheme
    shown = redact_uri(uri)
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                status = r.status
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"mlflow {version}; {shown} is unreachable ({e})") from e
        if status != 200:
            raise RuntimeError(f"mlflow {version}; {shown}/health answered {status}")
        return f"mlflow {version}; {shown} is up"
    if scheme in ("sqlite", "file", ""):
        path = Path(uri.split(":///", 1)[1] if ":///" in uri else urlsplit(uri).path or uri)
        parent = path if scheme == "file" or not scheme else path.parent
        probe = parent if parent.exists() else parent.parent
        if not os.access(probe, os.W_OK):
            raise RuntimeError(f"mlflow {version}; {shown}: {probe} is not writable")
        return f"mlflow {version}; {shown} (local store, writable)"
    return f"mlflow {version}; {shown} (scheme {scheme!r} not probed)"


# ------------------------------------------------------------------------------------------------ runner
def _checks(args: argparse.Namespace) -> list[tuple[str, Callable[[], str]]]:
    return [
        ("python", check_python),
        ("torch", check_torch),
        ("driver", check_driver),
        ("cuda", check_cuda),
        ("nccl", check_nccl),
        ("nvml", check_nvml),
        ("triton", check_triton),
        ("fla", check_fla),
        ("kernels", check_kernels),
        ("model", check_model),
        ("deepspeed", check_deepspeed),
        ("mlflow", lambda: check_mlflow(args.tracking_uri)),
    ]


def _run_one(name: str, fn: Callable[[], str]) -> Result:
    t0 = time.perf_counter()
    # Libraries announce themselves on import (fla's CPU fallback warning, DeepSpeed's accelerator log line);
    # the result line says what matters, so their chatter is dropped to keep one line per check.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status, detail = OK, fn()
    except Skip as e:
        status, detail = SKIP, str(e)
    except Warn as e:
        status, detail = WARN, str(e)
    except Exception as e:  # one broken dependency must not hide the others' results
        status, detail = FAIL, f"{type(e).__name__}: {e}".replace("\n", " ")
    return Result(name, status, detail, round(time.perf_counter() - t0, 3))


def run(args: argparse.Namespace) -> int:
    results = []
    for name, fn in _checks(args):
        result = _run_one(name, fn)
        results.append(result)
        if not args.json:
            print(result.line(), flush=True)
    healthy = all(r.status != FAIL for r in results)
    if args.json:
        print(json.dumps({"healthy": healthy, "checks": [asdict(r) for r in results]}, indent=2))
    return 0 if healthy else 1
