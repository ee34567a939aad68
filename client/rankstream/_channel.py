"""Channel settings shared by the sync and asyncio clients: TLS, bearer tokens, client-side
round_robin (for `dns:///` targets of a headless Kubernetes Service), and retries with
exponential backoff on UNAVAILABLE only (gRPC's own retry machinery, from the service config)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import grpc

from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

TOKEN_ENV = "RANKSTREAM_TOKEN"  # the bearer token when none is passed
SERVICES = ("rankstream.v1.Reranker", "rankstream.v1.Retriever", "rankstream.v1.Info", "rankstream.v1.Embedder")


@dataclass(frozen=True)
class ChannelSettings:
    target: str = "localhost:50051"
    timeout: float | None = 30.0  # default deadline per call, seconds; None = none
    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None = the system's roots
    certificate_chain: bytes | None = None  # PEM client certificate, for mTLS
    private_key: bytes | None = None  # PEM client key, for mTLS
    token: str | None = None  # sent as "authorization: Bearer <token>"
    max_attempts: int = 5  # per call, counting the first; retried only on UNAVAILABLE
    initial_backoff: float = 0.2
    max_backoff: float = 5.0

    def options(self) -> list[tuple[str, object]]:
        config = {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": service} for service in SERVICES],
                    "retryPolicy": {
                        "maxAttempts": max(2, self.max_attempts),
                        "initialBackoff": f"{self.initial_backoff}s",
                        "maxBackoff": f"{self.max_backoff}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
        options: list[tuple[str, object]] = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
        if self.max_attempts <= 1:
            options[1] = ("grpc.enable_retries", 0)
        options.append(("grpc.max_receive_message_length", 64 * 1024 * 1024))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class ClientBase:
    """What the sync and asyncio clients share: settings, the channel, the stubs.

    `target` is "host:port", or "dns:///name:port" to balance over every address of a headless
    Kubernetes Service. `token` (default: the RANKSTREAM_TOKEN environment variable) is sent as
    `authorization: Bearer <token>` on every call.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = 30.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        token: str | None = None,
        max_attempts: int = 5,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
    ):
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        self.settings = ChannelSettings(
            target, timeout, tls, root_certificates, certificate_chain, private_key, token, max_attempts,
            initial_backoff, max_backoff,
        )
        self._channel = self._open_channel(target, self.settings.credentials(), self.settings.options())
        self._reranker = pb_grpc.RerankerStub(self._channel)
        self._retriever = pb_grpc.RetrieverStub(self._channel)
        self._info = pb_grpc.InfoStub(self._channel)
        self._embedder = pb_grpc.EmbedderStub(self._channel)

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None, options: list):
        raise NotImplementedError

    def _kwargs(self, timeout: float | None) -> dict:
        return {"timeout": self.settings.deadline(timeout), "metadata": self.settings.metadata()}
