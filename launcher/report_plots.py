"""PNG plots of one tracked run: loss, throughput, GPU and host telemetry, read back from the MLflow store.

Metric names follow docs/tracking.md: ``train/{loss,ce,sem,gate,acc*}`` and ``eval/{ce,acc*}`` (x = training step),
throughput is ``perf/*``, system counters are ``sys/<node>/gpu<i>/<field>`` and ``sys/<node>/<field>``
(x = minutes since the run started, because samplers tick on wall time). A resumed run may hold two values for
the steps between its last checkpoint and the interruption; the later one (the resumed job's) is plotted.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

# Panels of the loss figure: the MLM cross-entropy (what pretraining is judged by: train vs fixed-mask eval), the
# total and its auxiliary terms (whose weights warm up, so the total alone can rise while CE falls), accuracies.
_LOSS_PANELS = (
    ("masked-LM cross-entropy", re.compile(r"^(train|eval)/ce$")),
    ("loss and its terms", re.compile(r"^train/(loss|sem|gate)$|^eval/.*loss.*$")),
    ("masked top-1 accuracy", re.compile(r"^(train|eval)/acc(_a|_b)?$")),
)
_THROUGHPUT = ("perf/tokens_per_s", "perf/samples_per_s", "perf/mfu")
_STEP_TIME = ("perf/step_time_min_s", "perf/step_time_max_s")
_GPU = re.compile(r"^sys/(?P<node>[^/]+)/(?P<gpu>gpu\d+)/(?P<field>[a-z_]+)$")
_HOST = re.compile(r"^sys/(?P<node>[^/]+)/(?P<field>cpu_pct|load1|ram_used_gib|ram_pct)$")
_GPU_FIELDS = {"util_pct": "GPU utilisation (%)", "mem_used_gib": "memory used (GiB)", "power_w": "power (W)",
               "temp_c": "temperature (°C)", "sm_clock_mhz": "SM clock (MHz)"}
_HOST_FIELDS = {"cpu_pct": "host CPU (%)", "ram_used_gib": "host RAM used (GiB)"}


def _by_step(history: list[Any]) -> tuple[list[int], list[float]]:
    """One value per step, the most recently logged one."""
    latest: dict[int, Any] = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        latest[m.step] = m
    steps = sorted(latest)
    return steps, [latest[s].value for s in steps]


def _by_time(history: list[Any], t0_ms: int) -> tuple[list[float], list[float]]:
    points = sorted(history, key=lambda m: m.timestamp)
    return [(m.timestamp - t0_ms) / 60_000 for m in points], [m.value for m in points]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_plot(histories: dict[str, list[Any]], title: str, out: Path) -> Path | None:
    panels = [(label, sorted(k for k in histories if pattern.match(k))) for label, pattern in _LOSS_PANELS]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, (label, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = _by_step(histories[key])
            ax.plot(steps, values, label=key, marker="o" if key.startswith("eval/") or len(steps) == 1 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"{title}: loss")
    axes[-1, 0].set_xlabel("step")
    return _save(fig, out / "loss.png")


def _throughput_plot(histories: dict[str, list[Any]], title: str, out: Path) -> Path | None:
    panels = [[k] for k in _THROUGHPUT if k in histories]
    if any(k in histories for k in _STEP_TIME):
        panels.append([k for k in _STEP_TIME if k in histories])
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, keys in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = _by_step(histories[key])
            ax.plot(steps, values, label=key)
        ax.set_ylabel(keys[0].split("/")[-1] if len(keys) == 1 else "step time (s), min/max over ranks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"{title}: throughput")
    axes[-1, 0].set_xlabel("step")
    return _save(fig, out / "throughput.png")


def _system_plot(histories: dict[str, list[Any]], pattern: re.Pattern, fields: dict[str, str], name: str,
                 title: str, out: Path, t0_ms: int) -> Path | None:
    series: dict[str, list[tuple[str, str]]] = {f: [] for f in fields}
    for key in sorted(histories):
        m = pattern.match(key)
        if m and m["field"] in fields:
            label = m["node"] + (f"/{m['gpu']}" if "gpu" in m.groupdict() else "")
            series[m["field"]].append((label, key))
    panels = [(f, s) for f, s in series.items() if s]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (field, lines) in zip(axes[:, 0], panels):
        for label, key in lines:
            ax.plot(*_by_time(histories[key], t0_ms), label=label)
        ax.set_ylabel(fields[field], fontsize=8)
        ax.grid(alpha=0.3)
        if len(lines) <= 16:
            ax.legend(fontsize=7, ncol=4)
    axes[0, 0].set_title(f"{title}: {name}")
    axes[-1, 0].set_xlabel("minutes since run start")
    return _save(fig, out / f"{name}.png")


def render_report(tracking_uri: str, run_id: str, out_dir: str | Path) -> list[Path]:
    """Write loss.png, throughput.png, gpu.png and host.png (those with data) for ``run_id``; return the paths."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id}: not readable from the tracking store ({e.error_code}: "
                         f"{' '.join(e.message.split())[:200]})") from None
    histories = {k: client.get_metric_history(run_id, k) for k in run.data.metrics}
    title = run.data.tags.get("mlflow.runName", run_id[:8])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = run.info.start_time
    written = [
        _loss_plot(histories, title, out),
        _throughput_plot(histories, title, out),
        _system_plot(histories, _GPU, _GPU_FIELDS, "gpu", title, out, t0),
        _system_plot(histories, _HOST, _HOST_FIELDS, "host", title, out, t0),
    ]
    paths = [p for p in written if p is not None]
    if not paths:
        raise ValueError(f"run {run_id}: no loss, throughput or system metrics to plot "
                         f"(metrics present: {sorted(histories)[:10]})")
    return paths
