"""``crossdna report``: PNG plots of a tracked run, read back from the tracking store."""
from __future__ import annotations

import pytest
import torch

from crossdna.cli import main
from launcher.telemetry import NvmlGpus
from launcher.tracking import Tracker, TrackingConfig
from mlflow_store import fresh_sqlite_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A short real run: a tiny regression trained for a few steps, with host telemetry."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    cfg = TrackingConfig(uri=fresh_sqlite_store(run_dir.parent), flush_interval_s=0.1,
                         telemetry_interval_s=0.2)
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1)
    model = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Tracker.create(cfg, run_dir, rank=0, world_size=1, resume_run_id=None, config={"lr": 0.05},
                        tags={}) as tracker:
        for step in range(30):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.log_metrics(step, {"train/loss": loss.detach(), "perf/samples_per_s": 256 / 0.01,
                                       "perf/step_time_min_s": 0.01, "perf/step_time_max_s": 0.012})
        tracker.log_metrics(30, {"eval/loss": torch.nn.functional.mse_loss(model(x), y).detach()})
        tracker.flush(10)
        torch.randn(512, 512) @ torch.randn(512, 512)
    return cfg.uri, tracker.run_id


def test_report_renders_pngs(tracked_run, tmp_path, capsys):
    uri, run_id = tracked_run
    assert main(["report", run_id, "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    written = {p.rsplit("/", 1)[-1] for p in capsys.readouterr().out.split()}
    assert written == {"loss.png", "throughput.png", "host.png"} | ({"gpu.png"} if NvmlGpus().available else set())
    for name in ("loss.png", "throughput.png", "host.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_report_errors_are_one_line(tracked_run, tmp_path, capsys):
    uri, _ = tracked_run
    assert main(["report", "0" * 32, "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossdna report: error: run 00000000")
    assert main(["report", "abc", "--run-dir", str(tmp_path)]) == 2
    assert "no tracking store in this run directory" in capsys.readouterr().err
