"""MLflow experiment tracking for distributed training: one run per job, created or resumed by rank 0.

Rank 0 creates the run (or resumes the one whose id the checkpoint recorded, so a requeued Slurm job continues
the same run) and broadcasts its id; other ranks never create runs, they only use the id for their node's
telemetry sampler. Everything after creation goes through :class:`~launcher.mlflow_sink.MlflowSink`, a
background thread, so logging never blocks a training step and a dead tracking server never stops training.

Store: ``tracking.uri`` from the config, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db``
with artifacts beside it (``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db`` reviews it).
Credentials (``MLFLOW_TRACKING_TOKEN`` / ``_USERNAME`` / ``_PASSWORD``) are read by MLflow from the environment;
nothing here logs the environment, URIs are logged without their user-info, and config fields whose names look
like secrets are redacted from both the params and the logged YAML.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import torch
import yaml

from launcher.mlflow_sink import MlflowSink, is_transient
from launcher.run_tags import environment_tags, gather_hostnames

log = logging.getLogger("crossdna.tracking")

REDACTED = "<redacted>"
_SECRET_WORDS = frozenset({"token", "password", "passwd", "pwd", "secret", "key", "apikey", "credential",
                           "credentials", "auth", "authorization", "cookie"})
_PARAM_VALUE_MAX = 6000  # MLflow's limit on one param value
_PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch
_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass
class TrackingConfig:
    """The ``tracking:`` section of a training config."""

    enabled: bool = True
    uri: str | None = None  # wins over MLFLOW_TRACKING_URI; None -> env, else sqlite under the run directory
    experiment: str = "crossdna-pretrain"
    run_name: str | None = None  # default: the run directory's name
    flush_interval_s: float = 2.0  # how often the background thread sends batched metrics
    max_queue: int = 10_000  # metric entries buffered while the server is unreachable; the oldest go first
    start_timeout_s: float = 60.0  # how long rank 0 retries creating the run before training goes on untracked
    close_timeout_s: float = 120.0  # how long the final flush (metrics, final model artifact) may take
    # How long a checkpoint waits for everything logged before it to reach the store, so that a crash after the
    # checkpoint loses none of the metrics the resumed run will not log again; 0 = no wait.
    checkpoint_flush_s: float = 10.0
    telemetry_interval_s: float = 10.0  # per-node GPU/host sampling period; 0 turns telemetry off

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ValueError("experiment: must be a non-empty name")
        for name in ("flush_interval_s", "start_timeout_s", "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.checkpoint_flush_s < 0:
            raise ValueError(f"checkpoint_flush_s: must be >= 0 (0 = no wait), got {self.checkpoint_flush_s}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {self.max_queue}")
        if self.telemetry_interval_s < 0:
            raise ValueError(f"telemetry_interval_s: must be >= 0 (0 = off), got {self.telemetry_interval_s}")


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """Config ``uri`` > ``MLFLOW_TRACKING_URI`` > a sqlite store inside the run directory."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def redact_uri(uri: str) -> str:
    """Drop ``user:password@`` from a URI before it is printed or logged."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def local_artifact_root(uri: str) -> Path | None:
    """For a sqlite store, the folder beside the database where its artifacts go (None for remote stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"


# Vocabulary tokens of a language model are settings, not credentials (data.mask_token: upstream|dedicated).
_VOCABULARY_TOKEN = re.compile(r"(^|[._-])(mask|pad|cls|sep|bos|eos|unk)[_-]token(s|[_-]ids?)?$")


def looks_secret(key: str) -> bool:
    key = key.lower()
    if _VOCABULARY_TOKEN.search(key):
        return False
    return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", key))


def redact(config: Any, path: str = "") -> Any:
    """A copy of a nested config with every value under a secret-looking key replaced by ``<redacted>``."""
    if isinstance(config, Mapping):
        return {k: REDACTED if looks_secret(f"{path}.{k}") else redact(v, f"{path}.{k}")
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v, path) for v in config]
    return config


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested (already redacted) config -> ``{"a.b.c": "value"}``; lists as JSON; values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(flatten_params(v, f"{key}."))
            continue
        text = json.dumps(v) if isinstance(v, (list, tuple, Mapping)) else str(v)
        flat[key] = text if len(text) <= _PARAM_VALUE_MAX else text[:_PARAM_VALUE_MAX - 3] + "..."
    return flat


