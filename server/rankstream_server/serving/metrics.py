"""Prometheus metrics (prometheus-client), served on `server.metrics_port` when it is set.

Counted as they happen: requests by RPC and status code, request duration, rows and padded
tokens per forward pass, and the seconds a request spends in each stage (tokenize, queue,
inference). Read at scrape time: pairs queued or running per model, padding share per model,
passages per index, model readiness. Everything lives in the server's own registry, not
prometheus-client's global one.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
STAGES = ("tokenize", "queue", "inference")


class _Live(Collector):
    """Gauges read from the models and indexes at each scrape."""

    def __init__(self) -> None:
        self.registry = None  # the ModelRegistry, once models are loaded
        self.configured_models: list[str] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily("rankstream_queue_pairs", "Pairs (or texts) queued or running, per model.", labels=["model"])
        padding = GaugeMetricFamily("rankstream_padding_ratio",
                                    "Share of padded tokens in the forward passes so far (0 = none), per model.",
                                    labels=["model"])
        ready = GaugeMetricFamily("rankstream_model_ready", "1 when the model is loaded and its passes run.", labels=["model"])
        passages = GaugeMetricFamily("rankstream_index_passages", "Passages searchable in the index.", labels=["index"])
        refused = CounterMetricFamily("rankstream_model_refused", "Requests a model's queue refused, by reason "
                                      "(capacity, queue seconds, deadline); both admission checks.",
                                      labels=["model", "reason"])
        registry = self.registry
        if registry is None:
            for name in self.configured_models:
                ready.add_metric([name], 0)
        else:
            for model in registry.models:
                batcher = model.batcher
                counters = batcher.counters
                queue.add_metric([model.name], batcher.in_flight)
                share = 1 - counters.tokens / counters.padded_tokens if counters.padded_tokens else 0.0
                padding.add_metric([model.name], share)
                ready.add_metric([model.name], 1 if batcher.healthy else 0)
                for reason in ("capacity", "queue", "deadline"):
                    refused.add_metric([model.name, reason], getattr(counters, f"refused_{reason}"))
            for index in registry.indexes:
                try:
                    passages.add_metric([index.config.name], index.count)
                except Exception:  # noqa: BLE001 - a scrape never fails on one index
                    log.exception("metrics: cannot count index %s", index.config.name)
        yield from (queue, padding, ready, passages, refused)


class Metrics:
    def __init__(self, configured_models: list[str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rankstream_requests", "RPCs finished, by method and status code.", ["rpc", "code"], registry=r)
        self.duration = Histogram("rankstream_request_duration_seconds", "RPC duration, by method.", ["rpc"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram("rankstream_batch_size", "Rows per forward pass.", ["model"], buckets=ROWS_BUCKETS, registry=r)
        self.batch_tokens = Histogram("rankstream_batch_tokens", "Padded tokens per forward pass.", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.refused = Counter("rankstream_refused", "Calls refused under overload (RESOURCE_EXHAUSTED, HTTP 429), by "
                               "method and reason: concurrency, or the model queue's capacity, queue (seconds) or "
                               "deadline when refused before decoding, model when refused after it.", ["rpc", "reason"],
                               registry=r)
        self.stage = Histogram("rankstream_stage_seconds", "Seconds a request spent in each stage, by model.",
                               ["model", "stage"], buckets=DURATION_BUCKETS, registry=r)
        build = Info("rankstream_build", "Versions this server runs.", registry=r)
        build.info(_versions())
        self._live = _Live()
        self._live.configured_models = configured_models
        r.register(self._live)
        self._http = None

    def attach(self, registry) -> None:
        """Once models are loaded: read their queues and count their passes."""
        for model in registry.models:
            size, tokens = self.batch_size.labels(model.name), self.batch_tokens.labels(model.name)

            def on_pass(rows: int, padded: int, size=size, tokens=tokens) -> None:
                size.observe(rows)
                tokens.observe(padded)

            model.batcher.on_pass = on_pass
        self._live.registry = registry

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.duration.labels(rpc).observe(seconds)

    def observe_refusal(self, rpc: str, reason: str) -> None:
        self.refused.labels(rpc, reason).inc()

    def observe_stages(self, model: str, tokenize_s: float, queue_s: float, inference_s: float) -> None:
        for stage, seconds in zip(STAGES, (tokenize_s, queue_s, inference_s)):
            self.stage.labels(model, stage).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint on its own thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("rankstream", "torch", "transformers", "faiss-cpu", "grpcio"):
        try:
            versions[package.replace("-", "_")] = version(package)
        except PackageNotFoundError:
            continue
    return versions
