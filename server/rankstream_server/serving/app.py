"""The server's lifecycle: bind, report NOT_SERVING, load and warm models off the event loop,
report SERVING, and on shutdown drain in-flight calls before stopping the batchers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc
from rankstream_server.config import Settings
from rankstream_server.inference.backend import available_cores
from rankstream_server.serving.admission import Admission
from rankstream_server.serving.auth import check_exposure, token_store, watch_file
from rankstream_server.serving.grpc.access import CallObserver
from rankstream_server.serving.grpc.interceptors import Authenticator, DecodeGuard
from rankstream_server.serving.grpc.servicers import EmbedderServicer, InfoServicer, RerankerServicer, RetrieverServicer
from rankstream_server.serving.metrics import Metrics
from rankstream_server.serving.operations import (
    EmbedderService,
    InfoService,
    Readiness,
    RerankerService,
    RetrieverService,
    Services,
)
from rankstream_server.serving.registry import ModelRegistry
from rankstream_server.serving.shedding import LoadGate
from rankstream_server.serving.tls import CertificateFiles

log = logging.getLogger(__name__)

SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Reranker", "Retriever", "Embedder", "Info")]


class RankstreamServer:
    """One server process: the gRPC server (services, health, reflection) and, when
    server.http_port is set, the HTTP front in the same event loop, both over the same
    operations, admission, auth and model registry."""

    def __init__(self, settings: Settings):
        check_exposure(settings.server, settings.auth)
        self.settings = settings
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._readiness = Readiness()
        self._health = health.aio.HealthServicer()
        # The `tokenizers` library reads this at every batch call: the process's one switch for it.
        parallel = settings.server.tokenizer_parallel
        if parallel is None:
            parallel = torch.cuda.is_available()
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
        self._tokenize_pool = ThreadPoolExecutor(settings.server.tokenizer_threads or available_cores(),
                                                 thread_name_prefix="tokenize")
        self._tokens = token_store(settings.auth)
        self._certificates = CertificateFiles(settings.server.tls) if settings.server.tls else None
        self.metrics = Metrics([m.name for m in settings.models]) if settings.server.metrics_port is not None else None
        self.admission = Admission(settings.server.max_concurrent_rpcs, self.metrics, LoadGate(self._readiness),
                                   settings.server.refusal_hold_ms / 1000)
        self.observer = CallObserver(self.admission)
        interceptors = [self.observer, *([Authenticator(self._tokens)] if self._tokens else []), DecodeGuard()]
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # Nothing larger than the limits admit is even read; results are split under max_message_bytes.
                ("grpc.max_receive_message_length", settings.limits.max_request_bytes()),
                ("grpc.max_send_message_length", settings.server.max_message_bytes + 64 * 1024),
                ("grpc.so_reuseport", 0),
                *_connection_age(settings.server),
            ]
        )
        shared = (settings, self._readiness, self._tokenize_pool, self.metrics)
        self.services = Services(RerankerService(*shared), RetrieverService(*shared), EmbedderService(*shared),
                                 InfoService(self._readiness))
        hold = self.admission.hold  # refusals after decoding are held like those before it
        pb_grpc.add_RerankerServicer_to_server(RerankerServicer(self.services.reranker, hold), self._server)
        pb_grpc.add_RetrieverServicer_to_server(RetrieverServicer(self.services.retriever, hold), self._server)
        pb_grpc.add_EmbedderServicer_to_server(EmbedderServicer(self.services.embedder, hold), self._server)
        pb_grpc.add_InfoServicer_to_server(InfoServicer(self.services.info), self._server)
        self._http = None
        if settings.server.http_port is not None:
            from rankstream_server.serving.http.front import HttpFront  # the ASGI stack loads only when asked for

            self._http = HttpFront(settings, self.services, self._readiness, self.admission, self._tokens)
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        if settings.server.health_port is not None:  # plaintext, health only: for probes that cannot do TLS
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
        self._saver: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._file_watcher: asyncio.Task | None = None
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)

    async def _set_health(self, status: int) -> None:
        self._readiness.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ["", *SERVICE_NAMES]:
            await self._health.set(name, status)

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING); returns the bound port."""
        server = self.settings.server
        torch.set_num_threads(server.torch_threads or 1)
        address = f"{server.host}:{server.port}"
        if self._certificates is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, self._certificates.credentials())
        if self.port == 0:
            raise OSError(f"cannot bind {server.host}:{server.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        if self._health_server is not None:
            self.health_port = self._health_server.add_insecure_port(f"{server.host}:{server.health_port}")
            if self.health_port == 0:
                raise OSError(f"cannot bind {server.host}:{server.health_port} (server.health_port)")
            await self._health_server.start()
        if self._http is not None:
            self.http_port = await self._http.start(server.host, server.http_port, self.settings.server.tls)
            log.info("HTTP front on %s:%d", server.host, self.http_port)
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(server.metrics_host or server.host, server.metrics_port)
            log.info("metrics on http://%s:%d/metrics", server.metrics_host or server.host, self.metrics_port)
        if self._tokens is not None:
            self._file_watcher = asyncio.create_task(watch_file(self.settings.auth.reload_seconds,
                                                                self._tokens.reload_if_changed))
        return self.port

    async def load_models(self) -> None:
        """Loads and warms every model on a worker thread, then reports SERVING."""
        registry = ModelRegistry(self.settings)
        await _in_daemon_thread(registry.load_all)
        self._readiness.registry = registry
        if self.metrics is not None:
            self.metrics.attach(registry)
        if self.settings.indexes:
            self._saver = asyncio.create_task(self._save_periodically(registry))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watcher = asyncio.create_task(self._watch_models(registry))
        log.info("serving %s on port %s", [m.name for m in registry.models], self.port)

    async def _watch_models(self, registry: ModelRegistry, interval: float = 1.0) -> None:
        """Health follows the models: NOT_SERVING while any model's batcher is dead or its passes
        keep failing, SERVING again once they run."""
        serving = True
        while True:
            await asyncio.sleep(interval)
            sick = [model.name for model in registry.models if not model.batcher.healthy]
            if bool(sick) == serving:
                serving = not sick
                if sick:
                    log.error("models %s are failing: health NOT_SERVING", sick)
                else:
                    log.info("models recovered: health SERVING")
                status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                await self._set_health(status)

    async def _save_periodically(self, registry: ModelRegistry) -> None:
        """Saves changed FAISS indexes now and then (the document store is durable on every write)."""
        interval = min(index.save_interval_seconds for index in self.settings.indexes)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(registry.save_indexes)
            except Exception:  # noqa: BLE001 - a failed save is retried next time; the store has the data
                log.exception("saving indexes failed")

    async def drain(self) -> None:
        """Health NOT_SERVING at once, while calls are still served for `server.drain_seconds`, so
        load balancers and clients stop sending here before the port closes."""
        if self._watcher is not None:
            self._watcher.cancel()
        self._readiness.serving = False  # HTTP /health: 503 too
        await self._health.enter_graceful_shutdown()
        drain = self.settings.server.drain_seconds
        if drain > 0:
            log.info("draining: health NOT_SERVING, still serving for %.1f s", drain)
            await asyncio.sleep(drain)

    async def stop(self) -> None:
        """Graceful: report NOT_SERVING, refuse new calls, let in-flight calls finish within the
        grace period, stop batchers, save indexes."""
        for task in (self._saver, self._watcher, self._file_watcher):
            if task is not None:
                task.cancel()
        self._readiness.serving = False
        self._readiness.closing = True  # new HTTP calls: 503, as gRPC refuses new calls once stopping
        await self._health.enter_graceful_shutdown()
        log.info("closing the port: in-flight calls get up to %.1f s", self.settings.server.grace_seconds)
        grace = self.settings.server.grace_seconds
        if self._http is not None:
            await asyncio.gather(self._server.stop(grace), self._http.stop(grace))
        else:
            await self._server.stop(grace)
        if self._readiness.registry is not None:
            await asyncio.to_thread(self._readiness.registry.close)
        if self.metrics is not None:
            self.metrics.close()
        if self._health_server is not None:
            await self._health_server.stop(None)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


def _connection_age(server) -> list[tuple[str, int]]:
    """GOAWAY after max_connection_age_seconds (calls in progress get grace_seconds to finish)."""
    if server.max_connection_age_seconds is None:
        return []
    return [("grpc.max_connection_age_ms", int(server.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(server.grace_seconds, 1.0) * 1000))]


async def _in_daemon_thread(function: Callable[[], object]) -> object:
    """Runs blocking start-up work on a daemon thread. Unlike asyncio.to_thread, whose pool is
    joined at exit, a SIGTERM during model loading then ends the process without waiting for
    the loading to finish."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(outcome: object, failed: bool) -> None:
        if done.cancelled():
            return
        if failed:
            done.set_exception(outcome)
        else:
            done.set_result(outcome)

    def run() -> None:
        try:
            outcome, failed = function(), False
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            outcome, failed = error, True
        try:
            loop.call_soon_threadsafe(settle, outcome, failed)
        except RuntimeError:  # the loop is gone: the server stopped while this ran
            pass

    threading.Thread(target=run, name="load-models", daemon=True).start()
    return await done


async def serve(settings: Settings, on_bound: Callable[..., None] | None = None) -> None:
    """Runs until SIGTERM (drains first: see RankstreamServer.drain) or SIGINT (stops at once,
    still giving in-flight calls the grace period)."""
    server = RankstreamServer(settings)
    received: asyncio.Future = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anyone is told the port: a signal is never missed
        loop.add_signal_handler(sig, lambda sig=sig: received.done() or received.set_result(sig))
    port = await server.start()
    if on_bound is not None:
        if server.http_port is not None:
            on_bound(port, server.http_port)
        else:
            on_bound(port)
    loader = asyncio.create_task(server.load_models())
    done, _ = await asyncio.wait({loader, received}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        await server.stop()
        raise loader.exception()
    sig = await received
    if loader.done() and sig == signal.SIGTERM:
        await server.drain()
    log.info("shutting down (%s)", signal.Signals(sig).name)
    loader.cancel()
    await server.stop()
