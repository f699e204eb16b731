"""The job scripts of slurm/ on a real Slurm controller: the localhost cluster that .ci/run starts
(``../shared/ci/slurm-localhost.sh up``: slurmctld plus two emulated nodes, node1 and node2, on this host).

Each pretraining test runs the whole life of a preempted job on 2 nodes x 2 ranks (gloo on CPU): the tiny preset
trains, ``scancel --signal=USR1 --batch`` stands in for Slurm's ``--signal=B:USR1@T`` warning, the ranks agree on a
step, checkpoint and exit, the script requeues the job, and the requeued job resumes from that checkpoint and
finishes. The jobs are polled with ``scontrol`` rather than ``sbatch --wait``, whose poll interval grows to 32 s.

Without a reachable controller these tests skip, saying so; in CI (CI=true) that is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from mlflow_store import fresh_sqlite_store
from requires import unavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = "configs/pretrain/tiny.yaml"
STEPS = 8
MICRO_BATCH = 2
RANKS = 4
# Spaces, quotes and command substitutions: an override must reach the trainer verbatim through sbatch, the job
# script, srun and torchrun (it comes back as the MLflow run name), and nothing may execute it.
RUN_NAME = "it's $(touch pwned) `touch pwned` \"q\"  two  spaces"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[str, ...]
    gpus_per_node: int  # gres/gpu on every node (fake ones in CI); 0: ranks per node come from the environment


def _run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    if shutil.which("sinfo") is None:
        unavailable("no Slurm controller reachable: sinfo is not installed (../shared/ci/slurm-localhost.sh up)")
    try:
        proc = _run(["sinfo", "-h", "-N", "-o", "%N|%t|%G"])
    except subprocess.TimeoutExpired:
        unavailable("no Slurm controller reachable: sinfo timed out")
    if proc.returncode != 0:
        unavailable(f"no Slurm controller reachable: sinfo failed: {proc.stderr.strip()}")
    rows = [line.split("|") for line in sorted(set(proc.stdout.splitlines())) if line]
    up = [(name, gres) for name, state, gres in rows if state.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc")]
    if len(up) < 2:
        unavailable(f"these tests need 2 Slurm nodes up; sinfo shows {rows}")
    counts = [int(m.group(1)) if (m := re.search(r"gpu(?::[^:(,]+)?:(\d+)", gres)) else 0 for _, gres in up]
    return Cluster(tuple(name for name, _ in up), min(counts))


def job_info(job_id: str) -> dict[str, str]:
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    assert proc.returncode == 0, proc.stderr
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def hostnames(nodelist: str) -> list[str]:
    return _run(["scontrol", "show", "hostnames", nodelist]).stdout.split()


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def diagnose(tmp_path: Path) -> str:
    """The job output and every per-rank log, for the assertion message of a failed job."""
    parts = [f"===== {p.relative_to(tmp_path)}\n{_tail(p)}" for p in sorted(tmp_path.glob("job-*.out"))]
    parts += [f"===== {p.relative_to(tmp_path)}\n{_tail(p)}" for p in sorted((tmp_path / "logs").rglob("*"))
              if p.suffix in (".log", ".out") and p.stat().st_size]
    return "\n".join(parts)


class Job:
    """A job submitted from the repository (as users do), its files under ``tmp_path``; cancelled if a test
    leaves it running."""

    def __init__(self, cluster: Cluster, tmp_path: Path, script: str, args: list[str], sbatch: list[str] = ()):
        self.tmp_path = tmp_path
        env = {**os.environ, "CROSSDNA_PYTHON": sys.executable, "CROSSDNA_LOG_DIR": str(tmp_path / "logs")}
        options = ["--parsable", "--nodes=2", f"--output={tmp_path}/job-%j.out", "--time=15", *sbatch]
        if cluster.gpus_per_node >= 2:
            options.append("--gpus-per-node=2")  # ranks per node from the GPU allocation
        else:
            env["CROSSDNA_PROCS_PER_NODE"] = "2"
        proc = _run(["sbatch", *options, script, *args], cwd=REPO, env=env, timeout=60)
        assert proc.returncode == 0, f"sbatch {script}: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]

    def info(self) -> dict[str, str]:
        return job_info(self.id)

    def wait_until(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            state = self.info()["JobState"]
            assert state not in FINISHED, f"job {self.id} ended ({state}) before {what}\n{diagnose(self.tmp_path)}"
            assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s\n{diagnose(self.tmp_path)}"
            time.sleep(1)

    def wait_finished(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.info())["JobState"] not in FINISHED:
            assert time.monotonic() < deadline, f"job {self.id} still {info['JobState']} after {timeout:.0f} s\n" \
                                                f"{diagnose(self.tmp_path)}"
            time.sleep(1)
        return info

    def preempt(self) -> None:
        """What Slurm's ``--signal=B:USR1@T`` does before the time limit: USR1 to the batch shell only."""
        proc = _run(["scancel", "--signal=USR1", "--batch", self.id])
        assert proc.returncode == 0, proc.stderr

    def cancel(self) -> None:
        _run(["scancel", self.id])


