"""The project's Triton kernels at the 8.1M model's B = 150 shapes, per tile configuration (tokens and channels per
program, warps), each kernel on its own, against its byte floor (each tensor read once, written once) at the copy
bandwidth measured here: Comba's input stage (crossdna/ops/comba_inputs_triton.py) and the TokenBridge's dilated
depthwise convs (crossdna/ops/dwconv_triton.py). Writes ``triton_tiles_<device>.json``; the modules' tile dicts are
left at the fastest, which is what the modules' defaults are set from.

    python benchmarks/triton_tiles_bench.py OUT_DIR
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
from crossdna.ops import dwconv_triton
from launcher.run_tags import git_state

B, T, H, K, V, TAPS = 150, 1024, 8, 64, 64, 4
D, DILATIONS, BRIDGE_K = 512, (1, 2, 4, 8, 16), 9


def _sweep(tile: dict, options: dict, run, floor_ms: float, label: str) -> list[dict]:
    """Time ``run`` at every combination of ``options`` written into ``tile`` (the module's tile dict); the
    dict is left at the fastest."""
    rows = []
    for values in itertools.product(*options.values()):
        tile.update(zip(options, values))
        ms = do_bench(run, return_mode="median")
        rows.append({**tile, "ms": ms, "floor_ms": floor_ms})
        print(f"{label:8s} {tile}: {ms:6.3f} ms (floor {floor_ms:.3f})", flush=True)
    tile.update({k: v for k, v in min(rows, key=lambda r: r["ms"]).items() if k in tile})
    return rows


def main(out: Path) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    C = H * (2 * K + V)
    qkv = torch.randn(B, T, C, device=dev, dtype=dt)
    weight = torch.randn(C, TAPS, device=dev) * 0.5
    sd, dc = torch.rand(H, device=dev), torch.randn(H, device=dev) * 0.1
    grads = [torch.randn(B, T, H, K, device=dev, dtype=dt) for _ in range(4)]
    dy = torch.randn_like(qkv)
    nbytes = qkv.numel() * qkv.element_size()
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)
    copy_ms = do_bench(lambda: src.clone(), return_mode="median")
    bandwidth = 2 * src.numel() / copy_ms / 1e9            # read + write, bytes per ms → TB/s
    floor = lambda n: n / bandwidth / 1e9  # noqa: E731
    warps = (2, 4, 8)
    sweeps = {  # byte floors: each tensor read once, written once (p has q's size: 4 outputs = 4/3 of qkv)
        "forward": _sweep(kernels.FWD_TILE, {"BT": (32, 64, 128), "num_warps": warps},
                          lambda: kernels.comba_inputs(qkv, weight, sd, dc, H, V),
                          floor(nbytes + 4 * nbytes // 3), "forward"),
        "chain": _sweep(kernels.CHAIN_TILE, {"BT": (32, 64, 128), "num_warps": warps},
                        lambda: kernels.chain_backward(grads, qkv, weight, sd, dc, H, K, V, 1e-6),
                        floor(2 * nbytes + 4 * nbytes // 3), "chain"),
        "conv": _sweep(kernels.CONV_TILE, {"BT": (16, 32, 64), "BC": (32, 64, 128), "num_warps": warps},
                       lambda: kernels.conv_backward(dy, qkv, weight), floor(3 * nbytes), "conv"),
    }
    backward = do_bench(lambda: kernels.comba_inputs_backward(*grads, qkv, weight, sd, dc, H, V, 1e-6),
                        return_mode="median")
    print(f"comba_inputs backward at the best tiles: {backward:.3f} ms (floor without the intermediate "
          f"{floor(2 * nbytes + 4 * nbytes // 3):.3f})", flush=True)
    x = torch.randn(B, T, D, device=dev, dtype=dt)
    w = torch.randn(len(DILATIONS), D, BRIDGE_K, device=dev) * 0.3
    ctx_grad = torch.randn(B, T, len(DILATIONS), D, device=dev, dtype=dt)
    xb, n = x.numel() * x.element_size(), len(DILATIONS)
    tiles = {"BT": (16, 32, 64), "BC": (32, 64, 128), "num_warps": (2, 4)}
    wf = w.float().contiguous()
    sweeps["bridge_forward"] = _sweep(dwconv_triton.FWD_TILE, tiles,
                                      lambda: dwconv_triton.dilated_dwconv(x, w, DILATIONS),
                                      floor((1 + n) * xb), "bridge forward")
    sweeps["bridge_dx"] = _sweep(dwconv_triton.DX_TILE, tiles,
                                 lambda: dwconv_triton.input_grad(ctx_grad, wf, DILATIONS, dt),
                                 floor((n + 1) * xb), "bridge dx")
    sweeps["bridge_dw"] = _sweep(dwconv_triton.DW_TILE, tiles,
                                 lambda: dwconv_triton.weight_grad(ctx_grad, x, DILATIONS, BRIDGE_K),
                                 floor((n + 1) * xb), "bridge dw")
    result = {"benchmark": "triton_tiles", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__, "triton": triton.__version__},
              "shapes": {"comba_inputs": {"B": B, "T": T, "H": H, "K": K, "V": V, "taps": TAPS},
                         "dilated_dwconv": {"B": B, "T": T, "C": D, "K": BRIDGE_K, "dilations": DILATIONS},
                         "dtype": "bfloat16"},
              "copy_bandwidth_tb_s": bandwidth, "sweeps": sweeps,
              "best": {"comba_inputs": {"forward": kernels.FWD_TILE, "chain": kernels.CHAIN_TILE, "conv": kernels.CONV_TILE},
                       "dilated_dwconv": {"forward": dwconv_triton.FWD_TILE, "dx": dwconv_triton.DX_TILE,
                                          "dw": dwconv_triton.DW_TILE}},
              "comba_inputs_backward_ms_at_best": backward}
    result["git_sha"], result["git_dirty"] = git_state()
    name = torch.cuda.get_device_name().split()[1].lower()
    (out / f"triton_tiles_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
