"""The real trainer against a real ``mlflow server`` (full mlflow, sqlite backend) on 127.0.0.1.

2-rank ``torchrun -m launcher.train`` jobs (tiny preset, gloo, CPU) on the chr20 shards, started with the helpers of
tests/test_launcher_e2e.py: a job logs exactly one run with the expected params, tags, metric histories and
artifacts (read back with MlflowClient); a job whose tracking server dies mid-run still trains to its end and exits
0 with a warning; a resumed job appends to the same run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port
from tests.test_launcher_e2e import TINY, finish, launch, run, steps

pytestmark = pytest.mark.slow

SECRET = "sekrit-token-4711"  # MLFLOW_TRACKING_TOKEN of the jobs: sent to the server, never stored by it
TRACKED = ("tracking.enabled=true", "tracking.flush_interval_s=0.2", "tracking.telemetry_interval_s=1",
           "trainer.eval_every=3", "trainer.ckpt_every=3")
PER_STEP = ("train/loss", "train/ce", "train/sem", "train/gate", "train/acc", "train/lr", "train/grad_norm",
            "perf/tokens_per_s", "perf/tokens_seen", "perf/data_wait_s", "perf/step_time_min_s",
            "perf/step_time_max_s")


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
        """SIGKILL the server and its children at once, as a node failure or the OOM killer would. Idempotent."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)
        self._log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.wait_healthy()
        yield server
    finally:
        server.kill()


