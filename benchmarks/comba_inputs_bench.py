"""Comba's input-stage kernels (crossdna/ops/comba_inputs_triton.py) at the 8.1M model's B = 150 shape, per tile
configuration, against their byte floors (each tensor read once, written once) and the copy bandwidth measured
here. Writes ``comba_inputs_<device>.json``.

    python benchmarks/comba_inputs_bench.py OUT_DIR
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
from launcher.run_tags import git_state

B, T, H, K, V, TAPS = 150, 1024, 8, 64, 64, 4


def main(out: Path) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    C = H * (2 * K + V)
    qkv = torch.randn(B, T, C, device=dev, dtype=dt)
    weight = torch.randn(C, TAPS, device=dev) * 0.5
    sd, dc = torch.rand(H, device=dev), torch.randn(H, device=dev) * 0.1
    grads = [torch.randn(B, T, H, K, device=dev, dtype=dt) for _ in range(4)]
    nbytes = qkv.numel() * qkv.element_size()
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)
    copy_ms = do_bench(lambda: src.clone(), return_mode="median")
    bandwidth = 2 * src.numel() / copy_ms / 1e9            # read + write, bytes per ms → TB/s
    floors = {"forward": nbytes + 4 * nbytes // 3,                # read q, k, v; write q, k, v, p
              "backward": nbytes + 4 * nbytes // 3 + nbytes}      # read q, k, v and 4 gradients; write dx
    rows = []
    for bt_fwd, (bt_bwd, bc_bwd) in itertools.product((32, 64), ((32, 64), (64, 64), (32, 128))):
        kernels._BT_FWD, kernels._BT_BWD, kernels._BC_BWD = bt_fwd, bt_bwd, bc_bwd
        fwd = do_bench(lambda: kernels.comba_inputs(qkv, weight, sd, dc, H, V), return_mode="median")
        bwd = do_bench(lambda: kernels.comba_inputs_backward(*grads, qkv, weight, sd, dc, H, V, 1e-6),
                       return_mode="median")
        row = {"bt_fwd": bt_fwd, "bt_bwd": bt_bwd, "bc_bwd": bc_bwd, "forward_ms": fwd, "backward_ms": bwd,
               "forward_floor_ms": floors["forward"] / bandwidth / 1e9, "backward_floor_ms": floors["backward"] / bandwidth / 1e9}
        rows.append(row)
        print(f"fwd tile {bt_fwd:3d}: {fwd:6.3f} ms (floor {row['forward_floor_ms']:.3f})   bwd tile {bt_bwd:3d}x{bc_bwd:3d}: "
              f"{bwd:6.3f} ms (floor {row['backward_floor_ms']:.3f})", flush=True)
    result = {"benchmark": "comba_inputs", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__, "triton": triton.__version__},
              "shape": {"B": B, "T": T, "H": H, "K": K, "V": V, "taps": TAPS, "dtype": "bfloat16"},
              "copy_bandwidth_tb_s": bandwidth, "rows": rows}
    result["git_sha"], result["git_dirty"] = git_state()
    name = torch.cuda.get_device_name().split()[1].lower()
    (out / f"comba_inputs_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
