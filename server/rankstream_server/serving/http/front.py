"""The HTTP front: a FastAPI app on uvicorn, run in the gRPC server's event loop.

Every request first passes `Guard`, a plain ASGI layer that refuses cheaply, before the body is
read: the shared admission (concurrency cap, and the load gate sizing the call by its
Content-Length; access log, metrics), 503 once the server stops,
the shared bearer-token check, and the body limit (Content-Length, and a count of the bytes as
they arrive for chunked bodies). The dialect modules (cohere, jina, tei, openai, native) only
translate JSON to the proto requests of serving/operations.py and back; `Calls.run` runs an
operation, cancels it when the client disconnects, and turns every error into the dialect's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from rankstream.v1 import rankstream_pb2 as pb
from rankstream_server.config import Settings, TlsConfig
from rankstream_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RankstreamError,
    ResourceExhausted,
    TooLarge,
    Unavailable,
)
from rankstream_server.serving.admission import REQUEST_ID, Admission, CallRecord, usable_request_id
from rankstream_server.serving.auth import TokenStore, authorize, bearer_of_header
from rankstream_server.serving.http import errors as http_errors
from rankstream_server.serving.operations import Readiness, Services

log = logging.getLogger(__name__)

CALL_KEY = "rankstream.call"  # the request's CallRecord, in the ASGI scope
ROUTE_KEY = "rankstream.route"
DEADLINE_KEY = "rankstream.deadline"  # the client's deadline (time.monotonic()), when it sent one
# Headers that carry the caller's timeout, as gRPC-gateway and Envoy (Istio) forward it.
GRPC_TIMEOUT = "grpc-timeout"
ENVOY_TIMEOUT = "x-envoy-expected-rq-timeout-ms"
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


@dataclass(frozen=True)
class Route:
    """What the front knows of a path before reading its body: which dialect answers errors, the
    gRPC method whose role rule applies (None: no token needed), and the operation's name."""

    dialect: str
    method: str | None
    rpc: str
    quiet: bool = False  # health and description endpoints: not capped, logged at DEBUG


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


