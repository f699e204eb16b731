"""Kernel seam: the model calls these functions and never a specific implementation.

Each op dispatches on a backend name:

* ``reference``: plain PyTorch (this package), CPU and GPU, the numerical definition every other backend is tested
  against;
* ``fused``: GPU kernels, registered by ``crossdna/ops/fused.py`` through :func:`register_backend` when that
  module exists and imports (it may provide only some ops; the others fall back to ``reference``);
* ``auto``: ``fused`` for CUDA tensors when it is available, otherwise ``reference``.

Ops and layouts (flash-attn/fla layout, time before heads):

* ``comba(q, k, v, p, g, beta, scale, chunk_size, use_qk_l2norm)``: q,k,p [B,T,H,K], v [B,T,H,V], g,beta [B,T,H]
* ``comba_inputs(qkv, weight, decay_gate, correction, num_heads, head_v_dim)``: [B,T,H·(2K+V)] projections →
  the kernel's q, k, v, p (short convs, SiLU, correction, L2 norms), weight [H·(2K+V), conv taps]
* ``dilated_dwconv(x, weight, dilations)``: x [B,T,C], weight [N,C,K] → [B,T,N,C], centred depthwise convs (the
  TokenBridge's context)
* ``swa(q, k, v, window, scale)``: [B,l,H,d], causal window i − window < j ≤ i
* ``rotary(q, k, base)``: NeoX rotate-half RoPE at positions 0..l−1
* ``rms_norm(x, weight, eps)``, ``gated_rms_norm(x, gate, weight, eps)``, ``swiglu(gate, up)``: [B,T,D]
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Mapping

import torch

from . import attention, comba as _comba, dwconv, pointwise

BACKENDS = ("auto", "reference", "fused")

_REGISTRY: dict[str, dict[str, Callable]] = {
    "reference": {
        "comba": _comba.chunk_comba,
        "comba_inputs": _comba.comba_inputs,
        "dilated_dwconv": dwconv.dilated_dwconv,
        "swa": attention.sliding_window_attention,
        "rotary": attention.rotary,
        "rms_norm": pointwise.rms_norm,
        "gated_rms_norm": pointwise.gated_rms_norm,
        "swiglu": pointwise.swiglu,
    }
}
_fused_probe: str | None = None  # None: not tried yet; "" : available; otherwise why it is not


def register_backend(name: str, ops: Mapping[str, Callable]) -> None:
    """Add or extend a backend. Unknown op names are refused so that a typo cannot silently fall back."""
    unknown = set(ops) - set(_REGISTRY["reference"])
    if unknown:
        raise ValueError(f"register_backend({name!r}): unknown op(s) {sorted(unknown)}; known: {sorted(_REGISTRY['reference'])}")
    _REGISTRY.setdefault(name, {}).update(ops)


def _fused_unavailable_reason() -> str:
    """Import ``crossdna.ops.fused`` once; '' when it registered itself, else the reason it did not."""
    global _fused_probe
    if _fused_probe is None:
        try:
            module = importlib.import_module("crossdna.ops.fused")
        except ModuleNotFoundError as e:
            if e.name != "crossdna.ops.fused":
                raise
            _fused_probe = "crossdna.ops.fused is not installed"
        else:
            # fused.py leaves its reason in UNAVAILABLE when it cannot run here (no GPU, no fla, fla #640).
            _fused_probe = "" if "fused" in _REGISTRY else (
                getattr(module, "UNAVAILABLE", "") or "crossdna.ops.fused did not register a backend")
    return _fused_probe


_warned_fallback = False


def _warn_fallback(device: torch.device, reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"kernels='auto' on {device}: using the reference kernels because {reason}", stacklevel=3)


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device`` ('auto' → 'fused' on CUDA when available)."""
    if backend == "reference":
        return backend
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        reason = _fused_unavailable_reason()
        if reason:
            _warn_fallback(device, reason)
            return "reference"
        return "fused"
    if backend == "fused":
        reason = _fused_unavailable_reason()
        if reason:
            raise ValueError(f"kernels='fused': {reason}")
        if device.type != "cuda":
            raise ValueError(f"kernels='fused' needs CUDA tensors, got device {device}")
        return backend
    if backend in _REGISTRY:  # any other registered backend (e.g. an experimental one) is taken as named
        return backend
    raise ValueError(f"kernels={backend!r} is not one of {sorted(set(BACKENDS) | set(_REGISTRY))}")


def _impl(op: str, backend: str, device: torch.device) -> Callable:
    return _REGISTRY[resolve(backend, device)].get(op) or _REGISTRY["reference"][op]


def comba(q, k, v, p, g, beta, scale=None, chunk_size=64, use_qk_l2norm=True, *, backend="auto"):
    return _impl("comba", backend, q.device)(q, k, v, p, g, beta, scale, chunk_size, use_qk_l2norm)


def comba_inputs(qkv, weight, decay_gate, correction, num_heads, head_v_dim, *, backend="auto"):
    return _impl("comba_inputs", backend, qkv.device)(qkv, weight, decay_gate, correction, num_heads, head_v_dim)


def dilated_dwconv(x, weight, dilations, *, backend="auto"):
    return _impl("dilated_dwconv", backend, x.device)(x, weight, dilations)


def swa(q, k, v, window, scale=None, *, backend="auto"):
    return _impl("swa", backend, q.device)(q, k, v, window, scale)


def rotary(q, k, base, *, backend="auto"):
    return _impl("rotary", backend, q.device)(q, k, base)


def rms_norm(x, weight, eps, *, backend="auto"):
    return _impl("rms_norm", backend, x.device)(x, weight, eps)


def gated_rms_norm(x, gate, weight, eps, *, backend="auto"):
    return _impl("gated_rms_norm", backend, x.device)(x, gate, weight, eps)


def swiglu(gate, up, *, backend="auto"):
    return _impl("swiglu", backend, gate.device)(gate, up)