@pytest.fixture
def jobs():
    submitted: list[Job] = []
    yield submitted
    for job in submitted:
        if job.info().get("JobState") not in FINISHED:
            job.cancel()


def train_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_preempted_pretraining(cluster, jobs, tmp_path, chr20_shards, script, sbatch=()) -> tuple[Job, dict, Path]:
    run_dir = tmp_path / "run"
    store = fresh_sqlite_store(tmp_path / "mlflow")
    job = Job(cluster, tmp_path, script, [
        TINY, f"data.path={chr20_shards}", f"trainer.run_dir={run_dir}", f"trainer.steps={STEPS}",
        f"trainer.micro_batch={MICRO_BATCH}", "trainer.eval_every=0", "trainer.ckpt_every=0",
        "tracking.enabled=true", f"tracking.uri={store}", f"tracking.run_name={RUN_NAME}",
        "tracking.telemetry_interval_s=0"], sbatch)
    jobs.append(job)
    # Training has begun once a step is logged; the ranks' USR1 handlers are installed by then.
    job.wait_until(lambda: any("train/loss" in r for r in train_steps(run_dir)), "training step", timeout=300)
    job.preempt()
    info = job.wait_finished(timeout=420)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{diagnose(tmp_path)}"
    return job, info, run_dir


def check_preempted_run(job: Job, info: dict, run_dir: Path, store_dir: Path, tmp_path: Path) -> dict:
    """What every preempted-and-requeued pretraining job must show; returns the final checkpoint's trainer.json."""
    out = (tmp_path / f"job-{job.id}.out").read_text()
    assert info["Restarts"] == "1", f"{info}\n{diagnose(tmp_path)}"
    assert f"requeueing job {job.id}" in out and "restart 1:" in out

    records = train_steps(run_dir)
    preempted = [r["step"] for r in records if r.get("event") == "preempted"]
    assert len(preempted) == 1 and 1 <= preempted[0] < STEPS, records
    # The requeued job resumed from the preemption checkpoint: every step ran exactly once.
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"step-{preempted[0]:08d}").is_dir()
    assert (checkpoints / "latest").read_text().strip() == f"step-{STEPS:08d}"
    final = json.loads((checkpoints / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert final["step"] == STEPS and final["world_size"] == RANKS
    assert final["loader"]["consumed"] == STEPS * MICRO_BATCH * RANKS

    # One MLflow run across both allocations (the checkpoint carries its id), named verbatim, finished.
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{store_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [(r.info.run_name, r.info.status) for r in runs] == [(RUN_NAME, "FINISHED")]
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert not (REPO / "pwned").exists() and not (tmp_path / "pwned").exists()
    return final


def test_pretrain_two_nodes_preempted_requeued_and_resumed(cluster, jobs, tmp_path, chr20_shards):
    job, info, run_dir = run_preempted_pretraining(cluster, jobs, tmp_path, chr20_shards, "slurm/pretrain.sh")
    final = check_preempted_run(job, info, run_dir, tmp_path / "mlflow", tmp_path)
    assert final["strategy"] == "ddp"
    # torchrun's per-rank logs, one directory per node named by Slurm's node index and name (the emulated
    # nodes share one hostname).
    nodes = hostnames(info["NodeList"])
    log_root = tmp_path / "logs" / f"crossdna-pretrain-{job.id}"
    assert sorted(p.name for p in log_root.iterdir()) == [f"node{i}-{name}" for i, name in enumerate(nodes)]
    assert len(list(log_root.rglob("stdout.log"))) == 2 * RANKS  # 2 local ranks x 2 nodes x 2 allocations


def test_pretrain_deepspeed_zero2_two_nodes_preempted_requeued_and_resumed(cluster, jobs, tmp_path, chr20_shards):
    job, info, run_dir = run_preempted_pretraining(cluster, jobs, tmp_path, chr20_shards,
                                                   "slurm/pretrain_deepspeed.sh", sbatch=["--cpus-per-task=2"])
    final = check_preempted_run(job, info, run_dir, tmp_path / "mlflow", tmp_path)
    assert final["strategy"] == "zero2"
    log_root = tmp_path / "logs" / f"crossdna-zero-{job.id}"
    assert sorted(p.name for p in log_root.iterdir()) == [f"node{r // 2}-rank{r}.log" for r in range(RANKS)]


def test_shard_array_and_merge_match_a_single_machine_build(cluster, tmp_path):
    """slurm/shard.sh: 2 extraction array tasks, then the merge job (afterok), on the demo config (three real chr20
    slices, so both parts have work). The manifest, every shard's sha256 included, must equal a one-machine build."""
    from crossdna.config import load
    from sharding.build import build_shards
    from sharding.config import ShardConfig

    config = "configs/shard/demo.yaml"
    local = build_shards(load(ShardConfig, REPO / config), tmp_path / "local", workers=1, progress=False)
    out = tmp_path / "shards"
    env = {**os.environ, "CROSSDNA": f"{sys.executable} -m crossdna.cli", "SHARD_CPUS": "1", "SHARD_MEM": "1G",
           "SHARD_TIME": "00:15:00", "SHARD_LOGS": str(tmp_path / "logs")}
    proc = _run(["bash", "slurm/shard.sh", config, str(out), "2"], cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = re.fullmatch(r"extract: array job (\d+) \(2 parts\); merge: job (\d+) .*\n",
                                      proc.stdout).groups()
    try:
        deadline = time.monotonic() + 300
        while (state := job_info(merge_id)["JobState"]) not in FINISHED:
            assert time.monotonic() < deadline, f"merge job {merge_id} still {state}\n{diagnose(tmp_path)}"
            time.sleep(1)
    finally:
        _run(["scancel", array_id, merge_id])
    assert state == "COMPLETED", diagnose(tmp_path)
    parts = _run(["scontrol", "show", "job", "-o", array_id]).stdout.splitlines()
    assert [re.search(r"JobState=(\S+)", p).group(1) for p in parts] == ["COMPLETED", "COMPLETED"], parts
    for i in range(2):
        log = (tmp_path / "logs" / f"crossdna-shard-extract-{array_id}_{i}.out").read_text()
        assert int(re.search(rf"part {i}/2: (\d+) tasks extracted", log).group(1)) >= 1, log
    assert json.loads((out / "manifest.json").read_text()) == json.loads(local.read_text())


def test_finetune_array_runs_one_task_per_array_element(cluster, tmp_path):
    """slurm/finetune.sh on a login node submits one array task per suite task (with the sbatch options given
    before the suite); each writes OUT/<task>/, and the overrides given at submission reach every task."""
    tasks = REPO / "tests" / "fixtures" / "tasks" / "gue_tf0"
    task = ("{{name: {name}, train: {d}/train.csv, val: {d}/dev.csv, test: {d}/test.csv, metric: mcc, "
            "max_length: 101, batch_size: 16, lr: 2.0e-3, epochs: 1}}")
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: slurm-tiny\nmodel_preset: tiny\nseeds: [0]\n"
                     "train: {evals_per_epoch: 1, eval_batch_size: 64, model_overrides: [d_model=16, depth=1, "
                     "comba.num_heads=1, attention.num_heads=1, block_size=128, use_ema_teacher=false]}\n"
                     f"tasks:\n  - {task.format(name='tf0', d=tasks)}\n  - {task.format(name='tf0 again', d=tasks)}\n")
    out = tmp_path / "out"
    (tmp_path / "logs").mkdir()
    proc = _run(["bash", "slurm/finetune.sh", "--cpus-per-task=1", "--time=15",
                 f"--output={tmp_path}/logs/finetune-%A_%a.out", str(suite), "scratch", str(out), "train.max_steps=2"],
                cwd=REPO, env={**os.environ, "CROSSDNA_PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    array_id = re.fullmatch(rf"array job (\d+): 2 tasks of {re.escape(str(suite))} -> .*\n", proc.stdout).group(1)
    try:
        deadline = time.monotonic() + 300
        while True:
            parts = _run(["scontrol", "show", "job", "-o", array_id]).stdout.splitlines()
            states = [re.search(r"JobState=(\S+)", p).group(1) for p in parts]
            if len(states) == 2 and set(states) <= FINISHED:
                break
            assert time.monotonic() < deadline, f"array {array_id}: {states}\n{diagnose(tmp_path)}"
            time.sleep(1)
    finally:
        _run(["scancel", array_id])
    assert states == ["COMPLETED", "COMPLETED"], diagnose(tmp_path)
    for name in ("tf0", "tf0 again"):
        result = json.loads((out / name / "results.json").read_text())
        assert [(t["task"], [run["steps"] for run in t["runs"]]) for t in result["tasks"]] == [(name, [2])]
