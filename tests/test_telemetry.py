"""Per-node telemetry sampler and the cross-rank step-time spread."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from conftest import free_port
from mlflow_store import fresh_sqlite_store
from launcher.stragglers import step_time_spread
from launcher.telemetry import NvmlGpus, Telemetry, metric_safe


def test_metric_safe_node_names():
    assert metric_safe("gpu-node01.cluster") == "gpu-node01.cluster"
    assert metric_safe("a b/c:d") == "a_b_c_d"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path")
def test_without_a_driver_gpu_part_is_off_with_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="crossdna.telemetry")
    gpus = NvmlGpus()
    assert not gpus.available and gpus.sample() == {}
    lines = [r for r in caplog.records if r.name == "crossdna.telemetry"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "host CPU/RAM only" in lines[0].message


def test_sampler_logs_host_counters_into_the_run(tmp_path, caplog):
    from mlflow import MlflowClient

    uri = fresh_sqlite_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
                               ).info.run_id
    step = {"now": 100}
    telemetry = Telemetry(run_id, uri, node_id="node 7", interval_s=0.2, step_fn=lambda: step["now"]).start()
    for _ in range(3):
        step["now"] += 10
        busy_until = time.perf_counter() + 0.3
        while time.perf_counter() < busy_until:  # CPU work over a whole sampling interval (a sleep shows none)
            torch.randn(256, 256) @ torch.randn(256, 256)
    telemetry.stop()

    metrics = client.get_run(run_id).data.metrics
    assert {"sys/node_7/cpu_pct", "sys/node_7/ram_used_gib", "sys/node_7/ram_pct", "sys/node_7/load1"} <= set(metrics)
    cpu = client.get_metric_history(run_id, "sys/node_7/cpu_pct")
    assert len(cpu) >= 3 and all(0 <= m.value <= 100 for m in cpu)
    assert any(m.value > 0 for m in cpu)  # the per-thread baseline is primed on the sampler thread
    assert {m.step for m in cpu} <= {100, 110, 120, 130}  # aligned with the training step
    assert 0 < metrics["sys/node_7/ram_used_gib"] < 1e4
    if NvmlGpus().available:
        assert "sys/node_7/gpu0/util_pct" in metrics


def test_step_time_spread_single_process():
    spread = step_time_spread(0.25)
    assert spread["perf/step_time_min_s"].item() == spread["perf/step_time_max_s"].item() == 0.25
    assert spread["perf/step_time_straggler"].item() == 1.0


def _spread_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    spread = step_time_spread([0.1, 0.3][rank])
    torch.save({k: v.item() for k, v in spread.items()}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_step_time_spread_two_ranks_agree(tmp_path):
    torch.multiprocessing.spawn(_spread_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["perf/step_time_min_s"] == pytest.approx(0.1)
        assert got["perf/step_time_max_s"] == pytest.approx(0.3)
        assert got["perf/step_time_straggler"] == pytest.approx(3.0)