@pytest.fixture
def tracking_token(monkeypatch):
    """The jobs inherit the test's environment (tests.test_launcher_e2e._env): give them a credential."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)


def tracked(uri: str, experiment: str, *overrides: str) -> tuple[str, ...]:
    return (*TRACKED, f"tracking.uri={uri}", f"tracking.experiment={experiment}", *overrides)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def logged_steps(client, run_id: str, key: str) -> list[int]:
    return [s for s, _ in history(client, run_id, key)]


def only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def checkpointed_run_id(run_dir: Path, step: int) -> str:
    return json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "trainer.json").read_text())["tracking_run_id"]


def test_two_rank_trainer_logs_one_run_with_params_tags_histories_and_config(
        mlflow_server, tracking_token, chr20_shards, tmp_path):
    from mlflow import MlflowClient

    from crossdna.config import config_hash, to_dict
    from launcher.config import load_train_config
    from launcher.run_tags import git_state
    from launcher.tracking import flatten_params, redact
    from sharding.manifest import load_manifest, manifest_hash

    run_dir = tmp_path / "run"
    overrides = tracked(mlflow_server.uri, "e2e-one-run", "trainer.steps=6")
    run(run_dir, chr20_shards, *overrides)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("e2e-one-run")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "rank 1 must not create a run of its own"
    run_ = runs[0]
    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED"
    assert checkpointed_run_id(run_dir, 3) == checkpointed_run_id(run_dir, 6) == run_id
    assert run_.info.run_name == "run"  # the run directory's name

    # The resolved config, flattened: what the trainer ran with, not what the YAML file said.
    cfg = load_train_config(str(TINY), [f"data.path={chr20_shards}", f"trainer.run_dir={run_dir}", *overrides])
    params = run_.data.params
    assert params == flatten_params(redact(to_dict(cfg)))
    assert params["trainer.strategy"] == "ddp" and params["trainer.steps"] == "6"
    assert params["model.d_model"] == "32" and params["model.comba.num_heads"] == "2"
    assert params["optim.lr"] == "0.003" and params["data.path"] == str(chr20_shards)
    assert params["tracking.experiment"] == "e2e-one-run"
    assert params["data.mask_token"] == "upstream"  # a vocabulary token is a setting, not a credential

    tags = run_.data.tags
    assert tags["config_hash"] == config_hash(cfg)
    assert tags["data.manifest_hash"] == manifest_hash(load_manifest(chr20_shards / "manifest.json"))
    # The sha of the code that ran; "dirty" only by kind, as the tree may change while the test runs.
    assert tags["git.sha"] == git_state(REPO)[0] and tags["git.dirty"] in ("true", "false")
    assert tags["strategy"] == "ddp" and tags["world_size"] == "2"
    assert tags["num_nodes"] == "1" and tags["nodes"] == socket.gethostname()
    assert tags["run_dir"] == str(run_dir.resolve())
    for key in ("gpu.model", "version.torch", "version.triton", "version.fla", "version.deepspeed",
                "version.mlflow", "version.crossdna"):
        assert tags[key], key
    latest = json.loads(tags["checkpoint.latest"])
    assert latest == {"step": 6, "path": str((run_dir / "checkpoints" / "step-00000006").resolve()),
                      "manifest_hash": tags["data.manifest_hash"]}
    assert tags["checkpoint.step_000000003"].endswith("step-00000003")

    # One point per optimizer step from one writer, holding the values rank 0 wrote to train_log.jsonl.
    records = steps(run_dir)
    for key in PER_STEP:
        points = history(client, run_id, key)
        assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6], key
        if key in records[1]:
            assert [v for _, v in points] == pytest.approx([records[s][key] for s in range(1, 7)], rel=1e-6), key
    assert all(1.0 < v < 2.0 for _, v in history(client, run_id, "train/ce"))  # ~ln 5 = 1.61 at the start
    low = dict(history(client, run_id, "perf/step_time_min_s"))
    high = dict(history(client, run_id, "perf/step_time_max_s"))
    assert all(0 < low[s] <= high[s] for s in low)
    for key in ("eval/ce", "eval/ppl", "eval/acc", "checkpoint/step"):
        assert logged_steps(client, run_id, key) == [3, 6], key
    assert all(ppl == pytest.approx(math.exp(ce)) for (_, ce), (_, ppl)
               in zip(history(client, run_id, "eval/ce"), history(client, run_id, "eval/ppl")))

    # One telemetry sampler (the node's local rank 0), its points stamped with training steps.
    nodes = {k.split("/")[1] for k in run_.data.metrics if k.startswith("sys/")}
    assert len(nodes) == 1
    ram = history(client, run_id, f"sys/{nodes.pop()}/ram_used_gib")
    assert ram and {s for s, _ in ram} <= set(range(7))

    # The logged config is the resolved one (through the server's artifact proxy).
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "model"}
    config_text = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert yaml.safe_load(config_text) == redact(to_dict(cfg))
    # The final model: the consolidated weights of the last checkpoint, loadable strictly, at step 6.
    from safetensors.torch import load_file

    from crossdna.model import SSScanDNAHybridModel
    weights = Path(client.download_artifacts(run_id, "model/model.safetensors", str(tmp_path / "dl")))
    assert weights.read_bytes() == (run_dir / "model.safetensors").read_bytes()
    model = SSScanDNAHybridModel(cfg.model)
    model.load_state_dict(load_file(str(weights)), strict=True)
    assert model.step == 6

    # The credential from the environment authenticated the requests and reached nothing stored.
    assert SECRET not in repr((params, tags, config_text))


def test_server_killed_mid_run_training_completes_and_exits_0_with_a_warning(chr20_shards, tmp_path):
    from mlflow import MlflowClient

    total = 30
    server = MlflowServer(tmp_path / "doomed-server")
    try:
        server.wait_healthy()
        run_dir = tmp_path / "run"
        proc = launch(run_dir, chr20_shards, *tracked(server.uri, "e2e-doomed", f"trainer.steps={total}",
                                                     "trainer.eval_every=0", "tracking.close_timeout_s=2"))
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        stored: list[int] = []
        while len(stored) < 3:  # a few steps are in the store
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended or stalled before step 3"
            time.sleep(0.2)
            experiment = client.get_experiment_by_name("e2e-doomed")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            stored = logged_steps(client, runs[0].info.run_id, "train/ce") if runs else []
        server.kill()
        reached = max(steps(run_dir))
        t_kill = time.monotonic()
        rc, out = finish(proc)
        shutdown_s = time.monotonic() - t_kill
    finally:
        server.kill()

    assert reached < total, f"the job had finished ({reached} steps) before the server went down"
    assert rc == 0, out[-4000:]
    # The first send that failed (checkpoint tags or metrics) is reported; training went on buffering.
    assert re.search(r"WARNING crossdna\.tracking: tracker: .+ failed \(1 failed attempts so far\), buffering \d+ "
                     r"metric entries and retrying", out), out[-4000:]
    assert "giving up on" in out  # close() said what it could not send, then let the job end
    assert shutdown_s < 120, f"finishing with a dead server took {shutdown_s:.0f} s"
    # Both ranks trained to the end and published the final checkpoint.
    assert sorted(steps(run_dir)) == list(range(1, total + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{total:08d}"

    # What the server had accepted before it died is in its store; the run was never marked finished.
    store = MlflowClient(server.db_uri)
    run_ = only_run(store, "e2e-doomed")
    kept = logged_steps(store, run_.info.run_id, "train/ce")
    assert kept[:len(stored)] == stored == list(range(1, len(stored) + 1))
    assert kept == list(range(1, len(kept) + 1)) and len(kept) < total
    assert run_.info.status == "RUNNING"


def test_resumed_job_appends_to_the_same_run(mlflow_server, chr20_shards, tmp_path):
    from mlflow import MlflowClient

    run(tmp_path, chr20_shards, *tracked(mlflow_server.uri, "e2e-resume", "trainer.steps=6"))
    out = run(tmp_path, chr20_shards, *tracked(mlflow_server.uri, "e2e-resume", "trainer.steps=9"))
    assert "resumed from" in out and "at step 6" in out, out[-4000:]

    client = MlflowClient(mlflow_server.uri)
    run_ = only_run(client, "e2e-resume")  # the second job did not start a run of its own
    run_id = run_.info.run_id
    assert checkpointed_run_id(tmp_path, 6) == checkpointed_run_id(tmp_path, 9) == run_id
    assert run_.info.status == "FINISHED"
    for key in ("train/ce", "train/loss", "perf/tokens_per_s"):
        assert logged_steps(client, run_id, key) == list(range(1, 10)), key
    assert logged_steps(client, run_id, "eval/ce") == [3, 6, 9]

    # MLflow params are immutable: the first job's values stay, the change is recorded beside them.
    assert run_.data.params["trainer.steps"] == "6"
    assert run_.data.tags["resumes"] == "1"
    assert run_.data.tags["resume.1.changed_params"] == "trainer.steps"
    assert json.loads(run_.data.tags["checkpoint.latest"])["step"] == 9
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "config.resume-1.yaml", "model"}
    resumed = Path(client.download_artifacts(run_id, "config.resume-1.yaml", str(tmp_path / "dl"))).read_text()
    assert yaml.safe_load(resumed)["trainer"]["steps"] == 9
