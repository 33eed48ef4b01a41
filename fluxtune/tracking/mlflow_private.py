"""The two places fluxtune relies on MLflow beyond its documented API, fenced here.
`tests/test_upstream_fences.py` fails when MLflow grows the public API that replaces either.

1. The latest step of every metric of a run. A resumed trial skips the metric points its run already holds, so
   the tracker needs, per metric, the step of the latest point. `Run.data.metrics` keeps only the value; the
   `Metric` objects behind it (which carry the step) are the private `RunData._metric_objs`. MLflow's own
   system-metrics monitor reads that same list to resume. The public way, `get_metric_history` per metric, downloads
   every point of every curve. A public accessor was proposed upstream (`RunData.metric_objects()`, not merged):
   when it exists, use it here.
2. Sampling CPU, memory and GPU use without an MLflow run in the process. MLflow's documented system metrics
   (`mlflow.start_run(log_system_metrics=True)`, `SystemMetricsMonitor(run_id)`) start a thread in the process that
   owns the run and write straight to the tracking store. In fluxtune the trial's run belongs to the sweep driver,
   which is the only writer (a sqlite store takes one writer; a store on the driver's disk is out of a remote
   node's reach; writes during a server outage are buffered there). So a trial's rank-0 worker samples its own
   node with MLflow's monitors (`CPUMonitor`, `GPUMonitor`: the collectors `SystemMetricsMonitor` uses, outside
   the documented API) and sends the numbers with its reports; the driver logs them to the trial's run under the
   same `system/…` names MLflow's own system metrics use.

No Ray and no torch here: the worker imports this module for the sampler alone.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PREFIX = "system/"


def latest_steps(run: Any) -> dict[str, int]:
    """metric key → the step of its latest point (the one MLflow keeps at the largest step), from `get_run`."""
    return {metric.key: metric.step for metric in run.data._metric_objs}


class SystemSampler:
    """CPU and memory of this node (and its NVIDIA GPUs where NVML loads), averaged since the previous sample."""

    def __init__(self) -> None:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self.monitors: list[Any] = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA driver or no pynvml: GPU metrics are simply not available
            pass
        self.sample()  # CPU utilisation is measured between two calls: the first one starts the interval

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                out.update({f"{SYSTEM_PREFIX}{k}": float(v) for k, v in monitor.aggregate_metrics().items()})
            finally:
                monitor.clear_metrics()
        return out
