"""Tracker and its background sink against a real local sqlite store, and against a server that is not there."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from conftest import free_port
from mlflow_store import fresh_sqlite_store
from launcher.mlflow_sink import MlflowSink, is_transient, read_snapshot, snapshot_tensors
from launcher.tracking import (Tracker, TrackingConfig, flatten_params, looks_secret, redact, redact_uri,
                               resolve_tracking_uri)

CONFIG = {"model": {"dim": 32, "layers": [2, 4]}, "optim": {"lr": 3e-4},
          "data": {"tokens_per_sample": 1024, "hf_token": "hf_abc", "s3": {"secret_access_key": "xyz"}}}


@pytest.fixture
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def make_tracker(run_dir, resume=None, config=CONFIG, **cfg):
    cfg = TrackingConfig(**{"flush_interval_s": 0.1, "telemetry_interval_s": 0, "close_timeout_s": 30, **cfg})
    return Tracker.create(cfg, run_dir, rank=0, world_size=1, resume_run_id=resume, config=config,
                          tags={"strategy": "ddp", "config_hash": "c0ffee"})


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig(uri="http://cfg:5000"), tmp_path) == "http://cfg:5000"
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="flush_interval_s"):
        TrackingConfig(flush_interval_s=0)
    with pytest.raises(ValueError, match="telemetry_interval_s"):
        TrackingConfig(telemetry_interval_s=-1)


def test_secrets_are_redacted_and_params_flattened():
    assert redact_uri("https://alice:pw@mlflow.example.org:8443/x") == "https://mlflow.example.org:8443/x"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert looks_secret("data.hf_token") and looks_secret("api-key") and looks_secret("s3.secret_access_key")
    assert not looks_secret("data.tokens_per_sample") and not looks_secret("model.num_kv_heads")
    assert not looks_secret("data.mask_token") and not looks_secret("tokenizer.pad_token_id")
    assert looks_secret("tracking.mask_token_secret") and looks_secret("hub.token")
    flat = flatten_params(redact(CONFIG))
    assert flat == {"model.dim": "32", "model.layers": "[2, 4]", "optim.lr": "0.0003",
                    "data.tokens_per_sample": "1024", "data.hf_token": "<redacted>",
                    "data.s3.secret_access_key": "<redacted>"}
    assert len(flatten_params({"x": "a" * 10_000})["x"]) == 6000


def test_transient_errors_are_retried_bad_requests_are_not():
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    assert is_transient(MlflowException("down", error_code=codes.TEMPORARILY_UNAVAILABLE))
    assert is_transient(ConnectionError("refused"))
    assert not is_transient(MlflowException("bad", error_code=codes.INVALID_PARAMETER_VALUE))
    assert not is_transient(FileNotFoundError("gone"))


def test_cpu_tensor_snapshot_is_a_copy():
    loss = torch.tensor(2.5)
    snapshot = snapshot_tensors({"a": loss, "b": torch.tensor([7], dtype=torch.int64)})
    loss.zero_()  # the trainer reuses its accumulators in place after logging
    assert snapshot[2] is None and read_snapshot(snapshot) == {"a": 2.5, "b": 7.0}
    with pytest.raises(ValueError, match="scalar"):
        snapshot_tensors({"v": torch.ones(3)})


def test_local_store_run_roundtrip(tmp_path, no_env_uri, caplog):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    fresh_sqlite_store(run_dir)  # where the default URI points; pre-migrated to keep the test fast
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with make_tracker(run_dir) as tracker:
        assert tracker.writes and tracker.tracking_uri.startswith("sqlite:///")
        acc = torch.tensor(0.0)
        for step in range(5):
            acc.fill_(step / 10)
            tracker.log_metrics(step, {"train/loss": torch.tensor(1.0 / (step + 1)), "train/acc": acc,
                                       "train/lr": 1e-3 * step})
        with pytest.raises(ValueError, match="metric name"):
            tracker.log_metrics(5, {"bad name!": 1.0})
        tracker.log_artifact(tmp_path / "missing.safetensors", "model")  # rejected; later work still goes out
        tracker.log_checkpoint(4, tmp_path / "ckpt" / "step-4", "manifest123")
        tracker.log_artifact(tmp_path / "model.safetensors", "model")
    assert "rejected, dropped" in caplog.text

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (run_dir / "mlflow.db").is_file() and (run_dir / "mlartifacts" / tracker.run_id).is_dir()
    assert run.data.params["data.hf_token"] == "<redacted>" and run.data.params["model.dim"] == "32"
    assert run.data.tags["strategy"] == "ddp" and run.data.tags["world_size"] == "1"
    assert '"manifest_hash": "manifest123"' in run.data.tags["checkpoint.latest"]
    hist = {k: sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, k))
            for k in ("train/loss", "train/acc", "train/lr")}
    assert hist["train/loss"] == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert hist["train/acc"] == [(s, pytest.approx(s / 10)) for s in range(5)]  # values at log time
    assert hist["train/lr"] == [(s, pytest.approx(1e-3 * s)) for s in range(5)]
    assert {a.path for a in client.list_artifacts(tracker.run_id, "model")} == {"model/model.safetensors"}
    config_text = (run_dir / "mlartifacts" / tracker.run_id / "artifacts" / "config.yaml").read_text()
    assert "hf_token: <redacted>" in config_text and "hf_abc" not in config_text


def test_resume_appends_to_the_same_run(tmp_path, no_env_uri, caplog):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    fresh_sqlite_store(run_dir)
    first = make_tracker(run_dir)
    first.log_metrics(0, {"train/loss": 2.0})
    first.close("KILLED")

    changed = {**CONFIG, "optim": {"lr": 1e-4, "warmup": 100}}
    second = make_tracker(run_dir, resume=first.run_id, config=changed)
    second.log_metrics(1, {"train/loss": 1.5})
    second.close()
    assert second.run_id == first.run_id
    assert "changed config values ['optim.lr']" in caplog.text

    client = MlflowClient(second.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crossdna-pretrain").experiment_id])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1" and run.data.tags["resume.1.changed_params"] == "optim.lr"
    assert run.data.params["optim.lr"] == "0.0003" and run.data.params["optim.warmup"] == "100"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "config.resume-1.yaml"}

    # a checkpoint whose run is not in this store starts a fresh run that points back to it
    third = make_tracker(run_dir, resume="f" * 32)
    third.close()
    assert third.run_id not in (first.run_id, "f" * 32)
    assert client.get_run(third.run_id).data.tags["resumed_from_run_id"] == "f" * 32


def test_unreachable_server_costs_warnings_not_steps(caplog):
    caplog.set_level(logging.WARNING, logger="crossdna.tracking")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    tracker = Tracker.create(TrackingConfig(uri=uri, start_timeout_s=1.0), "unused", rank=0, world_size=1,
                             resume_run_id=None, config=CONFIG, tags={})
    assert tracker.run_id is None and not tracker.writes
    assert "training continues untracked" in caplog.text
    tracker.log_metrics(0, {"train/loss": 1.0})
    tracker.close()

    sink = MlflowSink(uri, "0" * 32, max_queue=5, flush_interval_s=0.05)
    t0 = time.perf_counter()
    for step in range(20):
        sink.put_metrics(step, {"train/loss": torch.tensor(float(step))})
    assert time.perf_counter() - t0 < 1.0  # enqueueing never waits on the network
    assert sink.dropped >= 14 and sink.queued() <= 6  # bounded: oldest dropped, at most one batch in flight
    t0 = time.perf_counter()
    assert sink.close(timeout_s=1.0) is False
    assert time.perf_counter() - t0 < 5.0
    assert "tracking queue full" in caplog.text and "failed attempts" in caplog.text
    assert "giving up on" in caplog.text
