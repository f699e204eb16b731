"""The README's main job (``make demo`` = ``crossdna demo``), end to end on the bundled chr20 slice, shortened."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_demo_shards_trains_tracks_and_exports(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "crossdna.cli", "demo", "--out", str(out), "trainer.steps=6",
                          "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["window_length"] == 1024 and set(manifest["splits"]) == {"train", "valid", "test"}
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000006"

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'run' / 'mlflow.db'}")
    run_id = run.stdout.split("MLflow run")[1].split()[0]
    ce = client.get_metric_history(run_id, "train/ce")
    assert [m.step for m in ce] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run_id, "eval/ce")] == [3, 6]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert (out / "report" / "loss.png").stat().st_size > 10_000
    assert (out / "run" / "model.safetensors").is_file()
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "model"}
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert "AutoModelForMaskedLM" in hf_config["auto_map"]
    assert "HF export logit parity with the checkpoint: max |diff| = 0.00e+00" in run.stderr


def test_demo_refuses_a_bad_override(tmp_path):
    run = subprocess.run([sys.executable, "-m", "crossdna.cli", "demo", "--out", str(tmp_path / "d"),
                          "trainer.stepz=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "unknown field(s) ['stepz']" in run.stderr and "demo.yaml" in run.stderr
    assert not (tmp_path / "d").exists()  # refused before any work
