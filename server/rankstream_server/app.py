"""The server's lifecycle: bind, report NOT_SERVING, load and warm models off the event loop,
report SERVING, and on shutdown drain in-flight calls before stopping the batchers."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rankstream.v1 import rankstream_pb2 as pb
from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

from .config import Settings, TlsConfig
from .interceptors import DecodeGuard
from .registry import ModelRegistry
from .service import InfoService, Readiness, RerankerService, RetrieverService

log = logging.getLogger(__name__)

SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Reranker", "Retriever", "Info")]


class RankstreamServer:
    """One gRPC server process: services, health, reflection and the model registry."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.port: int | None = None
        self._readiness = Readiness()
        self._health = health.aio.HealthServicer()
        self._tokenize_pool = ThreadPoolExecutor(settings.server.tokenizer_threads, thread_name_prefix="tokenize")
        self._server = grpc.aio.server(
            interceptors=[DecodeGuard()],
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_RerankerServicer_to_server(
            RerankerService(settings, self._readiness, self._tokenize_pool), self._server
        )
        pb_grpc.add_RetrieverServicer_to_server(
            RetrieverService(settings, self._readiness, self._tokenize_pool), self._server
        )
        pb_grpc.add_InfoServicer_to_server(InfoService(self._readiness), self._server)
        self._saver: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)

    async def _set_health(self, status: int) -> None:
        for name in ["", *SERVICE_NAMES]:
            await self._health.set(name, status)

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING); returns the bound port."""
        server = self.settings.server
        if server.torch_threads:
            torch.set_num_threads(server.torch_threads)
        address = f"{server.host}:{server.port}"
        if server.tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, _server_credentials(server.tls))
        if self.port == 0:
            raise OSError(f"cannot bind {server.host}:{server.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        return self.port

    async def load_models(self) -> None:
        """Loads and warms every model on a worker thread, then reports SERVING."""
        registry = ModelRegistry(self.settings)
        await _in_daemon_thread(registry.load_all)
        self._readiness.registry = registry
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

    async def stop(self) -> None:
        """Graceful: report NOT_SERVING, let in-flight calls finish within the grace period, stop
        batchers, save indexes."""
        for task in (self._saver, self._watcher):
            if task is not None:
                task.cancel()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.server.grace_seconds)
        if self._readiness.registry is not None:
            await asyncio.to_thread(self._readiness.registry.close)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


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


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        return Path(path).read_bytes()

    client_ca = read(tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read(tls.key_file), read(tls.cert_file))], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def serve(settings: Settings, on_bound: Callable[[int], None] | None = None) -> None:
    """Runs until SIGINT or SIGTERM."""
    server = RankstreamServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anyone is told the port: a signal is never missed
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    if on_bound is not None:
        on_bound(port)
    loader = asyncio.create_task(server.load_models())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        stopper.cancel()
        await server.stop()
        raise loader.exception()
    await stopper
    log.info("shutting down: draining in-flight calls")
    loader.cancel()
    await server.stop()
