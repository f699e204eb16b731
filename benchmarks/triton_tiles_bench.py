"""The project's Triton kernels at the 8.1M model's B = 150 shapes, per tile configuration (tokens and channels per
program, warps), each kernel on its own, against its byte floor (each tensor read once, written once) at the copy
bandwidth measured here: Comba's input stage (crossdna/ops/comba_inputs_triton.py), Comba's WY form
(crossdna/ops/comba_wy_triton.py, also against fla's three kernels it replaces, with their difference), Comba's
recurrence and output (crossdna/ops/comba_output_triton.py, also against fla's two), the TokenBridge's dilated
depthwise convs (crossdna/ops/dwconv_triton.py) and FlexAttention's block mask and kernel options
(crossdna/ops/fused.py ``FLEX_TILE``). Writes ``triton_tiles_<device>.json``; the modules' tile dicts are left at the
fastest, which is what the modules' defaults are set from.

    python benchmarks/triton_tiles_bench.py OUT_DIR [comba_inputs wy_form wy_backward dilated_dwconv state_output flex]

A subset writes ``triton_tiles_<device>_<families>.json``.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from crossdna.ops import comba_inputs_triton as kernels
from crossdna.ops import comba_output_triton, comba_wy_triton, dwconv_triton
from launcher.run_tags import git_state

B, T, H, K, V, TAPS = 150, 1024, 8, 64, 64, 4
D, DILATIONS, BRIDGE_K = 512, (1, 2, 4, 8, 16), 9


def _registers(kernel) -> dict:
    """Registers per thread and spills (Triton's ``n_spills``: local memory in 4-byte words) of ``kernel``'s most
    recently compiled variant, the tile just timed: why a tile is slow (spills, or registers capping occupancy)."""
    compiled = [variant for cache in kernel.device_caches.values() for variant in cache[0].values()]
    if not compiled:
        return {}
    compiled[-1]._init_handles()
    return {"n_regs": compiled[-1].n_regs, "n_spills": compiled[-1].n_spills}


def _sweep(tile: dict, options: dict, run, floor_ms: float, label: str, kernel=None) -> list[dict]:
    """Time ``run`` at every combination of ``options`` written into ``tile`` (the module's tile dict), with
    ``kernel``'s registers where given; the dict is left at the fastest."""
    rows = []
    for values in itertools.product(*options.values()):
        tile.update(zip(options, values))
        ms = do_bench(run, return_mode="median")
        rows.append({**tile, "ms": ms, "floor_ms": floor_ms, **(_registers(kernel) if kernel else {})})
        print(f"{label:8s} {rows[-1]}", flush=True)
    tile.update({k: v for k, v in min(rows, key=lambda r: r["ms"]).items() if k in tile})
    return rows


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 difference of ``x`` to ``ref``, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _wy_sweep(floor) -> dict:
    """Our WY-form kernel per tile (with and without writing the inverse), and fla's pkt + solve_tril +
    recompute_w_u on the same inputs (time, and the difference of the three outputs)."""
    from fla.ops.comba.utils import chunk_comba_cumsum_scalar_fwd
    from fla.ops.comba.wy_fast import chunk_scaled_dot_comba_pkt_fwd, recompute_w_u_fwd
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.utils import solve_tril
    from fla.ops.utils.constant import RCP_LN2

    dev, dt = torch.device("cuda"), torch.bfloat16
    k, p = (torch.nn.functional.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).to(dt) for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, dtype=dt)
    beta = torch.rand(B, T, H, device=dev).to(dt)
    g0, gam = chunk_comba_cumsum_scalar_fwd(-torch.rand(B, T, H, device=dev) * 0.1, chunk_size=64, scale=RCP_LN2)

    def fla() -> tuple[torch.Tensor, ...]:
        inverse = solve_tril(chunk_scaled_dot_comba_pkt_fwd(k=k, p=p, beta=beta, g0=g0, g=gam,
                                                            output_dtype=torch.float32), output_dtype=dt)
        return inverse, *recompute_w_u_fwd(k=p, v=v, beta=beta, A=inverse, g_cumsum=g0, cu_seqlens=None)

    # k, p, v, w, u and (with gradients) the inverse; β, γ⁰, γ
    qkv_bytes = 5 * k.numel() * k.element_size() + 3 * g0.numel() * 4
    inverse_bytes = B * T * H * 64 * 2
    options = {"num_warps": (2, 4, 8), "DOT": ("tf32",)}  # "ieee" spills (comba_wy_triton)
    rows = _sweep(comba_wy_triton.WY_TILE, options, lambda: comba_wy_triton.wy_form(k, p, v, beta, g0, gam),
                  floor(qkv_bytes + inverse_bytes), "wy form", comba_wy_triton._wy_form_kernel)
    fp32 = [x.float() for x in (k, p, v, beta)]  # the faithful precision: TF32 ("ieee" spills: comba_wy_triton)
    fp32_bytes = 2 * (qkv_bytes + inverse_bytes) - 3 * g0.numel() * 4  # γ⁰, γ are fp32 either way
    rows_fp32 = _sweep(comba_wy_triton.WY_TILE_FP32, {"num_warps": (4, 8)},
                       lambda: comba_wy_triton.wy_form(*fp32, g0, gam), floor(fp32_bytes), "wy fp32",
                       comba_wy_triton._wy_form_kernel)
    no_inverse = do_bench(lambda: comba_wy_triton.wy_form(k, p, v, beta, g0, gam, keep_inverse=False),
                          return_mode="median")
    fla_ms = do_bench(fla, return_mode="median")
    _, w, u = comba_wy_triton.wy_form(k, p, v, beta, g0, gam, keep_inverse=False)

    def states_and_output() -> torch.Tensor:  # the rest of the forward, for what fusing it could save
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=gam)
        return chunk_fwd_o(q=p, k=k, v=v_new, h=h, g=gam, scale=K ** -0.5)

    state_ms = do_bench(states_and_output, return_mode="median")
    print(f"without the inverse: {no_inverse:.3f} ms (floor {floor(qkv_bytes):.3f}); fla's three kernels: "
          f"{fla_ms:.3f} ms; fla's fwd_h + fwd_o after it: {state_ms:.3f} ms", flush=True)
    ours = comba_wy_triton.wy_form(k, p, v, beta, g0, gam)
    difference = {name: _rel(a, b) for name, a, b in zip(("inverse", "w", "u"), ours, fla())}
    return {"sweeps": {"wy_form": rows, "wy_form_fp32": rows_fp32}, "best": comba_wy_triton.WY_TILE,
            "best_fp32": comba_wy_triton.WY_TILE_FP32,
            "shape": {"B": B, "T": T, "H": H, "K": K, "V": V}, "without_inverse_ms": no_inverse,
            "without_inverse_floor_ms": floor(qkv_bytes), "fla_pkt_solve_tril_recompute_w_u_ms": fla_ms,
            "fla_fwd_h_and_fwd_o_ms": state_ms,
            "rel_difference_to_fla": difference}


