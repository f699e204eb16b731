"""Per-node system telemetry (NVML GPU counters + host CPU/RAM) logged into the job's MLflow run.

One sampler per node (local_rank 0) joins the run by id and logs ``sys/<node>/gpu<i>/<field>`` and
``sys/<node>/<host field>`` from its own thread. Compared with MLflow's built-in system metrics (memory,
utilisation and power only) it adds temperature, SM clock, clock-throttle reasons and uncorrected ECC errors:
the counters that explain a slow or failing GPU. Without an NVIDIA driver the GPU part turns itself off with
one info line and host sampling goes on.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Callable

import psutil

from launcher.mlflow_sink import MlflowSink

log = logging.getLogger("crossdna.telemetry")

_GIB = 1024 ** 3
_MIB = 1024 ** 2


def metric_safe(name: str) -> str:
    """A hostname as an MLflow metric-key component (letters, digits, ``_ - .`` only)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "node"


class NvmlGpus:
    """The GPUs this process's node can see, read through NVML. ``available`` is False without a driver."""

    # NVML throttle-reason bits that mean the GPU runs slower than it could; "GPU idle" and the application-
    # clock setting are normal states, not throttling.
    _REASONS = {
        "power_cap": "nvmlClocksThrottleReasonSwPowerCap",
        "hw_slowdown": "nvmlClocksThrottleReasonHwSlowdown",
        "sw_thermal": "nvmlClocksThrottleReasonSwThermalSlowdown",
        "hw_thermal": "nvmlClocksThrottleReasonHwThermalSlowdown",
        "hw_power_brake": "nvmlClocksThrottleReasonHwPowerBrakeSlowdown",
    }

    def __init__(self) -> None:
        self.available = False
        self.handles: list[tuple[int, Any]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = self._visible_handles()
        except (ImportError, OSError) as e:
            log.info("telemetry: GPU counters off (nvidia-ml-py unavailable: %s); sampling host CPU/RAM only", e)
            return
        except Exception as e:  # pynvml.NVMLError and its subclasses (no driver, no library, no permission)
            log.info("telemetry: GPU counters off (NVML: %s); sampling host CPU/RAM only", e)
            return
        self.available = bool(self.handles)
        if not self.available:
            log.info("telemetry: GPU counters off (NVML sees no GPU); sampling host CPU/RAM only")

    def _visible_handles(self) -> list[tuple[int, Any]]:
        """(CUDA index, handle) for the devices CUDA_VISIBLE_DEVICES exposes, so gpu<i> matches cuda:<i>."""
        nvml = self._nvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for i, ident in enumerate(v.strip() for v in visible.split(",") if v.strip()):
            if ident.isdigit():
                handles.append((i, nvml.nvmlDeviceGetHandleByIndex(int(ident))))
            else:
                handles.append((i, nvml.nvmlDeviceGetHandleByUUID(ident)))
        return handles

    def _field(self, read: Callable[[], float]) -> float | None:
        try:
            return float(read())
        except self._nvml.NVMLError:  # e.g. NotSupported on MIG slices or consumer boards: skip that field
            return None

    def sample(self) -> dict[str, float]:
        if not self.available:
            return {}
        nvml = self._nvml
        out: dict[str, float] = {}
        for i, h in self.handles:
            fields = {
                "util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
                "mem_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(h).memory,
                "mem_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / _GIB,
                "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temp_c": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                "ecc_uncorrected": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                    h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
                "throttle_reasons": lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(h),
            }
            for name, read in fields.items():
                value = self._field(read)
                if value is not None:
                    out[f"gpu{i}/{name}"] = value
            reasons = out.get(f"gpu{i}/throttle_reasons")
            if reasons is not None:
                for name, bit in self._REASONS.items():
                    out[f"gpu{i}/throttle/{name}"] = float(bool(int(reasons) & getattr(nvml, bit)))
        return out

    def close(self) -> None:
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass


def sample_host() -> dict[str, float]:
    mem = psutil.virtual_memory()
    load1, _, _ = os.getloadavg()
    return {
        "cpu_pct": psutil.cpu_percent(interval=None),  # since the previous call: the sampling interval
        "load1": load1,
        "ram_used_gib": (mem.total - mem.available) / _GIB,
        "ram_pct": mem.percent,
    }


class Telemetry:
    """Background sampler for one node. ``step_fn`` (optional) returns the current training step, so system
    metrics line up with training metrics in the MLflow UI; without it the sample index is the step."""

    def __init__(self, run_id: str, tracking_uri: str, node_id: str, interval_s: float = 10.0,
                 step_fn: Callable[[], int] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.run_id = run_id
        self.prefix = f"sys/{metric_safe(node_id)}/"
        self.interval_s = interval_s
        self._tracking_uri = tracking_uri
        self._step_fn = step_fn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink: MlflowSink | None = None
        self.gpus: NvmlGpus | None = None
        self.samples = 0

    def sample(self) -> dict[str, float]:
        """One reading of every counter, keys prefixed with ``sys/<node>/`` (CPU % since this thread's last call)."""
        values = {**sample_host(), **(self.gpus.sample() if self.gpus else {})}
        return {self.prefix + k: v for k, v in values.items()}

    def start(self) -> Telemetry:
        self.gpus = NvmlGpus()
        # The sink flushes once per sample period; metrics queue up to ~a day of samples if the server is away.
        self._sink = MlflowSink(self._tracking_uri, self.run_id, name=f"telemetry {self.prefix[4:-1]}",
                                max_queue=10_000, flush_interval_s=max(self.interval_s, 1.0))
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # psutil keeps the CPU-time baseline per thread, so the priming call must happen on this thread.
        psutil.cpu_percent(interval=None)
        while True:
            stopping = self._stop.wait(self.interval_s)
            try:
                step = self._step_fn() if self._step_fn else self.samples
                self._sink.put_metrics(step, self.sample())
                self.samples += 1
            except Exception as e:  # noqa: BLE001 - a failing counter must not end the sampler (or training)
                log.warning("telemetry: sample failed: %s: %s", type(e).__name__, e)
            if stopping:  # one last sample covers the tail of the run
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self._thread = None
        self._sink.close(timeout_s)
        self.gpus.close()
