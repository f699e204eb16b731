"""Kernel floors at the 8.1M pretraining shape: Comba (fla chunk_comba) and sliding-window attention variants.

Times fwd and fwd+bwd with triton.testing.do_bench (median of CUDA-event timings, after warm-up) at B=150,
T=1024: Comba with 8 heads of 64 in fp32 and bf16; attention with 8 heads of 16, window 512, in bf16 for
FlexAttention (band block mask), fla parallel_attn(window_size), SDPA with a dense band mask, and SDPA causal
(no window: a floor for comparison only). Writes JSON to the folder given (default benchmarks/results).

    python benchmarks/kernels_bench.py [OUT_DIR] [--batch 150]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from crossdna.bench.train_step import environment  # noqa: E402
from crossdna.ops import fused  # noqa: E402


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=200, rep=800, return_mode="median")


def comba_case(B: int, dtype: torch.dtype) -> dict:
    T, H, K = 1024, 8, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(B, T, H, K, device="cuda", generator=gen, dtype=dtype).requires_grad_() for _ in range(4)]
    g = (-F.softplus(torch.randn(B, T, H, device="cuda", generator=gen) - 2)).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda", generator=gen, dtype=dtype).requires_grad_()
    do = torch.randn(B, T, H, K, device="cuda", generator=gen, dtype=dtype)

    def fwd():
        with torch.no_grad():
            fused.comba(*x, g, beta, scale=0.125)

    def fwd_bwd():
        fused.comba(*x, g, beta, scale=0.125).backward(do)

    return {"op": "comba", "dtype": str(dtype), "batch": B, "fwd_ms": timed(fwd), "fwd_bwd_ms": timed(fwd_bwd)}


def attention_case(B: int, kernel: str) -> dict:
    T, H, D, W = 1024, 8, 16, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    if kernel == "sdpa_causal_nowindow":
        def call():
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                                  scale=0.125).transpose(1, 2)
    else:
        fused.set_swa_kernel(kernel)

        def call():
            return fused.swa(q, k, v, W, 0.125)

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        call().backward(do)

    return {"op": "swa", "kernel": kernel, "dtype": "bf16", "batch": B, "fwd_ms": timed(fwd), "fwd_bwd_ms": timed(fwd_bwd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="benchmarks/results")
    parser.add_argument("--batch", type=int, default=150)
    args = parser.parse_args()
    rows = []
    # Attention first: cold Triton autotuning of the Comba kernels takes minutes, and the file is rewritten after
    # every case, so a run cut short by a time limit still reports what it measured.
    cases = [lambda k=k: attention_case(args.batch, k) for k in ("flex", "fla", "sdpa", "sdpa_causal_nowindow")]
    cases += [lambda: comba_case(args.batch, torch.bfloat16), lambda: comba_case(args.batch, torch.float32)]
    report = {"benchmark": "kernels", **environment(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{report['device'].replace('NVIDIA ', '').split()[0].lower()}.json"
    for case in cases:
        try:
            rows.append(case())
        except Exception as e:  # one failing variant must not hide the others
            rows.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    fused.set_swa_kernel("flex")


if __name__ == "__main__":
    main()
