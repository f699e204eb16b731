"""On a GPU machine: NVML counters, device-tensor metrics without a host sync, and the GPU report plot."""
from __future__ import annotations

import time

import pytest
import torch

from crossdna.cli import main
from launcher.mlflow_sink import read_snapshot, snapshot_tensors
from launcher.telemetry import NvmlGpus
from launcher.tracking import Tracker, TrackingConfig
from mlflow_store import fresh_sqlite_store

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and its driver")]


def test_nvml_reads_the_extended_counters():
    gpus = NvmlGpus()
    try:
        assert gpus.available
        sample = gpus.sample()
    finally:
        gpus.close()
    for field in ("util_pct", "mem_used_gib", "power_w", "temp_c", "sm_clock_mhz", "throttle_reasons"):
        assert f"gpu0/{field}" in sample, field
    assert 0 <= sample["gpu0/util_pct"] <= 100 and 10 < sample["gpu0/temp_c"] < 110
    assert 100 < sample["gpu0/sm_clock_mhz"] < 5000 and 10 < sample["gpu0/power_w"] < 1500


def test_device_tensor_snapshot_does_not_wait_for_the_stream():
    loss = torch.full((), 1.25, device="cuda")
    lr = torch.full((), 0.5, device="cuda")
    # Once untimed: CUDA loads each kernel's module on its first launch (lazy loading), and loading synchronises
    # the context, which would look like the snapshot waiting. A trainer's logging call is never the first use.
    read_snapshot(snapshot_tensors({"loss": loss.mul(2).zero_(), "lr": lr}))
    torch.cuda.synchronize()
    busy = torch.cuda.Event()
    torch.cuda._sleep(500_000_000)  # keep the stream busy for a few hundred ms, like a long backward
    busy.record()
    loss.mul_(2)  # the value the snapshot must see is the one after the queued work
    snapshot = snapshot_tensors({"loss": loss, "lr": lr})
    loss.zero_()  # the trainer may reuse its accumulator right after logging
    assert not busy.query(), "snapshot_tensors waited for the stream"
    assert not snapshot[2].query()
    after = torch.cuda.Event()
    torch.cuda._sleep(500_000_000)  # work queued after the snapshot must not delay reading it
    after.record()
    assert read_snapshot(snapshot) == {"loss": 2.5, "lr": 0.5}
    assert not after.query(), "read_snapshot waited for work queued after the snapshot"


def test_cuda_metrics_and_gpu_telemetry_reach_the_report(tmp_path):
    from mlflow import MlflowClient

    cfg = TrackingConfig(uri=fresh_sqlite_store(tmp_path), flush_interval_s=0.1, telemetry_interval_s=0.2)
    model = torch.nn.Linear(2048, 2048, device="cuda")
    x = torch.randn(512, 2048, device="cuda")
    with Tracker.create(cfg, tmp_path / "run", rank=0, world_size=1, resume_run_id=None, config={"d": 2048},
                        tags={}) as tracker:
        t_end = time.monotonic() + 1.5
        step = 0
        while time.monotonic() < t_end:
            loss = model(x).pow(2).mean()
            loss.backward()
            # device tensors, a CPU tensor (a gloo collective's result) and a float in one call
            tracker.log_metrics(step, {"train/loss": loss.detach(), "perf/step_time_max_s": torch.tensor(0.1),
                                       "perf/samples_per_s": 512.0})
            step += 1
    run = MlflowClient(cfg.uri).get_run(tracker.run_id)
    for key in ("train/loss", "perf/step_time_max_s", "perf/samples_per_s"):
        assert len(MlflowClient(cfg.uri).get_metric_history(tracker.run_id, key)) == step, key
    assert any(k.endswith("/gpu0/util_pct") for k in run.data.metrics)
    assert main(["report", tracker.run_id, "--tracking-uri", cfg.uri, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "gpu.png").stat().st_size > 10_000
