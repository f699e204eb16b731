"""End to end: real 2-rank ``torchrun`` runs (gloo, CPU) of ``python -m launcher.train`` on the chr20 shards.

One uninterrupted DDP run (20 steps, checkpoints at 10 and 20) is the reference.

- ddp, fsdp: SIGKILL right after step 10 (its checkpoint written), resume; steps 11-20 must match the reference:
  bitwise for DDP (same reductions in the same order; RNG, optimizer, EMA and data position restored), rtol 1e-4
  for FSDP, whose per-parameter reduce-scatters sum in another order than DDP's bucketed all-reduce.
- zero1/2/3: 20 steps, MLM loss falls, steps 1-10 within rtol 1e-4 of DDP (other reduction orders; after the
  gate unfreezes the runs part by design, see test_zero_trains_and_resumes). ZeRO-1/3 resumed from step 10 must
  match their own uninterrupted run bitwise; ZeRO-2 runs under DeepSpeed's own launcher.
- resume on another world size, SIGUSR1 -> checkpoint + requeue code, NaN -> clean stop, corrupt file -> error,
  MLflow run continuity.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
TERMS = ("train/loss", "train/ce", "train/sem", "train/gate", "train/acc", "train/index_sum", "train/index_sq_sum")
TIMEOUT_S = 420


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def launch(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, launcher: str = "torchrun"
           ) -> subprocess.Popen:
    args = [f"--config={TINY}", f"data.path={shards}", f"trainer.run_dir={run_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "launcher.train", *args]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).with_name("deepspeed")), f"--num_gpus={nproc}", f"--master_port={free_port()}",
               "--module", "launcher.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "launcher.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: kill the whole tree, or they keep the pipe open.
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish in {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def run(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, expect: int | None = 0,
        launcher: str = "torchrun") -> str:
    rc, out = finish(launch(run_dir, shards, *overrides, nproc=nproc, launcher=launcher))
    if expect is not None:
        assert rc == expect, out[-6000:]
    return out


def steps(run_dir: Path) -> dict[int, dict]:
    """Last logged record of each training step (a resumed run re-logs the steps after its checkpoint)."""
    records = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            records[rec["step"]] = rec
    return records


def assert_loss_falls(records: dict[int, dict]) -> None:
    ce = [records[s]["train/ce"] for s in range(1, 21)]
    first, last = sum(ce[:5]) / 5, sum(ce[-5:]) / 5
    assert last < first - 0.1, ce


@pytest.fixture(scope="module")
def reference(chr20_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    run(run_dir, chr20_shards)
    return run_dir


def resume_from_step_10(run_dir: Path, into: Path, shards: Path, *overrides: str, nproc: int = 2) -> str:
    """Copy a finished run, point ``latest`` back at its step-10 checkpoint and run it to the end again."""
    shutil.copytree(run_dir, into)
    (into / "checkpoints" / "latest").write_text("step-00000010\n")
    shutil.rmtree(into / "checkpoints" / "step-00000020")
    return run(into, shards, *overrides, nproc=nproc)


def evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if "eval/ce" in line]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("perf/tokens_per_s", "perf/eta_s", "perf/data_wait_s")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_at_step_10_then_resume_matches_the_uninterrupted_run(strategy, reference, chr20_shards, tmp_path):
    ref = steps(reference)
    assert_loss_falls(ref)
    # Both halves save asynchronously (DCP async_save); the reference saved synchronously.
    opts = (f"trainer.strategy={strategy}", "trainer.async_checkpoint=true")
    killed = run(tmp_path, chr20_shards, *opts, "fault.kill_after_step=10", expect=None)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000010", killed[-3000:]
    assert max(steps(tmp_path)) == 10
    out = run(tmp_path, chr20_shards, *opts)
    assert "resumed from" in out and "at step 10" in out
    resumed = steps(tmp_path)
    assert sorted(resumed) == list(range(1, 21))
    assert_loss_falls(resumed)
    for s in range(1, 21):
        assert resumed[s]["train/index_sum"] == ref[s]["train/index_sum"]  # same samples, same order
        if strategy == "ddp":
            assert without_timing(resumed[s]) == without_timing(ref[s]), s  # bitwise
        else:
            for key in TERMS:
                assert resumed[s][key] == pytest.approx(ref[s][key], rel=1e-4, abs=1e-6), (s, key)
    # Evaluation at steps 10 and 20 with fixed masks; perplexity is exp(CE), not exp(total) (defect 14).
    e = evals(tmp_path)
    assert [r["step"] for r in e] == [10, 20]
    assert all(r["eval/ppl"] == pytest.approx(math.exp(r["eval/ce"])) for r in e)
    assert e[-1]["eval/ce"] < e[0]["eval/ce"] + 0.05


def test_async_checkpoint_is_published_without_waiting_for_the_next_save(chr20_shards, tmp_path):
    """An async checkpoint is published once every rank's write is done (checked in the step's all-reduce), not at
    the next save: killed at step 14, the run has step 10 to resume from, not step 5 (what it had when publishing
    waited for the next save). Four steps are ample for writing the tiny model's few MB."""
    out = run(tmp_path, chr20_shards, "trainer.async_checkpoint=true", "trainer.ckpt_every=5", "trainer.eval_every=0",
              "fault.kill_after_step=14", expect=None)
    assert max(steps(tmp_path)) == 14, out[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000010", out[-3000:]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_trains_and_resumes(strategy, reference, chr20_shards, tmp_path):
    # ZeRO-2 goes through DeepSpeed's own launcher (`deepspeed --module`), the others through torchrun.
    run(tmp_path / "full", chr20_shards, f"trainer.strategy={strategy}",
        launcher="deepspeed" if strategy == "zero2" else "torchrun")
    full, ref = steps(tmp_path / "full"), steps(reference)
    assert_loss_falls(full)
    # Steps 1-10 compute what DDP computes (fp32, gate frozen); afterwards DeepSpeed has applied AdamW's
    # decoupled weight decay to the frozen gate (zero gradients in its flat partitions, where DDP's AdamW
    # skips a parameter without gradient), so the runs part ways by design.
    for s in range(1, 11):
        for key in TERMS:
            assert full[s][key] == pytest.approx(ref[s][key], rel=1e-4, abs=1e-6), (s, key)
    if strategy == "zero2":
        return  # the resume path of ZeRO-1 and ZeRO-2 is the same DeepSpeed code (stage_1_and_2.py)
    if strategy == "zero1":  # another world size is refused with the way out (docs/training.md)
        out = run(tmp_path / "full", chr20_shards, f"trainer.strategy={strategy}", "trainer.steps=21", nproc=1,
                  expect=2)
        assert "a ZeRO checkpoint written by 2 ranks cannot be resumed on 1" in out, out[-3000:]
        # The supported way to another world size: consolidate, then start from those weights (fresh optimizer).
        weights = tmp_path / "zero1-step20.safetensors"
        export = subprocess.run([sys.executable, "-m", "crossdna.cli", "export-weights", str(tmp_path / "full"),
                                 str(weights)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert export.returncode == 0, export.stderr[-3000:]
        # One rank with grad_accum=2 keeps the global batch of 8, so step 1 sees the same samples as the 2-rank run.
        run(tmp_path / "from-weights", chr20_shards, f"trainer.init_weights={weights}", "trainer.steps=1",
            "trainer.grad_accum=2", "trainer.eval_every=0", nproc=1)
        first = steps(tmp_path / "from-weights")[1]
        assert first["train/index_sum"] == full[1]["train/index_sum"]
        assert first["train/ce"] < full[1]["train/ce"] - 0.1  # trained weights on the very batch of step 1
    resume_from_step_10(tmp_path / "full", tmp_path / "resumed", chr20_shards, f"trainer.strategy={strategy}")
    resumed = steps(tmp_path / "resumed")
    for s in range(11, 21):
        assert without_timing(resumed[s]) == without_timing(full[s]), s
    # Consolidation: one strict state dict (student, fp32 EMA teacher, buffers) from the partitioned files.
    out = tmp_path / "w.safetensors"
    export = subprocess.run([sys.executable, "-m", "crossdna.cli", "export-weights", str(tmp_path / "resumed"),
                             str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert export.returncode == 0, export.stderr[-3000:]
    _check_export(out, tmp_path / "resumed" / "checkpoints" / "step-00000020")


def _check_export(weights: Path, ckpt: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
    state = load_file(str(weights))
    model = SSScanDNAHybridModel(CrossDNAConfig.preset("tiny"))
    model.load_state_dict(state, strict=True)
    assert model.step == int(ckpt.name.removeprefix("step-")) == int(state["g_step"])  # completed optimizer steps
    ema = {}
    for f in sorted((ckpt / "ema").glob("rank-*.safetensors")):
        for k, v in load_file(str(f)).items():
            ema.setdefault(k, []).append(v)
    for name, pieces in ema.items():
        assert torch.equal(torch.cat(pieces)[: state[name].numel()].view_as(state[name]), state[name]), name
    teacher, student = state["branchA_core_ema.layers.0.gate.weight"], state["branchA_core.layers.0.gate.weight"]
    assert not torch.equal(teacher, student)  # the teacher lags the student ...
    assert (teacher - student).abs().max() < 0.05  # ... by 20 EMA steps of decay 0.999
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 5, (2, 64)))).all()


def test_two_rank_checkpoint_resumes_on_one_rank_in_the_same_sample_order(reference, chr20_shards, tmp_path):
    run_dir = tmp_path / "run"
    # Same global batch (2 ranks x 4 = 1 rank x 4 x 2 accumulation steps).
    out = resume_from_step_10(reference, run_dir, chr20_shards, "trainer.grad_accum=2", nproc=1)
    assert "resuming a 2-rank checkpoint on 1 ranks" in out
    ref, resumed = steps(reference), steps(run_dir)
    for s in range(11, 21):
        assert resumed[s]["train/index_sum"] == ref[s]["train/index_sum"]
        assert resumed[s]["train/index_sq_sum"] == ref[s]["train/index_sq_sum"]
    # The losses are not comparable step by step: rank 1's dropout stream has no rank to continue it on (its
    # 4 samples now draw from rank 0's stream) and the averages are over micro-batches instead of ranks. The
    # model must still end where the 2-rank run ended.
    assert evals(run_dir)[-1]["eval/ce"] == pytest.approx(evals(reference)[-1]["eval/ce"], abs=0.05)


def test_tracking_continues_the_same_mlflow_run_after_resume(chr20_shards, tmp_path):
    from mlflow.tracking import MlflowClient
    # A flush interval longer than the killed run: the metrics up to its step-3 checkpoint reach the store only
    # because the checkpoint waits for them (tracking.checkpoint_flush_s); the resumed run starts at step 4.
    tracking = ["tracking.enabled=true", "tracking.flush_interval_s=30", "tracking.telemetry_interval_s=0",
                "trainer.steps=6", "trainer.ckpt_every=3", "trainer.eval_every=3"]
    run(tmp_path, chr20_shards, *tracking, "fault.kill_after_step=3", expect=None)
    first = json.loads((tmp_path / "checkpoints" / "step-00000003" / "trainer.json").read_text())["tracking_run_id"]
    assert first
    run(tmp_path, chr20_shards, *tracking)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [first]
    assert runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first, "train/ce")) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(first, "eval/ppl")) == [3, 6]


