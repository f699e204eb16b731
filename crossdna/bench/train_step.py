"""Training-step benchmark: tokens/s, s/step, peak memory and MFU of one full pretraining step.

A step is what the trainer does: forward in ``mode="pretrain"`` (student + batched EMA teacher), every loss term
on (the step index is past the gate freeze and the semantic-loss warm-up), backward, gradient clipping, fused
AdamW on fp32 master weights, EMA update. Batches are real chr20 windows (GRCh37) with MLM masks from the data
pipeline's masker. Warm-up steps (Triton autotuning, tilelang and inductor compilation) are excluded; timed steps
are bracketed by CUDA events and synchronised once at the end, so host and device overlap as in training.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crossdna import flops
from crossdna.cuda_graphs import capture
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel, count_parameters
from crossdna.objectives import ObjectiveConfig, pretrain_loss

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FASTA = REPO.parent / "shared" / "data" / "human_chr20_grch37" / "20.fa.gz"
REGION = ("20", 30_000_000)  # gap-free stretch of chr20 (GRCh37) after the centromere
# Upstream (spec §5): 1×H100, fla 0.6.0, TF32, teacher and aux losses on, L = 1024.
UPSTREAM = {32: {"tokens_per_s": 83e3, "s_per_step": 0.394, "peak_gib": 15.7},
            150: {"tokens_per_s": 204e3, "s_per_step": 0.752, "peak_gib": 72.6}}
STEP = 20_000  # past the gate freeze (5,000) and the semantic warm-up (10,000): every loss term is on


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = (32, 150)
    length: int = 1024
    preset: str = "8m"
    kernels: str = "fused"
    comba_precision: str = "fp32"      # CombaConfig.precision: "fp32" (faithful) or "autocast" (bf16)
    amp: bool = True                   # bf16 autocast around forward + loss (fp32 master weights)
    compile: bool = False
    compile_mode: str = "default"      # torch.compile mode of the layers ("max-autotune-no-cudagraphs": autotuned)
    activation_budget: float = 1.0     # compile_model's activation_budget (< 1: recompute instead of saving)
    cuda_graph: bool = False           # capture the whole step once, replay it (no host work per step)
    overlap_teacher: bool = False      # the teacher's passes on a second CUDA stream beside the student's forward
    swa_kernel: str = "flex"
    gram: str = "off"                  # ObjectiveConfig.gram
    warmup: int = 8
    steps: int = 20
    profile_steps: int = 0
    fasta: str = str(DEFAULT_FASTA)
    seed: int = 0
    tag: str = ""

    def model_config(self) -> CrossDNAConfig:
        cfg = CrossDNAConfig.preset(self.preset).replace(kernels=self.kernels)
        return cfg.replace(comba=dataclasses.replace(cfg.comba, precision=self.comba_precision))

    def name(self) -> str:
        if self.tag:
            return self.tag
        parts = [self.kernels, f"comba-{self.comba_precision}", "amp" if self.amp else "fp32"]
        if self.kernels != "reference":
            parts.append(self.swa_kernel)
        if self.compile:
            parts.append("compile")
        if self.compile_mode != "default":
            parts.append(self.compile_mode.split("-no-")[0])
        if self.activation_budget < 1.0:
            parts.append(f"budget{self.activation_budget:g}")
        if self.cuda_graph:
            parts.append("cudagraph")
        if self.overlap_teacher:
            parts.append("overlap")
        return "_".join(parts)


def real_batches(fasta: str, batch: int, length: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of consecutive chr20 windows, masked as in training (BERT 80/10/10, 15%)."""
    from crossdna.data.config import DataConfig
    from crossdna.data.keys import TRAIN_MASK, sample_keys, stream_key
    from crossdna.data.masking import Masker
    from crossdna.tokens import encode
    from sharding.fasta import Fasta

    contig, start = REGION
    n = batch * count
    clean = encode(Fasta(fasta).read(contig, start, start + n * length).tobytes()).reshape(n, length)
    keys = sample_keys(stream_key(seed, TRAIN_MASK, 0), np.arange(n))
    corrupted, selected = Masker(DataConfig())(clean, keys)
    out = []
    for i in range(count):
        rows = slice(i * batch, (i + 1) * batch)
        out.append({"input_ids": torch.from_numpy(corrupted[rows].astype(np.int64)),
                    "labels": torch.from_numpy(clean[rows].astype(np.int64)),
                    "loss_mask": torch.from_numpy(selected[rows])})
    return out


def make_step(model: SSScanDNAHybridModel, optimizer: torch.optim.Optimizer, amp: bool,
              objective: ObjectiveConfig, step: int, compiled: bool = False) -> Callable[[dict], torch.Tensor]:
    params = list(model.student_parameters())

    def train_step(batch: dict) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(batch["input_ids"], mode="pretrain")
            terms = pretrain_loss(out, batch["labels"], batch["loss_mask"], step, objective, compiled=compiled)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_ema()
        return terms.total.detach()

    return train_step