def _wy_backward_sweep(floor) -> dict:
    """Our WY-form backward per tile (bf16 and fp32), and what it replaces in fla's ``chunk_comba_bwd``:
    ``prepare_wy_repr_bwd``, the two adds onto dk and dγ and the two chunk-local cumsums (time and difference).
    The kernel accumulates into dk and dg in place, so repeated runs only change their values, not the work."""
    from fla.ops.comba.utils import chunk_comba_cumsum_scalar_bwd, chunk_comba_cumsum_scalar_fwd
    from fla.ops.comba.wy_fast import prepare_wy_repr_bwd
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    dev, dt = torch.device("cuda"), torch.bfloat16
    k, p = (torch.nn.functional.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).to(dt) for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, dtype=dt)
    beta = torch.rand(B, T, H, device=dev).to(dt)
    g0, gam = chunk_comba_cumsum_scalar_fwd(-torch.rand(B, T, H, device=dev) * 0.1, chunk_size=64, scale=RCP_LN2)
    inverse = comba_wy_triton.wy_form(k, p, v, beta, g0, gam)[0]
    dw, du, dk = (torch.randn(B, T, H, K, device=dev).to(dt) for _ in range(3))
    dg = torch.randn(B, T, H, device=dev)

    def ours(dk, dg, x=(k, p, v, beta, inverse, dw, du)):
        return comba_wy_triton.wy_form_backward(*x[:4], g0, gam, *x[4:], dk, dg)

    def fla():
        dk2, dv, dp, dbeta, dg0, dg2 = prepare_wy_repr_bwd(k=k, v=v, p=p, beta=beta, g0=g0, g=gam, A=inverse,
                                                           dw=dw, du=du, cu_seqlens=None)
        dg_total = chunk_local_cumsum(dg + dg2, chunk_size=64, reverse=True)
        return dk + dk2, dv, dp, dbeta, dg_total + chunk_comba_cumsum_scalar_bwd(dg0, chunk_size=64)

    dk_ours, dg_ours = dk.clone(), dg.clone()
    got = [dk_ours, *ours(dk_ours, dg_ours), dg_ours]
    difference = {name: _rel(a, b) for name, a, b in zip(("dk", "dv", "dp", "dbeta", "dg"), got, fla())}
    # reads k, p, v, the inverse, dw, du, dk; writes dk, dv, dp; β, γ⁰, γ, dγ read and dβ, dg written (the timed
    # runs keep accumulating into one dk and dg: their values drift, the work is the same)
    big, small = k.numel() * k.element_size(), g0.numel() * 4
    rows = _sweep(comba_wy_triton.WY_BWD_TILE, {"num_warps": (2, 4, 8)}, lambda: ours(dk_ours, dg_ours),
                  floor(10 * big + 6 * small), "wy bwd", comba_wy_triton._wy_form_bwd_kernel)
    fp32 = (dk.float(), dg.clone(), [t.float() for t in (k, p, v, beta, inverse, dw, du)])
    rows_fp32 = _sweep(comba_wy_triton.WY_BWD_TILE_FP32, {"num_warps": (4, 8)},
                       lambda: ours(*fp32), floor(20 * big + 6 * small), "wy bwd fp32",
                       comba_wy_triton._wy_form_bwd_kernel)
    fla_ms = do_bench(fla, return_mode="median")
    print(f"wy bwd: fla's prepare_wy_repr_bwd + adds + cumsums {fla_ms:.3f} ms; difference {difference}",
          flush=True)
    return {"sweeps": {"wy_form_backward": rows, "wy_form_backward_fp32": rows_fp32},
            "best": comba_wy_triton.WY_BWD_TILE, "best_fp32": comba_wy_triton.WY_BWD_TILE_FP32,
            "fla_wy_bwd_adds_cumsums_ms": fla_ms,
            "rel_difference_to_fla": difference}