class HttpCall:
    """An operation's CallContext over HTTP: the deadline the client sent (deadline_header), if
    any, and the stats kept."""

    __slots__ = ("stats", "_deadline")

    def __init__(self, deadline: float | None = None) -> None:
        self.stats: pb.RerankStats | None = None
        self._deadline = deadline  # time.monotonic() value

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def report(self, stats: pb.RerankStats) -> None:
        self.stats = stats


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Calls:
    """What dialect endpoints share: the operations, and running one of them for a request."""

    def __init__(self, settings: Settings, services: Services, readiness: Readiness,
                 admission: Admission | None = None):
        self.settings = settings
        self.services = services
        self.readiness = readiness
        self._admission = admission  # holds refusals made after the body was read, as the Guard does

    async def run(self, request: Request, work: Callable[[HttpCall], Awaitable[object]]) -> tuple[object, HttpCall]:
        """Runs `work(call)`, cancelled (its queued batches dropped) if the client disconnects first,
        or once the deadline it sent has passed (DeadlineExceeded: 504). Domain errors pass through
        for the dialect's handler; anything else becomes an opaque 500."""
        context = HttpCall(request.scope.get(DEADLINE_KEY))
        task = asyncio.ensure_future(work(context))
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            remaining = context.time_remaining()
            await asyncio.wait((task, watcher), timeout=None if remaining is None else max(remaining, 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                if not watcher.done():
                    raise DeadlineExceeded("deadline passed (from the request's timeout header) before the answer "
                                           "was ready")
                raise ClientGone()
            try:
                return task.result(), context
            except ResourceExhausted as refused:
                if self._admission is not None:
                    await self._admission.hold(refused, context.time_remaining(), request.scope.get(CALL_KEY))
                raise
            except (RankstreamError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - never a traceback to the client
                raise internal_error(exc) from None
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()


    async def rerank(self, request: Request, message: pb.RerankRequest) -> tuple[list[pb.ScoredPassage], HttpCall]:
        """The shared Rerank operation's results (RANKED: best first) for an HTTP request."""
        service = self.services.reranker

        async def work(context: HttpCall) -> list[pb.ScoredPassage]:
            passages: list[pb.ScoredPassage] = []
            async with contextlib.aclosing(service.Rerank(message, context)) as stream:
                async for batch in stream:
                    passages.extend(batch.passages)
            return passages

        record: CallRecord = request.scope[CALL_KEY]
        record.passages_in = len(message.passages)
        passages, context = await self.run(request, work)
        record.passages_out = len(passages)
        return passages, context

    async def embed(self, request: Request, message: pb.EmbedRequest) -> tuple[str, np.ndarray, pb.RerankStats]:
        """The shared Embed operation's model name, vectors (one row per input) and stats."""
        request.scope[CALL_KEY].passages_in = len(message.inputs)
        (name, vectors, stats), _ = await self.run(request, lambda context: self.services.embedder.embed(message, context))
        request.scope[CALL_KEY].passages_out = len(vectors)
        return name, vectors, stats

    def model(self, name: str):
        """The served model a request names (or the default reranker); raises NotFound."""
        return self.readiness.require().get(name)


def internal_error(exc: BaseException) -> RankstreamError:
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    return RankstreamError(f"internal error (server log reference {incident})")


async def _disconnected(receive) -> None:
    """Returns once the client has gone (the body was read already: nothing else can arrive)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Guard:
    """The plain ASGI layer in front of the app: admission, closing, auth and the body limit."""

    def __init__(self, app, routes: dict[str, Route], admission: Admission, readiness: Readiness,
                 tokens: TokenStore | None, max_body_bytes: int):
        self._app = app
        self._routes = routes
        self._admission = admission
        self._readiness = readiness
        self._tokens = tokens
        self._max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        route = self._routes.get(scope["path"]) or Route("native", None, "http", quiet=True)
        headers = _headers(scope)
        request_id = usable_request_id(headers.get(REQUEST_ID))
        client = scope.get("client")
        call = CallRecord(route.rpc, request_id, f"{client[0]}:{client[1]}" if client else "", route.quiet,
                          route=f"http:{route.dialect}")
        scope[CALL_KEY] = call
        scope[ROUTE_KEY] = route
        status = 500

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self._refusal(route, headers, call, scope)
            if refusal is not None:
                status = refusal.http_status
                call.code = refusal.code.name
                if isinstance(refusal, ResourceExhausted):
                    await self._admission.hold(refusal, HttpCall(scope.get(DEADLINE_KEY)).time_remaining(), call)
                await http_errors.respond(route.dialect, refusal, scope, receive, observed_send)
                return
            await self._app(scope, self._counted(receive), observed_send)
        finally:
            if call.code == "OK" and status >= 400:
                call.code = http_errors.code_name(status)
            self._admission.leave(call)

    def _refusal(self, route: Route, headers: dict[str, str], call: CallRecord, scope) -> RankstreamError | None:
        """Why the request is refused before its body is read, or None. Puts the deadline the
        client sent (deadline_header) in the scope."""
        if route.quiet:
            return None
        if self._readiness.closing:
            return Unavailable("server is shutting down; retry on another replica")
        if self._tokens is not None and route.method is not None:
            try:
                authorize(self._tokens, bearer_of_header(headers.get("authorization")), route.method)
            except RankstreamError as refused:
                return refused
        try:
            time_remaining = deadline_header(headers)
        except InvalidArgument as bad_header:
            return bad_header
        if time_remaining is not None:
            scope[DEADLINE_KEY] = time.monotonic() + time_remaining
        length = headers.get("content-length")
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None and size > self._max_body:
            return TooLarge(f"body: {size} bytes, limit is {self._max_body} (from the server's limits)")
        try:
            self._admission.enter(call, size, time_remaining)  # the load gate: by Content-Length and deadline
        except RankstreamError as refused:
            return refused
        return None

    def _counted(self, receive):
        """`receive`, refusing the body once more bytes arrive than the limit (chunked uploads)."""
        limit = self._max_body
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"body: more than {limit} bytes, the limit (from the server's limits)")
            return message

        return counted


def deadline_header(headers: dict[str, str]) -> float | None:
    """Seconds the caller will wait, from `grpc-timeout` (gRPC's format: digits and a unit, H M S
    m u n, as gRPC-gateway forwards it) or `x-envoy-expected-rq-timeout-ms` (set by Envoy and
    Istio on the requests they route); None when neither is sent. With it, an HTTP call gets what
    a gRPC deadline gives: work that cannot finish in time is refused before its body is read."""
    value = headers.get(GRPC_TIMEOUT)
    if value is not None:
        match = re.fullmatch(r"(\d{1,8})([HMSmun])", value.strip())
        if match is None:
            raise InvalidArgument(f"header {GRPC_TIMEOUT}: {value[:40]!r} is not 1 to 8 digits and a unit "
                                  "(H, M, S, m, u or n), e.g. 2500m")
        return int(match.group(1)) * _GRPC_TIMEOUT_UNITS[match.group(2)]
    value = headers.get(ENVOY_TIMEOUT)
    if value is not None:
        if not value.strip().isdigit():
            raise InvalidArgument(f"header {ENVOY_TIMEOUT}: {value[:40]!r} is not a whole number of milliseconds")
        return int(value) / 1000
    return None


def _headers(scope) -> dict[str, str]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


def build_app(settings: Settings, services: Services, readiness: Readiness, admission: Admission,
              tokens: TokenStore | None):
    """The ASGI app: every dialect's routes behind the Guard."""
    from rankstream_server.serving.http import cohere, native, openai, tei

    calls = Calls(settings, services, readiness, admission)
    app = FastAPI(title="rankstream", version="v1", docs_url="/docs", redoc_url=None,
                  description="Rerank and embed over HTTP: Cohere, Jina, TEI and OpenAI dialects, and the "
                  "rankstream.v1 operations as JSON (the proto3 JSON mapping).")
    routes: dict[str, Route] = {
        "/openapi.json": Route("native", None, "openapi", quiet=True),
        "/docs": Route("native", None, "docs", quiet=True),
    }
    for dialect in (cohere, tei, openai, native):
        router, dialect_routes = dialect.routes(calls)
        app.include_router(router)
        routes.update(dialect_routes)

    def dialect_of(request: Request) -> str:
        route = request.scope.get(ROUTE_KEY)
        return route.dialect if route is not None else "native"

    @app.exception_handler(RankstreamError)
    async def domain_error(request: Request, exc: RankstreamError) -> Response:
        return http_errors.render(dialect_of(request), exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        request.scope[CALL_KEY].code = "CANCELLED"
        return Response(status_code=499)  # nobody reads it: for the access log

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        return http_errors.validation_error(dialect_of(request), list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        cause = exc.__cause__
        if isinstance(cause, RankstreamError):  # the body limit, hit while FastAPI read the body
            return http_errors.render(dialect_of(request), cause)
        if exc.status_code == 404:
            error: RankstreamError = NotFound(f"path: {request.url.path} is not served here; see /docs")
        else:
            error = RankstreamError(str(exc.detail))
            error.http_status = exc.status_code
        return http_errors.render(dialect_of(request), error, exc.status_code)

    return Guard(app, routes, admission, readiness, tokens, max_body_bytes(settings))


def max_body_bytes(settings: Settings) -> int:
    """The largest body read: the gRPC receive limit (every request the limits admit, at 4 bytes a
    character) with room for JSON, whose escapes take up to 6 bytes a character."""
    return settings.limits.max_request_bytes() * 3 // 2


class HttpFront:
    """uvicorn serving the app in the running event loop (not uvicorn.run: its own loop and signal
    handlers would fight the gRPC server's)."""

    def __init__(self, settings: Settings, services: Services, readiness: Readiness, admission: Admission,
                 tokens: TokenStore | None):
        self._app = build_app(settings, services, readiness, admission, tokens)
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self, host: str, port: int, tls: TlsConfig | None) -> int:
        """Binds and serves; returns the bound port."""
        options = {}
        if tls is not None:
            options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
            if tls.client_ca_file:
                options.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self._app, host=host, port=port, lifespan="off", log_config=None, access_log=False,
                                http="httptools" if _has_httptools() else "h11", server_header=False, **options)
        config.load()
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
        # response's headers and body wait on the client's delayed ACK (40 ms a call).
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise OSError(f"cannot bind {host}:{port} (server.http_port)") from None
        sock.listen(config.backlog)
        sock.setblocking(False)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        self._ticker = asyncio.create_task(server.main_loop())  # keeps the Date header fresh; ends on should_exit
        return sock.getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stops accepting; in-flight requests get `grace` seconds, then are cancelled."""
        server = self._server
        if server is None:
            return
        server.config.timeout_graceful_shutdown = max(grace, 0.1)
        server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        await server.shutdown()
        self._server = None


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True
