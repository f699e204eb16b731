"""End-to-end tracking against a real ``mlflow server`` (full mlflow, sqlite backend) on 127.0.0.1.

A 2-rank torchrun job (tests/tracking_driver.py: real DDP training over gloo, using the tracker exactly as the
trainer does) must log exactly one run with the expected params, tags, metric histories and artifacts; keep
training and exit 0 when the server dies mid-run; and append to the same run when resumed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, free_port

pytestmark = pytest.mark.slow

DATA = SHARED_DATA / "gb_toy_subsamples" / "regulatory_ensembl_train_subsample.tsv"
SECRET = "sekrit-token-4711"


class MlflowServer:
    """``mlflow server`` in its own process group (it spawns uvicorn and job-runner children)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db_uri = f"sqlite:///{root / 'server.db'}"
        mlflow = Path(sys.executable).parent / "mlflow"
        self._log = open(root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", self.db_uri, "--artifacts-destination", str(root / "artifacts")],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server at {self.uri} not healthy after {timeout_s} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        try:  # children that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.wait_healthy()
        yield server
    finally:
        server.kill()


def run_driver(run_dir: Path, uri: str, *args: str, wait: bool = True, timeout_s: float = 180.0):
    if not DATA.exists():
        pytest.skip(f"needs the shared data folder: {DATA}")
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_TOKEN": SECRET,
           "DRIVER_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "tracking_driver.py"), "--run-dir", str(run_dir), "--data", str(DATA), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    return finish(proc, timeout_s)


def finish(proc: subprocess.Popen, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"driver timed out:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_rank_run_logs_one_complete_run(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    steps = 8
    res = run_driver(tmp_path / "run", mlflow_server.uri, "--steps", str(steps), "--export")
    assert res.returncode == 0, res.stderr[-4000:]

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("driver")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "exactly one run for a 2-rank job"
    run = runs[0]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["model.dim"] == "32" and params["optim.lr"] == "0.001"
    assert params["tracking.experiment"] == "driver"
    assert params["secrets.api_token"] == "<redacted>"

    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["strategy"] == "ddp"
    assert tags["data.manifest_hash"] == "gb-regulatory-subsample" and len(tags["config_hash"]) == 16
    assert tags["num_nodes"] == "1" and tags["nodes"] == socket.gethostname()
    for key in ("git.sha", "git.dirty", "gpu.model", "version.torch", "version.triton", "version.fla",
                "version.deepspeed", "version.mlflow"):
        assert tags[key], key
    assert f'"step": {steps}' in tags["checkpoint.latest"]

    # every training step once, from one writer
    for key in ("train/loss", "train/acc", "train/grad_norm", "perf/tokens_per_s", "perf/data_wait_s",
                "perf/step_time_min_s", "perf/step_time_max_s"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(steps)), key
    losses = [v for _, v in history(client, run.info.run_id, "train/loss")]
    assert all(0.5 < v < 2.5 for v in losses), losses  # cross-entropy over 5 classes: ~ln 5 at start
    lo = dict(history(client, run.info.run_id, "perf/step_time_min_s"))
    hi = dict(history(client, run.info.run_id, "perf/step_time_max_s"))
    assert all(0 < lo[s] <= hi[s] for s in lo)
    assert history(client, run.info.run_id, "eval/loss")[0][0] == steps

    # one telemetry sampler (rank 0's node), host counters without a GPU
    node_keys = {k.split("/")[1] for k in run.data.metrics if k.startswith("sys/")}
    assert len(node_keys) == 1
    ram = history(client, run.info.run_id, f"sys/{node_keys.pop()}/ram_used_gib")
    assert ram and {s for s, _ in ram} <= set(range(steps + 1))  # stamped with the training step

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.safetensors"]
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "api_token: <redacted>" in config_text

    # credentials from the environment never reach the store
    everything = repr((params, tags, config_text))
    assert SECRET not in everything


def test_resumed_job_appends_to_the_same_run(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    first = run_driver(run_dir, mlflow_server.uri, "--steps", "4", "--exit-status", "KILLED")
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_driver(run_dir, mlflow_server.uri, "--steps", "8", "--resume")
    assert second.returncode == 0, second.stderr[-4000:]

    client = MlflowClient(mlflow_server.uri)
    run_id = json.loads((run_dir / "trainer.json").read_text())["run_id"]
    run = client.get_run(run_id)
    exp_runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.run_dir = '{run_dir.resolve()}'")
    assert [r.info.run_id for r in exp_runs] == [run_id], "the resumed job must not create a second run"
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1"
    assert [s for s, _ in history(client, run_id, "train/loss")] == list(range(8))
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "config.resume-1.yaml"}


def test_server_killed_mid_run_training_completes(tmp_path):
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path / "doomed-server")
    try:
        server.wait_healthy()
        run_dir = tmp_path / "run"
        proc = run_driver(run_dir, server.uri, "--steps", "12", "--pause-at", "3", wait=False)
        deadline = time.monotonic() + 120
        while not (run_dir / "paused").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "driver did not reach the pause"
            time.sleep(0.1)
        server.kill()
        t_kill = time.monotonic()
        (run_dir / "go").touch()
        res = finish(proc)
        elapsed = time.monotonic() - t_kill
    finally:
        server.kill()

    assert res.returncode == 0, res.stderr[-4000:]
    assert "WARNING crossdna.tracking" in res.stderr
    assert "giving up on" in res.stderr  # close() reported what it could not send, then let the job end
    assert elapsed < 60, f"shutdown with a dead server took {elapsed:.0f} s"
    assert (run_dir / "trainer.json").exists()  # the training loop ran to its end

    # what was sent before the kill is in the server's store
    store = MlflowClient(server.db_uri)
    (run,) = store.search_runs([store.get_experiment_by_name("driver").experiment_id])
    assert [s for s, _ in history(store, run.info.run_id, "train/loss")] == [0, 1, 2, 3]
    assert run.info.status == "RUNNING"  # never marked finished: the server was gone