def _inputs_sweeps(floor) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    C = H * (2 * K + V)
    qkv = torch.randn(B, T, C, device=dev, dtype=dt)
    weight = torch.randn(C, TAPS, device=dev) * 0.5
    sd, dc = torch.rand(H, device=dev), torch.randn(H, device=dev) * 0.1
    grads = [torch.randn(B, T, H, K, device=dev, dtype=dt) for _ in range(4)]
    dy = torch.randn_like(qkv)
    nbytes = qkv.numel() * qkv.element_size()
    warps = (2, 4, 8)
    sweeps = {  # byte floors: each tensor read once, written once (p has q's size: 4 outputs = 4/3 of qkv)
        "forward": _sweep(kernels.FWD_TILE, {"BT": (16, 32, 64, 128), "num_warps": warps},
                          lambda: kernels.comba_inputs(qkv, weight, sd, dc, H, V),
                          floor(nbytes + 4 * nbytes // 3), "forward", kernels._inputs_fwd_kernel),
        "chain": _sweep(kernels.CHAIN_TILE, {"BT": (16, 32, 64, 128), "num_warps": warps},
                        lambda: kernels.chain_backward(grads, qkv, weight, sd, dc, H, K, V, 1e-6),
                        floor(2 * nbytes + 4 * nbytes // 3), "chain", kernels._inputs_chain_bwd_kernel),
        "conv": _sweep(kernels.CONV_TILE, {"BT": (16, 32, 64), "BC": (32, 64, 128), "num_warps": warps},
                       lambda: kernels.conv_backward(dy, qkv, weight), floor(3 * nbytes), "conv",
                       kernels._inputs_conv_bwd_kernel),
    }
    backward = do_bench(lambda: kernels.comba_inputs_backward(*grads, qkv, weight, sd, dc, H, V, 1e-6),
                        return_mode="median")
    print(f"comba_inputs backward at the best tiles: {backward:.3f} ms (floor without the intermediate "
          f"{floor(2 * nbytes + 4 * nbytes // 3):.3f})", flush=True)
    return {"sweeps": sweeps, "best": {"forward": kernels.FWD_TILE, "chain": kernels.CHAIN_TILE,
                                       "conv": kernels.CONV_TILE},
            "shape": {"B": B, "T": T, "H": H, "K": K, "V": V, "taps": TAPS}, "backward_ms_at_best": backward}


def _bridge_sweeps(floor) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(B, T, D, device=dev, dtype=dt)
    w = torch.randn(len(DILATIONS), D, BRIDGE_K, device=dev) * 0.3
    ctx_grad = torch.randn(B, T, len(DILATIONS), D, device=dev, dtype=dt)
    xb, n = x.numel() * x.element_size(), len(DILATIONS)
    tiles = {"BT": (16, 32, 64), "BC": (32, 64, 128), "num_warps": (2, 4)}
    wf = w.float().contiguous()
    sweeps = {
        "forward": _sweep(dwconv_triton.FWD_TILE, tiles, lambda: dwconv_triton.dilated_dwconv(x, w, DILATIONS),
                          floor((1 + n) * xb), "bridge forward"),
        "dx": _sweep(dwconv_triton.DX_TILE, tiles, lambda: dwconv_triton.input_grad(ctx_grad, wf, DILATIONS, dt),
                     floor((n + 1) * xb), "bridge dx"),
        "dw": _sweep(dwconv_triton.DW_TILE, tiles,
                     lambda: dwconv_triton.weight_grad(ctx_grad, x, DILATIONS, BRIDGE_K),
                     floor((n + 1) * xb), "bridge dw"),
    }
    return {"sweeps": sweeps, "best": {"forward": dwconv_triton.FWD_TILE, "dx": dwconv_triton.DX_TILE,
                                       "dw": dwconv_triton.DW_TILE},
            "shape": {"B": B, "T": T, "C": D, "K": BRIDGE_K, "dilations": DILATIONS}}


def _state_output_sweep(floor) -> dict:
    """Our recurrence-and-output kernel per tile, after the WY form, against fla's ``fwd_h`` + ``fwd_o`` on the same
    w, u (time and difference)."""
    from fla.ops.comba.utils import chunk_comba_cumsum_scalar_fwd
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.utils.constant import RCP_LN2

    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, p = (torch.nn.functional.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).to(dt) for _ in range(3))
    v = torch.randn(B, T, H, V, device=dev, dtype=dt)
    beta = torch.rand(B, T, H, device=dev).to(dt)
    g0, gam = chunk_comba_cumsum_scalar_fwd(-torch.rand(B, T, H, device=dev) * 0.1, chunk_size=64, scale=RCP_LN2)
    _, w, u = comba_wy_triton.wy_form(k, p, v, beta, g0, gam, keep_inverse=False)

    def fla() -> torch.Tensor:
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=gam)
        return chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=gam, scale=K ** -0.5)

    nbytes = 5 * q.numel() * q.element_size() + gam.numel() * 4     # q, k, w, u read, o written; γ
    rows = _sweep(comba_output_triton.STATE_TILE, {"BV": (32, 64), "num_warps": (4, 8)},
                  lambda: comba_output_triton.state_output(q, k, w, u, gam, K ** -0.5), floor(nbytes),
                  "state+o", comba_output_triton._state_output_kernel)
    fla_ms = do_bench(fla, return_mode="median")
    difference = _rel(comba_output_triton.state_output(q, k, w, u, gam, K ** -0.5), fla())
    print(f"fla's fwd_h + fwd_o: {fla_ms:.3f} ms; relative difference {difference:.1e}", flush=True)
    return {"sweeps": {"state_output": rows}, "best": comba_output_triton.STATE_TILE,
            "shape": {"B": B, "T": T, "H": H, "K": K, "V": V}, "fla_fwd_h_and_fwd_o_ms": fla_ms,
            "rel_difference_to_fla": difference}


def _flex_sweep(floor) -> dict:
    """The sliding-window attention (FlexAttention, band block mask) of the 8.1M model, forward + backward and
    forward alone, per block-mask size and kernel options. A combination flex rejects is recorded, not fatal."""
    from crossdna.ops import attention, fused

    Ta, Ha, Da, W = 1024, 8, 16, 512
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v = (torch.randn(B, Ta, Ha, Da, device=dev, dtype=dt).requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    # not ROWS_GUARANTEED_SAFE: it needs a kept key in each row's first scheduled block, which the band's late rows
    # lack (pytorch/pytorch#194154); swept on the H200 it gave NaN in every combination
    tiles = [{"block": block, "options": options} for block in (128, 64) for options in (
        {}, {"BLOCKS_ARE_CONTIGUOUS": True}, {"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 32},
        {"num_warps": 8}) if all(options.get(key, 0) <= block for key in ("BLOCK_M", "BLOCK_N"))]
    nbytes = 5 * q.numel() * q.element_size()  # q, k, v read, o written, lse ignored: forward's floor
    # each option set is a recompilation of the one compiled flex_attention; past dynamo's cache limit flex would
    # run uncompiled (dense, slow) and the sweep would time that
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(tiles))
    # a tile is kept only if its output and q's gradient match the reference on a few sequences: an option that
    # asserts something untrue of the band (or a flex bug) is fast and wrong
    n = 4
    ref_in = [x[:n].detach().float().requires_grad_() for x in (q, k, v)]
    ref = attention.sliding_window_attention(*ref_in, W, 0.25)
    ref.backward(do[:n].float())
    rows = []
    for tile in tiles:
        fused.FLEX_TILE.update(tile)
        try:
            q.grad = None
            out = fused.swa(q, k, v, W, 0.25)
            out.backward(do)
            error = {"out_rel_error": _rel(out[:n], ref), "dq_rel_error": _rel(q.grad[:n], ref_in[0].grad)}
            fwd = do_bench(lambda: fused.swa(q.detach(), k.detach(), v.detach(), W, 0.25), return_mode="median")
            both = do_bench(lambda: fused.swa(q, k, v, W, 0.25).backward(do), return_mode="median")
            rows.append({**tile, **error, "fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_floor_ms": floor(nbytes)})
        except Exception as e:  # an option set flex refuses for this shape
            rows.append({**tile, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"flex     {rows[-1]}", flush=True)
    best = min((r for r in rows if "error" not in r and max(r["out_rel_error"], r["dq_rel_error"]) < 2e-2),
               key=lambda r: r["fwd_bwd_ms"])
    fused.FLEX_TILE.update(block=best["block"], options=best["options"])
    return {"sweeps": {"flex": rows}, "best": dict(fused.FLEX_TILE),
            "shape": {"B": B, "T": Ta, "H": Ha, "D": Da, "window": W}}


FAMILIES = {"comba_inputs": _inputs_sweeps, "wy_form": _wy_sweep, "wy_backward": _wy_backward_sweep,
            "dilated_dwconv": _bridge_sweeps,
            "state_output": _state_output_sweep, "flex": _flex_sweep}


def main(out: Path, families: list[str]) -> None:
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    copy_ms = do_bench(lambda: src.clone(), return_mode="median")
    del src
    bandwidth = 2 * 2 * 2**30 / copy_ms / 1e9            # read + write, bytes per ms → TB/s
    floor = lambda n: n / bandwidth / 1e9  # noqa: E731
    result = {"benchmark": "triton_tiles", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__}, "dtype": "bfloat16",
              "copy_bandwidth_tb_s": bandwidth}
    result.update({name: FAMILIES[name](floor) for name in families})
    result["git_sha"], result["git_dirty"] = git_state()
    name = torch.cuda.get_device_name().split()[1].lower()
    suffix = "" if len(families) == len(FAMILIES) else "_" + "_".join(families)
    (out / f"triton_tiles_{name}{suffix}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    unknown = set(sys.argv[2:]) - set(FAMILIES)
    if len(sys.argv) < 2 or unknown:
        sys.exit(f"usage: triton_tiles_bench.py OUT_DIR [{' '.join(FAMILIES)}] (unknown: {sorted(unknown)})")
    main(Path(sys.argv[1]), sys.argv[2:] or list(FAMILIES))
