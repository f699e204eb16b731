"""MLflow layout of a benchmark: one parent run for the suite, one child run per task.

Finetuning logs a handful of points per evaluation, so it talks to MLflow synchronously through ``MlflowClient``
(no background sink needed). The store is resolved as for pretraining (``launcher.tracking``): an explicit URI,
else ``MLFLOW_TRACKING_URI``, else a sqlite store inside the output directory. Seeds of a task log into the task's
child run under ``seed<k>/`` prefixes, and the child run also gets the mean and std over seeds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from launcher.tracking import TrackingConfig, flatten_params, local_artifact_root, redact, resolve_tracking_uri


class _Run:
    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's per-request metric limit
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten_params(redact(dict(params))).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class BenchmarkTracker:
    """Parent run for a suite; ``child(task)`` opens the task's run under it. ``enabled=False`` makes all no-ops."""

    def __init__(self, out_dir: str | Path, experiment: str, run_name: str, uri: str | None = None,
                 enabled: bool = True, tags: Mapping[str, str] | None = None):
        self.enabled = enabled
        self.uri = resolve_tracking_uri(TrackingConfig(uri=uri, experiment=experiment), out_dir) if enabled else None
        self.parent: _Run | None = None
        if not enabled:
            return
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            root = local_artifact_root(self.uri)
            exp_id = client.create_experiment(experiment, artifact_location=root.as_uri() if root else None)
        else:
            exp_id = exp.experiment_id
        self._client, self._exp_id = client, exp_id
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        self.parent = _Run(client, run.info.run_id)

    def child(self, name: str, tags: Mapping[str, str] | None = None) -> _Run | None:
        if not self.enabled:
            return None
        run = self._client.create_run(self._exp_id, run_name=name,
                                      tags={"mlflow.parentRunId": self.parent.run_id, **(tags or {})})
        return _Run(self._client, run.info.run_id)
