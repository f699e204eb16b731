"""The ``fused`` kernel backend: fla's Triton Comba, a block-sparse sliding-window attention, compile-friendly
pointwise ops. Importing this module registers the backend when it can run here; otherwise it registers
nothing and ``UNAVAILABLE`` says why (``crossdna.ops.resolve`` reports that reason).

* ``comba``: fla's chunked Comba kernels, except that the forward is two Triton kernels of ours: the chunk-local
  WY form (the inverse and w, u; ``crossdna/ops/comba_wy_triton.py``: fla's three kernels for it took most of
  fla's forward time) and the recurrence with the output (``crossdna/ops/comba_output_triton.py``, in place of
  fla's two, which wrote every chunk's state and read it back); the backward is fla's, ending in our WY-form
  backward (``wy_form_backward``, which also does fla's four passes after it). It runs in v's dtype (fp32 by default, as
  upstream; bf16 when the model lets Comba follow the ambient autocast); g (log decay) is always fp32 and the
  state accumulates in fp32 inside the kernels either way.
* ``swa``: FlexAttention with a causal band block mask of 64×64 blocks (at l = 1024, W = 512 the band touches 108
  of the 256, computing 1.12× the band's pairs; flex's default 128×128 touches 30 of 64, 1.25×, and was 13% slower
  forward + backward on an H200; below 128 tokens the default, see ``_FLEX_DECODING_BELOW``), fla's
  ``parallel_attn(window_size=…)``, or SDPA with a dense band mask; :func:`set_swa_kernel` picks one. Flex is the
  default because inductor compiles it into the layer's graph; all three pass the same parity tests
  (docs/performance.md).
* ``comba_inputs``: Comba's input stage (three causal depthwise convs, SiLU, the q-correction, the L2 norms of q,
  k, p) as one Triton kernel each way (``crossdna/ops/comba_inputs_triton.py``); ``comba`` then runs without
  fla's own L2-norm passes.
* ``dilated_dwconv``: the TokenBridge's five dilated depthwise convs, channel-last, one Triton kernel forward and
  two backward (``crossdna/ops/dwconv_triton.py``).
* ``rotary``: the reference formula on cos/sin tables that an opaque op computes once per shape and device and
  copies per call. Written inline, the tables are pointwise producers that inductor fuses into every consumer,
  recomputing pow, cos and sin for each element of q and k (6.5 ms of forward kernels per B = 150 step on an
  H200; 1.5 ms reading the tables).
* ``rms_norm``, ``gated_rms_norm``, ``swiglu``: the reference formulas, which ``torch.compile`` fuses with their
  neighbours.

The broken combination of fla issue #640 (Hopper + Triton ≥ 3.4.0 and < 3.7.1: wrong gradients from the gated
``chunk_bwd_dqkwg`` unless fla routes it to its tilelang kernel) is detected here with fla's own predicates, so
``kernels='auto'`` falls back to the reference with a warning and ``kernels='fused'`` is refused, instead of fla
raising in the middle of the first backward.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from . import attention as _attention
from . import comba_inputs_triton as _comba_inputs
from . import comba_output_triton as _comba_output
from . import comba_wy_triton as _comba_wy
from . import dwconv_triton as _dwconv
from . import pointwise as _pointwise
from . import register_backend
from .comba import l2_normalize

# The op namespace follows the module's name: an HF export carries a flat copy of this module.
_NS = __name__.replace(".", "_")
SWA_KERNELS = ("flex", "fla", "sdpa")
_swa_kernel = "flex"
# FlexAttention's tile: the block mask's block size (tokens) and the kernels' ``kernel_options`` (flex's own
# defaults where absent); swept by benchmarks/triton_tiles_bench.py (flex).
FLEX_TILE: dict = {"block": 64, "options": {}}


def hopper_backward_problem() -> str:
    """'' when fla's gated chunk backward is correct here, else why not.

    Mirrors ``fla.ops.common.chunk_o.chunk_bwd_dqkwg``: fla raises when ``IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0
    and not TRITON_ABOVE_3_7_1`` and its backend dispatch did not route the call to tilelang. The dispatch takes
    tilelang when dispatching is on (``FLA_DISABLE_BACKEND_DISPATCH`` unset), ``tilelang`` is installed with a
    usable ``nvcc`` and ``FLA_TILELANG`` is not "0" (fla's ``CommonTileLangBackend.is_available/is_enabled``).
    One check more than fla: tilelang must also import, or the backward would fail there instead.
    """
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return ""
    import triton
    from fla import backends
    from fla.ops.common.backends.tilelang import CommonTileLangBackend

    why = (f"Hopper GPU with Triton {triton.__version__} (>= 3.4.0, < 3.7.1) computes wrong Comba gradients "
           f"(fla #640)")
    if backends._DISPATCH_DISABLED:
        return f"{why}, and FLA_DISABLE_BACKEND_DISPATCH=1 turns off fla's tilelang workaround"
    if not CommonTileLangBackend.is_available():
        return f"{why}, and tilelang (with nvcc) is not installed: install tilelang or Triton >= 3.7.1"
    if not CommonTileLangBackend().is_enabled():
        return f"{why}, and FLA_TILELANG=0 turns off fla's tilelang workaround"
    try:
        import tilelang  # noqa: F401
    except Exception as e:  # a broken install fails in the first backward otherwise
        return f"{why}, and tilelang does not import ({type(e).__name__}: {e})"
    return ""


def _unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import fla.ops.attn.parallel  # noqa: F401
        import fla.ops.comba  # noqa: F401
    except ImportError as e:
        return f"fla is not importable ({e}); install flash-linear-attention / fla-core"
    return hopper_backward_problem()


# ----------------------------------------------------------------------------------------------------- Comba
def _comba_forward(q, k, v, p, g, beta, scale, keep_inverse: bool):
    """fla's ``chunk_comba_fwd`` (no initial or final state) with our kernels: the WY form in place of fla's three
    (``chunk_scaled_dot_comba_pkt_fwd``, ``solve_tril``, ``recompute_w_u_fwd``), the recurrence and output in
    place of its two (``chunk_gated_delta_rule_fwd_h``, ``chunk_fwd_o``) → o and what the backward takes."""
    from fla.ops.comba.utils import chunk_comba_cumsum_scalar_fwd
    from fla.ops.utils.constant import RCP_LN2

    g0, gam = chunk_comba_cumsum_scalar_fwd(g, chunk_size=_comba_wy.CHUNK, scale=RCP_LN2)
    inverse, w, u = _comba_wy.wy_form(k, p, v, beta, g0, gam, keep_inverse)
    o = _comba_output.state_output(q, k, w, u, gam, scale)
    return o.to(q.dtype), (g0, gam, inverse)


def _comba_backward(q, k, v, p, g0, gam, beta, inverse, do, scale):
    """fla's ``chunk_comba_bwd`` (no initial or final state) with our WY-form backward in place of fla's
    ``prepare_wy_repr_bwd`` and the four passes after it (:func:`crossdna.ops.comba_wy_triton.wy_form_backward`),
    and each intermediate released once its last reader has run: the backward of the last layer runs on top of
    every saved activation, so what it holds at once adds to the step's peak memory."""
    from fla.ops.comba.wy_fast import recompute_w_u_fwd
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local

    w, u = recompute_w_u_fwd(k=p, v=v, beta=beta, A=inverse, g_cumsum=g0, cu_seqlens=None)
    h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=gam, initial_state=None, output_final_state=False)
    del u
    du = chunk_bwd_dv_local(q=q, k=k, g=gam, do=do, scale=scale)
    dh, _, du = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, g=gam, h0=None, dht=None, do=do, dv=du, scale=scale)
    dq, dk, dw, dg = chunk_bwd_dqkwg(q=q, k=k, v=v_new, w=w, g=gam, h=h, dv=du, do=do, dh=dh, scale=scale)
    del w, h, v_new, dh
    dv, dp, db = _comba_wy.wy_form_backward(k, p, v, beta, g0, gam, inverse, dw, du, dk, dg)
    return dq, dk, dv, dp, db, dg


