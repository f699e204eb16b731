"""``crossdna doctor``: the real CLI on this (CPU) machine, plus the runner's contract with stand-in checks."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from crossdna.commands import doctor

GPU_CHECKS = ("driver", "cuda", "nccl", "nvml", "kernels")


@pytest.mark.slow
def test_doctor_on_cpu_skips_gpu_checks_and_is_healthy(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without CUDA")
    proc = subprocess.run([sys.executable, "-m", "crossdna.cli", "doctor", "--json",
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)  # nothing but the JSON on stdout
    checks = {c["name"]: c for c in report["checks"]}
    assert report["healthy"] is True
    assert list(checks) == [name for name, _ in doctor._checks(argparse.Namespace(tracking_uri=None))]
    for name in GPU_CHECKS:
        assert (checks[name]["status"], checks[name]["detail"]) == ("skipped", "no CUDA device"), checks[name]
    for name in ("python", "torch", "triton", "fla", "model", "deepspeed", "mlflow"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "loss" in checks["model"]["detail"] and "accelerator cpu" in checks["deepspeed"]["detail"]
    assert "local store, writable" in checks["mlflow"]["detail"]


def _fake_checks(monkeypatch, checks):
    monkeypatch.setattr(doctor, "_checks", lambda args: checks)


def _boom():
    raise ImportError("No module named 'fla'")


def _skip():
    raise doctor.Skip(doctor.NO_CUDA)


def test_one_line_per_check_failures_do_not_stop_the_others(monkeypatch, capsys):
    _fake_checks(monkeypatch, [("a", lambda: "fine"), ("fla", _boom), ("cuda", _skip), ("z", lambda: "also fine")])
    code = doctor.run(argparse.Namespace(json=False, tracking_uri=None))
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines == ["a          ok: fine",
                     "fla        FAIL: ImportError: No module named 'fla'",
                     "cuda       skipped: no CUDA device",
                     "z          ok: also fine"]


def test_skips_and_warnings_keep_exit_zero_and_json_has_every_check(monkeypatch, capsys):
    def warn():
        raise doctor.Warn("DeepSpeed chose cpu")

    _fake_checks(monkeypatch, [("cuda", _skip), ("deepspeed", warn), ("noisy", lambda: print("chatter") or "ok")])
    code = doctor.run(argparse.Namespace(json=True, tracking_uri=None))
    report = json.loads(capsys.readouterr().out)  # the library chatter did not reach stdout
    assert code == 0 and report["healthy"] is True
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("cuda", "skipped"), ("deepspeed", "warn"), ("noisy", "ok")]


def test_mlflow_check_probes_the_uri(tmp_path, port, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "each run logs to sqlite" in doctor.check_mlflow(None)
    assert "writable" in doctor.check_mlflow(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(RuntimeError, match="unreachable") as failure:
        doctor.check_mlflow(f"http://user:secret@127.0.0.1:{port}")
    assert "secret" not in str(failure.value)  # credentials never reach the report
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o500)
    if not os.access(readonly, os.W_OK):  # root ignores the mode
        with pytest.raises(RuntimeError, match="not writable"):
            doctor.check_mlflow(f"sqlite:///{readonly}/mlflow.db")