def _share_from_rank0(obj: Any, world_size: int) -> Any:
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _retry_start(what: str, fn, timeout_s: float):
    """Call ``fn`` until it succeeds, a non-transient error occurs, or ``timeout_s`` passes (then re-raise)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised when not retryable
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("tracking: %s failed (%s); retrying in %.1f s", what, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


class Tracker:
    """Handle on the job's MLflow run. Only rank 0's tracker writes; every rank's knows ``run_id``."""

    def __init__(self, cfg: TrackingConfig, run_id: str | None, tracking_uri: str, sink: MlflowSink | None) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.last_step = 0  # the step of the latest log_metrics call on this rank (also on non-writing ranks)
        self._sink = sink
        self._telemetry: Any = None
        self._host_s = 0.0  # time this tracker spent on the caller's thread, reported as tracking/host_ms
        self._closed = False

    @property
    def writes(self) -> bool:
        """Whether this rank's calls reach MLflow (rank 0 with a live run)."""
        return self._sink is not None

    # -- creation --------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: TrackingConfig, run_dir: str | Path, *, rank: int, world_size: int,
               resume_run_id: str | None, config: Mapping[str, Any], tags: Mapping[str, str],
               local_rank: int | None = None) -> Tracker:
        """Collective over all ranks (call after ``init_process_group`` and ``cuda.set_device``).

        ``config`` is the resolved config as a nested dict (``crossdna.config.to_dict``); it is redacted, logged
        as flattened params and as ``config.yaml``. ``tags`` are the trainer's own (``config_hash``,
        ``data.manifest_hash``, ``strategy``); provenance tags (git, versions, Slurm, nodes, GPU) are added here.
        ``resume_run_id`` is the id stored in the checkpoint being resumed, or None for a fresh start.
        Never raises for tracking-store trouble: a run that cannot be created leaves training untracked.
        """
        uri = resolve_tracking_uri(cfg, run_dir)
        if not cfg.enabled:
            return cls(cfg, None, uri, None)
        _default_http_retries()
        hostnames = gather_hostnames()
        run_id = None
        if rank == 0:
            # Whatever goes wrong here, rank 0 must reach the broadcast below, or the other ranks hang in it.
            try:
                safe = redact(dict(config))
                all_tags = {**environment_tags(world_size, hostnames), **{k: str(v) for k, v in tags.items()},
                            "run_dir": str(Path(run_dir).resolve())}
                run_id = _retry_start("starting the MLflow run", lambda: _start_run(
                    cfg, uri, Path(run_dir), resume_run_id, safe, all_tags), cfg.start_timeout_s)
            except Exception as e:  # noqa: BLE001 - tracking trouble must not stop training
                log.warning("tracking: cannot start an MLflow run at %s (%s: %s); training continues untracked",
                            redact_uri(uri), type(e).__name__, " ".join(str(e).split())[:300])
        run_id = _share_from_rank0(run_id, world_size)
        sink = None
        if rank == 0 and run_id is not None:
            sink = MlflowSink(uri, run_id, name="tracker", max_queue=cfg.max_queue,
                              flush_interval_s=cfg.flush_interval_s)
            _queue_run_metadata(sink, run_id, safe, all_tags, resumed=resume_run_id == run_id)
            log.info("tracking: run %s in experiment %r at %s", run_id, cfg.experiment, redact_uri(uri))
        tracker = cls(cfg, run_id, uri, sink)
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if run_id is not None and local_rank == 0 and cfg.telemetry_interval_s > 0:
            from launcher.telemetry import Telemetry

            # System metrics carry the training step last logged on this rank, so the UI lines them up.
            tracker._telemetry = Telemetry(run_id, uri, node_id=socket.gethostname(),
                                           interval_s=cfg.telemetry_interval_s,
                                           step_fn=lambda: tracker.last_step).start()
        return tracker

    # -- logging (all non-blocking) --------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Queue metric values for ``step``. Tensors (CPU or CUDA scalars) are copied without a host sync."""
        self.last_step = int(step)
        if self._sink is None:
            return
        t0 = time.perf_counter()
        values = dict(metrics)
        values["tracking/host_ms"] = 1000.0 * self._host_s
        self._sink.put_metrics(step, values)
        self._host_s = time.perf_counter() - t0

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._sink is None:
            return
        from mlflow.entities import RunTag

        run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        self._sink.submit(f"tags {sorted(tags)}", lambda c: c.log_batch(self.run_id, tags=run_tags))

    def log_checkpoint(self, step: int, path: str | Path, manifest_hash: str) -> None:
        """Record a saved checkpoint by location (checkpoints stay on the shared file system, not in MLflow), and
        wait up to ``checkpoint_flush_s`` for everything logged so far to reach the store."""
        if self._sink is None:
            return
        where = str(path) if "://" in str(path) else str(Path(path).resolve())
        record = {"step": int(step), "path": where, "manifest_hash": manifest_hash}
        self.set_tags({"checkpoint.latest": json.dumps(record), f"checkpoint.step_{int(step):09d}": where})
        self._sink.put_metrics(step, {"checkpoint/step": float(step)})
        if self.cfg.checkpoint_flush_s and not self._sink.flush(self.cfg.checkpoint_flush_s):
            log.warning("tracking: the metrics up to checkpoint step %d are not all in the store after %.0f s "
                        "(tracking.checkpoint_flush_s); they are still queued, and lost if the job dies now",
                        step, self.cfg.checkpoint_flush_s)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory (e.g. the exported safetensors model) from the background thread."""
        if self._sink is None:
            return
        local = Path(path).resolve()
        if local.is_dir():
            self._sink.submit(f"artifacts {local}",
                              lambda c: c.log_artifacts(self.run_id, str(local), artifact_path))
        else:
            self._sink.submit(f"artifact {local}", lambda c: c.log_artifact(self.run_id, str(local), artifact_path))

    # -- shutdown --------------------------------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until everything queued so far reached the store (e.g. before a requeue)."""
        return self._sink is None or self._sink.flush(timeout_s)

    def close(self, status: str = "FINISHED") -> None:
        """Stop telemetry, flush (bounded by ``close_timeout_s``) and mark the run ``status``. Idempotent."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        if self._telemetry is not None:
            self._telemetry.stop(self.cfg.close_timeout_s)
        if self._sink is not None:
            self._sink.submit(f"run status {status}", lambda c: c.set_terminated(self.run_id, status))
            self._sink.close(self.cfg.close_timeout_s)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _default_http_retries() -> None:
    """MLflow's own HTTP retries (7, exponential, 120 s timeout) would hold a request for minutes; the sink
    retries on its own schedule, so each request should fail fast. Explicit user settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Large model uploads through a tracking server go in parts (off by default: mlflow#7564, #10332).
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = local_artifact_root(uri)
    try:
        return client.create_experiment(name, artifact_location=root.as_uri() if root else None)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it between our two calls
            raise
        return client.get_experiment_by_name(name).experiment_id


def _start_run(cfg: TrackingConfig, uri: str, run_dir: Path, resume_run_id: str | None,
               config: Mapping[str, Any], tags: dict[str, str]) -> str:
    """Create the run, or reopen ``resume_run_id``; returns the run id. ``tags`` gains resume bookkeeping."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("tracking: run %s from the checkpoint is not in %s; starting a new run", resume_run_id,
                        redact_uri(uri))
            tags["resumed_from_run_id"] = resume_run_id
        else:
            resumes = int(run.data.tags.get("resumes", "0")) + 1
            tags["resumes"] = str(resumes)
            changed = _changed_params(run.data.params, flatten_params(config))
            if changed:
                # MLflow params are immutable; the new values live in this resume's config file.
                log.warning("tracking: resumed with changed config values %s; see config.resume-%d.yaml",
                            changed[:10], resumes)
                tags[f"resume.{resumes}.changed_params"] = ",".join(changed)[:_PARAM_VALUE_MAX]
            client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
    run = client.create_run(_experiment_id(client, cfg.experiment, uri), run_name=cfg.run_name or run_dir.name,
                            tags=tags)
    return run.info.run_id


def _changed_params(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    return sorted(k for k, v in new.items() if k in old and old[k] != v)


def _queue_run_metadata(sink: MlflowSink, run_id: str, config: Mapping[str, Any], tags: Mapping[str, str],
                        resumed: bool) -> None:
    """Params, tags and config.yaml go through the sink like everything else: rank 0 does not wait for them."""
    from mlflow.entities import Param, RunTag

    yaml_text = yaml.safe_dump(config, sort_keys=False)
    run_tags = [RunTag(k, v) for k, v in tags.items()]
    if resumed:
        resumes = tags["resumes"]
        # A resume may only add params: re-sending an existing key with another value is refused by MLflow.
        def log_new_params(client: Any) -> None:
            known = client.get_run(run_id).data.params
            fresh = [Param(k, v) for k, v in flatten_params(config).items() if k not in known]
            for i in range(0, len(fresh), _PARAMS_PER_BATCH):
                client.log_batch(run_id, params=fresh[i:i + _PARAMS_PER_BATCH])

        sink.submit("resume tags", lambda c: c.log_batch(run_id, tags=run_tags))
        sink.submit("new params", log_new_params)
        sink.submit("config.yaml", lambda c: c.log_text(run_id, yaml_text, f"config.resume-{resumes}.yaml"))
        return
    params = [Param(k, v) for k, v in flatten_params(config).items()]
    for i in range(0, len(params), _PARAMS_PER_BATCH):
        chunk = params[i:i + _PARAMS_PER_BATCH]
        sink.submit(f"params {i}-{i + len(chunk)}", lambda c, chunk=chunk: c.log_batch(run_id, params=chunk))
    sink.submit("config.yaml", lambda c: c.log_text(run_id, yaml_text, "config.yaml"))