class _ChunkComba(torch.autograd.Function):
    """The backward is fla's chunk backward on the tensors fla's forward saves (:func:`_comba_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, p, g, beta, scale):
        o, (g0, gam, inverse) = _comba_forward(q, k, v, p, g, beta, scale, keep_inverse=True)
        ctx.save_for_backward(q, k, v, p, g0, gam, beta, inverse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, p, g0, gam, beta, inverse = ctx.saved_tensors
        dq, dk, dv, dp, db, dg = _comba_backward(q, k, v, p, g0, gam, beta, inverse, do.contiguous(), ctx.scale)
        return dq.to(q), dk.to(k), dv.to(v), dp.to(p), dg, db.to(beta), None


@torch.compiler.disable  # fla's kernels autotune and dispatch in Python: called as is, as fla's chunk_comba is
def comba(q, k, v, p, g, beta, scale=None, chunk_size=64, use_qk_l2norm=True):
    """fla's chunked Comba in v's dtype with our WY-form kernel. ``chunk_size`` only changes the rounding of the
    chunked algorithm, not the function, so fla's fixed 64 serves every value. Without gradients (the EMA
    teacher) it runs the forward alone, which does not write the inverse."""
    dtype = v.dtype
    if use_qk_l2norm:
        q, k, p = (l2_normalize(x) for x in (q, k, p))
    q, k, p, beta = (x.to(dtype).contiguous() for x in (q, k, p, beta))
    args = (q, k, v.contiguous(), p, g.float().contiguous(), beta, q.shape[-1] ** -0.5 if scale is None else scale)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args[:6]):
        return _ChunkComba.apply(*args)
    return _comba_forward(*args, keep_inverse=False)[0]


# ----------------------------------------------------------------------------------- sliding-window attention
def set_swa_kernel(name: str) -> None:
    """Choose the sliding-window attention kernel of the fused backend: one of ``SWA_KERNELS``."""
    global _swa_kernel
    if name not in SWA_KERNELS:
        raise ValueError(f"swa kernel {name!r} is not one of {list(SWA_KERNELS)}")
    _swa_kernel = name


def swa_kernel() -> str:
    return _swa_kernel


_compiled_flex: Callable | None = None
_block_masks: dict = {}


# Every shape, dtype and grad mode flex meets in eager mode is one more compilation of the one function: finetuning a
# suite meets three per sequence length (training, evaluation, a last short batch), `pad_to: longest` one per batch
# length. Past dynamo's default limit of 8 it would fall back to flex's unfused path, which holds [B, H, L, L] scores
# and breaks a CUDA graph capture (found by the GPU tests, 2026-12-04). Past this limit, new shapes run SDPA instead.
FLEX_RECOMPILE_LIMIT = 64
_flex_exhausted_warned = False


def _flex_attention() -> Callable:
    """flex_attention is only fast compiled: inside a compiled region dynamo traces it as is, in eager mode it
    goes through one ``torch.compile`` of its own (built on first use), allowed ``FLEX_RECOMPILE_LIMIT`` shapes;
    past those it returns None."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(*args, **kwargs):
            try:
                with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                    return compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                return None

        _compiled_flex = run
    return _compiled_flex