def _worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "launcher.train" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"no worker with RANK={rank}")


def test_sigusr1_on_one_rank_checkpoints_and_exits_for_requeue(chr20_shards, tmp_path):
    proc = launch(tmp_path, chr20_shards, "trainer.steps=10000", "trainer.ckpt_every=0", "trainer.eval_every=0")
    log = tmp_path / "train_log.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled before step 3"
        time.sleep(0.2)
    _worker(proc, 1).send_signal(signal.SIGUSR1)  # Slurm signals every task; the slowest to hear is what counts
    rc, out = finish(proc)
    assert "exitcode  : 75" in out, out[-4000:]  # torchrun reports the workers' requeue code
    records = steps(tmp_path)
    last = max(records)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step-{last:08d}"
    assert 3 <= last < 10000
    assert any('"event": "preempted"' in line for line in log.read_text().splitlines())


@pytest.mark.parametrize("async_save", [False, True])
def test_nonfinite_loss_stops_naming_rank_step_and_term(async_save, chr20_shards, tmp_path):
    """The checkpoint the message names as the last good one is published, also when its write was asynchronous
    (still pending, or done but not yet published, when the step after it went non-finite)."""
    out = run(tmp_path, chr20_shards, "trainer.ckpt_every=2", "trainer.eval_every=0", "fault.nonfinite_step=3",
              "fault.nonfinite_rank=1", "fault.nonfinite_term=sem", f"trainer.async_checkpoint={async_save}",
              expect=None)
    assert "non-finite loss at step 3: rank 1: sem" in out, out[-4000:]
    assert "last good checkpoint:" in out and "step-00000002" in out
    # The first rank out exits with 3 (torchrun then stops the other, which by then has closed the run). A rank
    # used to abort instead, in about one run in twelve ("terminate called without an active exception"): a gloo
    # worker thread freeing the culprits' all-gather needed the GIL during interpreter finalization (gdb;
    # pytorch/pytorch#190489). Ranks now leave through launcher.train.exit_without_finalizing.
    assert "exitcode  : 3" in out, out[-6000:]
    assert "SIGABRT" not in out and "terminate called" not in out, out[-6000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000002", out[-3000:]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert max(steps(tmp_path)) == 2


def test_corrupt_checkpoint_is_a_clear_error(reference, chr20_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard = next((run_dir / "checkpoints" / "step-00000020" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated by a full disk
    out = run(run_dir, chr20_shards, "trainer.steps=30", nproc=1, expect=2)
    assert "launcher.train: error:" in out and "corrupt (size or sha256 differs" in out, out[-3000:]