def build(cfg: BenchConfig, device: torch.device) -> tuple[SSScanDNAHybridModel, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    model = SSScanDNAHybridModel(cfg.model_config()).to(device).train()
    model.set_step(STEP)
    model.overlap_teacher = cfg.overlap_teacher
    if cfg.kernels != "reference":
        from crossdna.ops import fused

        fused.set_swa_kernel(cfg.swa_kernel)
    if cfg.compile:
        from crossdna.model.compile import compile_model

        compile_model(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                      activation_budget=cfg.activation_budget)
    # capturable: the step counter lives on the device, so the optimizer step can be replayed from a graph
    optimizer = torch.optim.AdamW(model.student_parameters(), lr=1e-4, weight_decay=0.1, fused=True,
                                  capturable=cfg.cuda_graph)
    return model, optimizer


# ------------------------------------------------------------------------------------------------- profiler
_CATEGORIES = (  # first match wins; kernel names as the CUDA profiler reports them
    ("comba input stage (ours)", ("_inputs_",)),
    ("comba WY form (ours)", ("_wy_form_",)),
    ("comba state + output (ours)", ("_state_output_",)),
    ("bridge convs (ours)", ("_dwconv_",)),
    ("comba kernels (fla)", ("chunk_", "solve_tril", "recompute_w_u", "prepare_wy", "l2norm", "merge_16x16",
                             "comba", "tilelang", "_tl_", "dqkwg", "kernel_kernel")),
    ("attention", ("flex_attention", "attn", "fmha", "flash", "triton_tem_fused")),
    ("optimizer + EMA", ("multi_tensor_apply", "fused_adam", "adam", "lerp", "foreach")),
    ("inductor fused (pointwise/norms)", ("triton_poi", "triton_red", "triton_per", "triton_")),
    ("matmul (cuBLAS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "splitk")),
    ("convolution (cuDNN)", ("conv", "cudnn", "implicit", "winograd")),
    ("elementwise/reduction (eager)", ("elementwise", "vectorized", "reduce_kernel", "unrolled", "copy", "fill",
                                       "cat", "index", "softmax", "layer_norm", "norm", "gelu", "silu", "sigmoid")),
)


def _category(name: str) -> str:
    low = name.lower()
    for category, keys in _CATEGORIES:
        if any(key in low for key in keys):
            return category
    return "other"


def kernel_profile(step: Callable, batches: list[dict], n: int) -> dict:
    """Device time per kernel over ``n`` steps: a category breakdown and every kernel above 0.05 ms, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        t = getattr(event, "device_time_total", None)
        if t is None:
            t = getattr(event, "cuda_time_total", 0.0)
        if t > 0 and getattr(event, "device_type", None) != torch.autograd.DeviceType.CPU:
            kernels.append((event.key, t / 1e3 / n, event.count // n))
    total = sum(t for _, t, _ in kernels)
    categories: dict[str, float] = {}
    for name, t, _ in kernels:
        categories[_category(name)] = categories.get(_category(name), 0.0) + t
    kernels.sort(key=lambda k: -k[1])
    return {
        "device_ms_per_step": total,
        "categories": {k: {"ms": v, "share": v / total} for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "ms": t, "calls": c, "category": _category(name)}
                        for name, t, c in kernels if t >= 0.05],
    }


# ---------------------------------------------------------------------------------------------------- run
def timed_steps(step: Callable, batches: list[dict], n: int, device: torch.device, reset_peak: bool = True
                ) -> tuple[list[float], list[torch.Tensor], float, float]:
    """``n`` steps bracketed by CUDA events, one sync at the end: (s per step, losses, peak allocated GiB, peak
    reserved GiB)."""
    if reset_peak:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    losses = []
    for i, (begin, end) in enumerate(events):
        begin.record()
        losses.append(step(batches[i % len(batches)]))
        end.record()
    torch.cuda.synchronize()
    return ([b.elapsed_time(e) / 1e3 for b, e in events], losses,
            torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30)


def bench_batch(cfg: BenchConfig, batch: int, device: torch.device, progress: Callable[[str], None]) -> dict:
    model, optimizer = build(cfg, device)
    objective = ObjectiveConfig(gram=cfg.gram)
    step = make_step(model, optimizer, cfg.amp, objective, STEP, compiled=cfg.compile)
    batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()}
               for b in real_batches(cfg.fasta, batch, cfg.length, 4, cfg.seed)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    # Before a capture, warm up on a side stream: what the capture needs (lazily created handles, workspaces)
    # then exists for it.
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device) if cfg.cuda_graph else main
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for i in range(cfg.warmup):
            loss = step(batches[i % len(batches)])
    main.wait_stream(side)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    progress(f"{time.strftime('%H:%M:%S')} batch {batch}: warm-up {cfg.warmup} steps in {warmup_s:.1f} s, "
             f"loss {float(loss):.4f}")

    uncaptured = None
    if cfg.cuda_graph:
        # The same steps uncaptured first (compiled, on the warm-up stream): the comparison in one process.
        with torch.cuda.stream(side):
            plain_times, _, plain_peak, _ = timed_steps(step, batches, cfg.steps, device)
        main.wait_stream(side)
        plain_s = statistics.median(plain_times)
        uncaptured = {"s_per_step_median": plain_s, "tokens_per_s": batch * cfg.length / plain_s,
                      "peak_allocated_gib": plain_peak}
        progress(f"{time.strftime('%H:%M:%S')} batch {batch}: uncaptured {1e3 * plain_s:.1f} ms/step")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        # The capture allocates every activation of a step once, in the graph's private pool; replays reuse those
        # addresses and allocate nothing, so the step's peak is the one seen while capturing.
        step = capture(step, batches[0])
    times, losses, peak, reserved = timed_steps(step, batches, cfg.steps, device, reset_peak=not cfg.cuda_graph)
    s_step = statistics.median(times)
    step_flops = flops.train_step_flops(model.cfg, batch, cfg.length, gram=cfg.gram)
    util = flops.utilisation(step_flops["total"], s_step, torch.cuda.get_device_name(device))
    result = {
        "batch": batch,
        "length": cfg.length,
        "tokens_per_s": batch * cfg.length / s_step,
        "s_per_step_median": s_step,
        "s_per_step_mean": statistics.fmean(times),
        "s_per_step_min": min(times),
        "peak_allocated_gib": peak,
        "peak_reserved_gib": reserved,
        "flops_per_step": step_flops["total"],
        "flops_breakdown": step_flops,
        "achieved_tflops": util.achieved / 1e12,
        "mfu_bf16_dense": util.mfu,
        "warmup_s": warmup_s,
        "final_loss": float(torch.stack(losses).mean()),
    }
    if not math.isfinite(result["final_loss"]):
        # A step that computes NaN can be fast (the flex option that gave 764.3k tokens/s did): kept, but as an error.
        result["error"] = f"non-finite loss ({result['final_loss']}) in the timed steps: not a throughput result"
    if uncaptured is not None:
        result["uncaptured"] = uncaptured
    if batch in UPSTREAM:
        result["upstream"] = UPSTREAM[batch]
        result["speedup_vs_upstream"] = result["tokens_per_s"] / UPSTREAM[batch]["tokens_per_s"]
    if cfg.profile_steps:
        result["profile"] = kernel_profile(step, batches, cfg.profile_steps)
    del model, optimizer, batches, step
    torch.cuda.empty_cache()
    return result


def environment() -> dict:
    import triton

    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda}
    for name in ("fla", "tilelang"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    from launcher.run_tags import git_state

    # The commit and whether tracked files differed from it: a run on a dirty tree still names its base commit.
    sha, dirty = git_state(REPO)
    return {"device": torch.cuda.get_device_name(0), "device_count": torch.cuda.device_count(),
            "versions": versions, "git_sha": sha, "git_dirty": dirty}


def run(cfg: BenchConfig, out_dir: Path | None, progress: Callable[[str], None] = print) -> dict:
    if not torch.cuda.is_available():
        raise ValueError("crossdna bench train-step needs a CUDA GPU (none is visible)")
    if not Path(cfg.fasta).is_file():
        raise ValueError(f"--fasta {cfg.fasta}: no such file (the chr20 FASTA with its .fai/.gzi)")
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls, as upstream
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        parameters = count_parameters(SSScanDNAHybridModel(cfg.model_config()))
    report = {"benchmark": "train_step", "name": cfg.name(),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **environment(),
              "config": dataclasses.asdict(cfg), "parameters": parameters, "results": []}
    for batch in cfg.batch_sizes:
        try:
            report["results"].append(bench_batch(cfg, batch, device, progress))
        except torch.cuda.OutOfMemoryError as e:
            report["results"].append({"batch": batch, "error": f"out of memory: {str(e).splitlines()[0]}"})
            torch.cuda.empty_cache()
        progress(summary_line(report["name"], report["results"][-1]))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = report["device"].replace("NVIDIA ", "").split()[0].lower()
        path = out_dir / f"train_step_{slug}_{cfg.name()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)
        report["path"] = str(path)
    return report


def summary_line(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:44s} B={r['batch']:4d}  {r['error']}"
    mfu = f"{100 * r['mfu_bf16_dense']:.1f}%" if r.get("mfu_bf16_dense") else "n/a"
    up = f"  {r['speedup_vs_upstream']:.2f}x upstream" if "speedup_vs_upstream" in r else ""
    return (f"{name:44s} B={r['batch']:4d}  {r['tokens_per_s'] / 1e3:8.1f}k tok/s  {1e3 * r['s_per_step_median']:7.1f} ms/step"
            f"  peak {r['peak_allocated_gib']:5.1f} GiB  MFU {mfu}{up}")
