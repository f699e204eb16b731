"""The slurm/ job scripts without a Slurm controller: shellcheck, argument checks, and the preemption logic of
slurm/common.sh with ``scontrol`` replaced by a recorder. tests/test_slurm.py runs them on a real controller."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from requires import tool

SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sh")) + [".ci/run"]
# Nothing from a surrounding Slurm job (a developer may run the tests inside one) leaks into these checks.
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CROSSDNA_", "CUDA_VISIBLE"))}


def test_shellcheck_clean():
    shellcheck = tool("shellcheck")
    proc = subprocess.run([shellcheck, "--external-sources", *SCRIPTS], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _bash(script: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env={**BASE_ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("env, expected", [
    ({}, "1"),                                                 # CPU, nothing allocated
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),                   # GPUs without gres accounting
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0"}, "8"),  # Slurm's allocation wins
    ({"CROSSDNA_PROCS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}, "2"),  # an explicit count wins
])
def test_ranks_per_node(env, expected):
    proc = _bash("source slurm/common.sh && crossdna_procs_per_node", env)
    assert (proc.returncode, proc.stdout.strip()) == (0, expected), proc.stderr


def test_job_environment_drops_rank_variables_inherited_from_the_submitter():
    # sbatch exports the submitting shell's environment; a RANK from it would give every srun task rank 0.
    proc = _bash("source slurm/common.sh && crossdna_export_env && echo \"${RANK-unset} ${WORLD_SIZE-unset} "
                 "${MASTER_PORT-unset} $PYTHONUNBUFFERED\"", {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500"})
    assert (proc.returncode, proc.stdout.strip()) == (0, "unset unset unset 1"), proc.stderr


@pytest.mark.parametrize("bad", ["0", "two", "-1", "08", "2 3"])
def test_ranks_per_node_rejects_non_counts(bad):
    proc = _bash("CROSSDNA_SCRIPT=x.sh; source slurm/common.sh && crossdna_procs_per_node",
                 {"CROSSDNA_PROCS_PER_NODE": bad})
    assert proc.returncode == 2 and proc.stderr.startswith("x.sh: error: ranks per node"), proc


@pytest.mark.parametrize("script", ["slurm/pretrain.sh", "slurm/pretrain_deepspeed.sh"])
def test_job_scripts_refuse_bad_invocations_with_one_line(script, tmp_path):
    name = Path(script).name
    cases = [([], "usage: sbatch"),
             (["configs/pretrain/nope.yaml"], "config 'configs/pretrain/nope.yaml' not found"),
             (["configs/pretrain/tiny.yaml"], "not inside a Slurm job")]
    for args, message in cases:
        proc = subprocess.run(["bash", script, *args], cwd=REPO, env=BASE_ENV, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(f"{name}: error: ") and message in proc.stderr, proc
        assert len(proc.stderr.splitlines()) == 1
    elsewhere = subprocess.run(["bash", str(REPO / script), "configs/pretrain/tiny.yaml"], cwd=tmp_path,
                               env=BASE_ENV, capture_output=True, text=True, timeout=60)
    assert elsewhere.returncode == 2 and "submit it from the crossdna repository" in elsewhere.stderr


def test_deepspeed_script_refuses_a_non_zero_strategy():
    proc = subprocess.run(["bash", "slurm/pretrain_deepspeed.sh", "configs/pretrain/tiny.yaml", "trainer.strategy=ddp"],
                          cwd=REPO, env={**BASE_ENV, "SLURM_JOB_ID": "1"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "'trainer.strategy=ddp'" in proc.stderr and "slurm/pretrain.sh" in proc.stderr


# ---------------------------------------------------------------------------------------- preemption logic
@pytest.fixture
def recorded_scontrol(tmp_path) -> tuple[dict[str, str], Path]:
    """PATH with an ``scontrol`` that appends its arguments to a file instead of talking to a controller."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{record}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "CROSSDNA_SCRIPT": "t.sh"}, record


@pytest.mark.parametrize("step_status, requeued", [
    (0, False),   # finished: the job ends
    (75, True),   # the trainer checkpointed on a signal it got directly (e.g. SIGTERM): requeue
    (3, False),   # non-finite loss: a requeue would only repeat it
    (1, False),   # a crash without a preemption request is a failure
])
def test_run_step_requeues_only_a_preemption_exit(recorded_scontrol, step_status, requeued):
    env, record = recorded_scontrol
    proc = _bash(f'source slurm/common.sh; crossdna_run_step bash -c "exit {step_status}"; echo "returned $?"', env)
    calls = record.read_text() if record.exists() else ""
    if requeued:  # the batch shell ends right after the requeue
        assert (proc.returncode, proc.stdout, calls) == (0, "", "requeue 42\n")
    else:
        assert (proc.stdout, calls) == (f"returned {step_status}\n", "")


def test_usr1_to_the_batch_shell_reaches_the_step_and_requeues(recorded_scontrol, tmp_path):
    """The torchrun case: the step exits 1 (torchrun reports any failed worker so) after the warning."""
    env, record = recorded_scontrol
    ready, got = tmp_path / "ready", tmp_path / "step-got-usr1"
    step = f'trap "touch {got}; exit 1" USR1; touch {ready}; while :; do sleep 0.05; done'
    batch = subprocess.Popen(["bash", "-c", 'source slurm/common.sh && crossdna_run_step bash -c "$0"', step],
                             cwd=REPO, env={**BASE_ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and batch.poll() is None, batch.communicate()
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)
        out, err = batch.communicate(timeout=30)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, err
    assert got.exists()
    assert record.read_text() == "requeue 42\n"
    assert "USR1: asking the ranks to checkpoint" in err and "requeueing job 42" in err
