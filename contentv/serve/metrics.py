"""Prometheus metrics of the server (prometheus-client, its own registry): queue depth and jobs by state (read
from the store at scrape time, so they are right after a restart too), admission latency, per-stage seconds,
peak memory per worker, and failures by code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Metrics:
    def __init__(self, counts: Callable[[], dict[str, int]], workers: Callable[[], list[dict]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = CollectorRegistry()

        class StoreCollector:
            def collect(self) -> Any:
                c = counts()
                yield GaugeMetricFamily("contentv_serve_queue_depth", "Jobs waiting for a worker.", value=c["queued"])
                jobs = GaugeMetricFamily("contentv_serve_jobs", "Jobs in the store by state.", labels=["state"])
                for state, n in c.items():
                    jobs.add_metric([state], n)
                yield jobs
                busy = GaugeMetricFamily("contentv_serve_workers_busy", "Workers running a job.")
                ws = workers()
                busy.add_metric([], sum(1 for w in ws if w["job"]))
                yield busy
                yield GaugeMetricFamily("contentv_serve_workers", "Workers in the pool.", value=len(ws))

        self.registry.register(StoreCollector())
        r = self.registry
        self.admission = Histogram(
            "contentv_serve_admission_seconds",
            "Time to check and queue a request.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.stage = Histogram(
            "contentv_serve_stage_seconds",
            "Seconds per stage of finished jobs.",
            ["stage"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.job = Histogram(
            "contentv_serve_job_seconds",
            "Seconds from claim to outcome.",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.peak_device = Gauge(
            "contentv_serve_peak_device_bytes", "Peak device memory of the worker's last job.", ["worker"], registry=r
        )
        self.peak_host = Gauge(
            "contentv_serve_peak_host_rss_bytes", "Peak host RSS of the worker's last job.", ["worker"], registry=r
        )
        self.completed = Counter("contentv_serve_jobs_completed", "Jobs completed since start.", registry=r)
        self.failed = Counter("contentv_serve_jobs_failed", "Jobs failed since start, by code.", ["code"], registry=r)
        self.refused = Counter(
            "contentv_serve_requests_refused", "Requests refused, by status.", ["status"], registry=r
        )

    def job_done(self, worker: str, model: str, stats: dict, seconds: float) -> None:
        self.completed.inc()
        self.job.observe(seconds)
        for stage, s in (stats.get("stages_s") or {}).items():
            self.stage.labels(stage).observe(s)
        if stats.get("peak_device_bytes") is not None:
            self.peak_device.labels(worker).set(stats["peak_device_bytes"])
        if stats.get("peak_host_rss_bytes") is not None:
            self.peak_host.labels(worker).set(stats["peak_host_rss_bytes"])

    def job_failed(self, code: str) -> None:
        self.failed.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
