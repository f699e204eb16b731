"""One background thread that hands metrics, tags and artifacts to MLflow, so the training loop never waits on it.

The training thread only appends to in-memory queues (microseconds, no host-device sync). The worker wakes every
``flush_interval_s``, turns queued points into ``MlflowClient.log_batch`` calls (1000 metrics per call, the REST
limit) and runs queued operations (tags, params, artifacts, run status) in order. A tracking server that is down
or slow costs warnings, not steps: failed sends are retried with capped exponential backoff while new points
keep arriving in a bounded queue that drops its oldest entries (counted and reported) once full. Nothing here
raises into the caller, except misuse (a metric name MLflow would reject, a non-scalar tensor), which is a bug
at the call site and fails at once rather than hours later on the worker.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger("crossdna.tracking")

_BATCH_METRICS = 1000  # MLflow's per-request limit for log_batch metrics
_WARN_EVERY_S = 60.0  # repeated trouble is summarised at most this often
_MAX_BACKOFF_S = 30.0

# MLflow error codes that a later retry can fix; any other MlflowException means the request itself is wrong.
_TRANSIENT_CODES = frozenset({
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "IO_ERROR", "SERVICE_UNDER_MAINTENANCE", "DEADLINE_EXCEEDED",
    "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "COULD_NOT_ACQUIRE_LOCK", "UNPARSEABLE_HTTP_ERROR",
})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request later can succeed (server down/slow/locked) or never will (bad request)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return not isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, ImportError, TypeError,
                                ValueError))


Snapshot = tuple[tuple[str, ...], torch.Tensor, Any]  # (keys, float32 vector, CUDA event or None)


def snapshot_tensors(values: Mapping[str, torch.Tensor]) -> Snapshot:
    """Freeze scalar tensors of one device on the caller's stream, without a host sync.

    The values are stacked into one float32 vector (one small kernel; the copy also protects against the
    caller reusing its tensors in place later) and, on a GPU, an event is recorded behind it. Nothing is
    copied to the host here: no pinned-memory allocation (``cudaHostAlloc`` synchronises the device) and no
    device-to-host copy happen on the training thread; :func:`read_snapshot` does both on the worker thread.
    """
    keys = tuple(values)
    flat = []
    for k in keys:
        t = values[k].detach()
        if t.numel() != 1:
            raise ValueError(f"metric {k!r}: expected a scalar tensor, got shape {tuple(t.shape)}")
        flat.append(t.reshape(()).to(torch.float32))
    devices = {t.device for t in flat}
    if len(devices) != 1:
        raise ValueError(f"metrics {list(keys)}: tensors on several devices {sorted(map(str, devices))}")
    with torch.no_grad():
        stacked = torch.stack(flat)
    ready = None
    if stacked.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return keys, stacked, ready


_copy_streams: dict[torch.device, Any] = {}


def read_snapshot(snapshot: Snapshot) -> dict[str, float]:
    """Values of a snapshot, read on the calling (worker) thread.

    The device-to-host copy runs on a side stream that waits only for the snapshot's event, so it neither
    queues behind the training kernels launched since nor stalls them; only this thread blocks on it.
    """
    keys, stacked, ready = snapshot
    if ready is None:
        return dict(zip(keys, stacked.tolist()))
    stream = _copy_streams.get(stacked.device)
    if stream is None:
        stream = _copy_streams.setdefault(stacked.device, torch.cuda.Stream(stacked.device))
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        return dict(zip(keys, stacked.tolist()))


@dataclass
class _Points:
    """Metric values of one ``put_metrics`` call; ``in_flight`` holds tensor snapshots, one per device."""

    step: int
    timestamp_ms: int
    values: dict[str, float]
    in_flight: list[Snapshot] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.values) + sum(len(keys) for keys, _, _ in self.in_flight)

    def resolve(self) -> dict[str, float]:
        for snapshot in self.in_flight:
            self.values.update(read_snapshot(snapshot))
        self.in_flight.clear()
        return self.values


class _RateLimitedWarning:
    """Warn on the first occurrence, then at most once per ``_WARN_EVERY_S`` with the running count."""

    def __init__(self) -> None:
        self.count = 0
        self._last = -math.inf

    def hit(self, message: Callable[[int], str], n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= _WARN_EVERY_S:
            self._last = now
            log.warning(message(self.count))


class MlflowSink:
    """Asynchronous, bounded, retrying writer for one MLflow run.

    ``put_metrics`` / ``submit`` are called from the training (or sampler) thread and only enqueue.
    ``close(timeout_s)`` stops intake, lets the worker flush until the deadline, and reports what was lost.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, name: str = "tracker", max_queue: int = 10_000,
                 flush_interval_s: float = 2.0) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        from mlflow import MlflowClient

        self.run_id = run_id
        self.name = name
        self._client = MlflowClient(tracking_uri)
        self._max_queue = max_queue
        self._interval = flush_interval_s
        self._lock = threading.Lock()
        self._points: collections.deque[_Points] = collections.deque()
        self._ops: collections.deque[tuple[str, Callable[[Any], Any]]] = collections.deque()
        self._pending: list[_Points] = []  # taken from the queue, not yet accepted by the server
        self._wake = threading.Event()
        self._closing = False
        self._abandon = False
        self._idle = threading.Event()
        self._dropped = _RateLimitedWarning()
        self._failures = _RateLimitedWarning()
        self._failing_since: float | None = None
        self.points_sent = 0
        self._checked_keys: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-{name}", daemon=True)
        self._thread.start()

    # -- producer side (training thread) -------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return self._dropped.count

    def queued(self) -> int:
        with self._lock:
            return len(self._points) + len(self._pending)

    def put_metrics(self, step: int, metrics: Mapping[str, float | torch.Tensor]) -> None:
        self._check_keys(metrics)
        values: dict[str, float] = {}
        by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, {})[k] = v
            else:
                values[k] = float(v)
        points = _Points(int(step), int(time.time() * 1000), values,
                         [snapshot_tensors(tensors) for tensors in by_device.values()])
        with self._lock:
            if self._closing:
                return
            if len(self._points) >= self._max_queue:
                self._points.popleft()
                self._dropped.hit(lambda n: f"{self.name}: tracking queue full ({self._max_queue} entries), "
                                            f"{n} oldest metric entries dropped so far; is the server reachable?")
            self._points.append(points)

    def submit(self, what: str, op: Callable[[Any], Any]) -> None:
        """Queue ``op(client)`` (tags, params, artifacts, status) to run in order on the worker thread."""
        with self._lock:
            if not self._closing:
                self._ops.append((what, op))
        self._wake.set()

    def _check_keys(self, metrics: Mapping[str, Any]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_metric_name

        for key in metrics:
            if key not in self._checked_keys:
                try:
                    _validate_metric_name(key)
                except MlflowException as e:
                    raise ValueError(f"metric name {key!r}: {e.message}") from None
                self._checked_keys.add(key)

    # -- worker ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(backoff or self._interval)
            self._wake.clear()
            with self._lock:
                closing, abandon = self._closing, self._abandon
            if abandon:
                return
            ok = self._send_ops() and self._send_points()
            if ok:
                if self._failing_since is not None:
                    log.warning("%s: tracking server reachable again after %.0f s; buffered metrics sent",
                                self.name, time.monotonic() - self._failing_since)
                    self._failing_since = None
                backoff = 0.0
                with self._lock:
                    empty = not (self._points or self._ops or self._pending)
                if closing and empty:
                    self._idle.set()
                    return
            else:
                backoff = min(max(2 * backoff, 0.5), _MAX_BACKOFF_S)

    def _attempt(self, what: str, fn: Callable[[], Any]) -> bool | None:
        """True: done. False: transient failure, retry later. None: permanent failure, dropped with a warning."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - the worker must survive anything the client or server does
            if not is_transient(e):
                log.warning("%s: %s rejected, dropped: %s", self.name, what, _one_line(e))
                return None
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            self._failures.hit(lambda n: f"{self.name}: {what} failed ({n} failed attempts so far), buffering "
                                         f"{self.queued()} metric entries and retrying: {_one_line(e)}")
            return False

    def _send_ops(self) -> bool:
        while True:
            with self._lock:
                if not self._ops:
                    return True
                what, op = self._ops[0]
            if self._attempt(what, lambda: op(self._client)) is False:
                return False
            with self._lock:
                self._ops.popleft()

    def _send_points(self) -> bool:
        from mlflow.entities import Metric

        while True:
            with self._lock:
                size = sum(p.size for p in self._pending)
                while self._points and size < _BATCH_METRICS:
                    self._pending.append(self._points.popleft())
                    size += self._pending[-1].size
                batch = list(self._pending)
            if not batch:
                return True
            metrics = [Metric(k, v, p.timestamp_ms, p.step) for p in batch for k, v in p.resolve().items()]
            for start in range(0, len(metrics), _BATCH_METRICS):
                chunk = metrics[start:start + _BATCH_METRICS]
                result = self._attempt("log_batch", lambda: self._client.log_batch(self.run_id, metrics=chunk))
                if result is False:
                    # Chunks already sent are resent on retry; MLflow keeps one row per (key, step, timestamp,
                    # value), so a resend does not duplicate points.
                    return False
            with self._lock:
                self._pending.clear()
            self.points_sent += len(metrics)

    # -- shutdown --------------------------------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far is sent (or ``timeout_s`` passes); True when all went out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            with self._lock:
                if not (self._points or self._ops or self._pending):
                    return True
            time.sleep(0.05)
        with self._lock:
            return not (self._points or self._ops or self._pending)

    def close(self, timeout_s: float) -> bool:
        """Stop intake and flush for at most ``timeout_s``; warn about anything left unsent. True if nothing was."""
        with self._lock:
            already = self._closing
            self._closing = True
        if already:
            return not self._thread.is_alive() or self._idle.is_set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._lock:
                self._abandon = True
                lost_points = sum(p.size for p in (*self._points, *self._pending))
                lost_ops = [what for what, _ in self._ops]
            self._wake.set()
            log.warning("%s: tracking store did not accept everything within %.0f s; giving up on %d metric "
                        "points and %d operations %s (training results are unaffected)",
                        self.name, timeout_s, lost_points, len(lost_ops), lost_ops[:5])
            return False
        if self.dropped:
            log.warning("%s: %d metric entries were dropped while the tracking queue was full", self.name,
                        self.dropped)
        return True


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