# Flex runs fewer queries than this through its decoding kernel, whose query tile (the length rounded up to a power
# of two) must divide the block mask's block: 65-127 tokens (GUE's 101) found no kernel with 64-token blocks
# (inductor's NoValidChoicesError on an H200), so shorter sequences keep flex's default block of 128.
_FLEX_DECODING_BELOW = 128


def band_block_mask(length: int, window: int, device: torch.device):
    """FlexAttention block mask of the causal band i − window < j ≤ i, cached per shape and device (built in
    eager mode; :func:`crossdna.model.compile.compile_model` builds it before compiling)."""
    block = FLEX_TILE["block"] if length >= _FLEX_DECODING_BELOW else 128
    key = (length, window, str(device), block)
    mask = _block_masks.get(key)
    if mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        def band(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        mask = create_block_mask(band, None, None, length, length, device=device, BLOCK_SIZE=block)
        if not torch.compiler.is_compiling():
            _block_masks[key] = mask
    return mask


def swa(q, k, v, window, scale=None):
    """q,k,v [B,l,H,d] → [B,l,H,d], query i attends keys i − window < j ≤ i."""
    if _swa_kernel == "fla":
        from fla.ops.attn.parallel import parallel_attn

        return parallel_attn(q, k, v, scale=scale, window_size=window)
    if _swa_kernel == "sdpa":
        return _attention.sliding_window_attention(q, k, v, window, scale)
    length = q.shape[1]
    mask = band_block_mask(length, min(window, length), q.device)
    o = _flex_attention()(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=mask, scale=scale,
                          kernel_options=FLEX_TILE["options"] or None)
    if o is None:
        _warn_flex_exhausted(q)
        return _attention.sliding_window_attention(q, k, v, window, scale)
    return o.transpose(1, 2)


def _warn_flex_exhausted(q: torch.Tensor) -> None:
    global _flex_exhausted_warned
    if not _flex_exhausted_warned:
        _flex_exhausted_warned = True
        warnings.warn(f"flex attention has been compiled for {FLEX_RECOMPILE_LIMIT} shapes, grad modes and dtypes; "
                      f"new ones (first: queries {tuple(q.shape)} {q.dtype}) run SDPA with a band mask, ~3x slower. "
                      "Fewer shapes (finetuning: pad_to max_length) or a higher crossdna.ops.fused.FLEX_RECOMPILE_LIMIT "
                      "keep flex", stacklevel=3)


# -------------------------------------------------------------------------------------------------------- RoPE
_rotary_cache: dict = {}


@torch.library.custom_op(f"{_NS}::rotary_tables", mutates_args=())
def _rotary_tables(length: int, dim: int, base: float, device: torch.device) -> torch.Tensor:
    """The tables, computed once per shape and device (nine small kernels, 24 times a B = 150 step), then copied
    (one kernel): the op's output is its caller's, which inductor may write into."""
    key = (length, dim, base, str(device))
    tables = _rotary_cache.get(key)
    if tables is None:
        tables = _attention.rotary_tables(length, dim, base, device)
        if device.type != "cuda":
            _rotary_cache[key] = tables
        elif not torch.cuda.is_current_stream_capturing():  # captured kernels have not run: nothing to keep yet
            # Made on this stream, read from any (the teacher's runs on its own): wait once, so every reader sees it
            torch.cuda.current_stream(device).synchronize()
            _rotary_cache[key] = tables
    return tables.clone()


@_rotary_tables.register_fake
def _(length, dim, base, device):
    return torch.empty(2, length, dim, device=device)


def rotary(q, k, base):
    """:func:`crossdna.ops.attention.rotary` with its tables materialised (see the module docstring)."""
    tables = _rotary_tables(q.shape[1], q.shape[-1], float(base), q.device)
    return _attention.apply_rotary(q, tables), _attention.apply_rotary(k, tables)


OPS = {
    "comba": comba,
    "swa": swa,
    "comba_inputs": _comba_inputs.comba_inputs,
    "dilated_dwconv": _dwconv.dilated_dwconv,
    "rotary": rotary,
    # The reference formulas are already what inductor fuses best; named here so the backend is explicit.
    "rms_norm": _pointwise.rms_norm,
    "gated_rms_norm": _pointwise.gated_rms_norm,
    "swiglu": _pointwise.swiglu,
}

UNAVAILABLE = _unavailable_reason()
if not UNAVAILABLE:
    register_backend("fused", OPS)
