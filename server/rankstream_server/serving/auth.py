"""Bearer-token authentication with two roles, read and write.

The tokens file has one `ROLE TOKEN` per line (blank lines and `#` comments allowed). Only the
SHA-256 digests of the tokens are kept, and a presented token is compared with every digest in
constant time. The file is re-read when it changes (a mounted Kubernetes Secret is updated in
place), and a file that turns bad keeps the tokens already loaded. Every call except health
checks needs `authorization: Bearer <token>` (gRPC metadata or HTTP header alike): a missing or
unknown token gets UNAUTHENTICATED (HTTP 401), a read token on a write call PERMISSION_DENIED
(HTTP 403); no message echoes the token. The gRPC interceptor is in serving/grpc/interceptors.py,
the HTTP check in serving/http/front.py: both call `authorize` here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rankstream_server.config import AuthConfig, ConfigError, ServerConfig
from rankstream_server.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

READ, WRITE = "read", "write"
ROLES = {READ: 1, WRITE: 2}
UNGUARDED_PREFIX = "/grpc.health.v1.Health/"
READ_METHODS = frozenset({
    "/rankstream.v1.Reranker/Rerank",
    "/rankstream.v1.Retriever/Retrieve",
    "/rankstream.v1.Retriever/RetrieveAndRerank",
    "/rankstream.v1.Info/ListModels",
    "/rankstream.v1.Embedder/Embed",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
# Everything else (UpsertPassages, DeletePassages, any method added later) needs write.


class TokensFileError(ValueError):
    pass


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> list[tuple[bytes, str]]:
    """(digest, role) per token line; errors name the line, never the token."""
    entries: list[tuple[bytes, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokensFileError(f"{source} line {number}: expected `ROLE TOKEN` (two fields), got {len(parts)}")
        role, token = parts
        if role not in ROLES:
            raise TokensFileError(f"{source} line {number}: role must be read or write, got {role[:20]!r}")
        entries.append((_digest(token), role))
    return entries


@dataclass(frozen=True)
class _Stamp:
    inode: int
    mtime_ns: int
    size: int


def _stamp(path: Path) -> _Stamp:
    stat = path.stat()  # follows symlinks: a Secret's ..data swap changes it
    return _Stamp(stat.st_ino, stat.st_mtime_ns, stat.st_size)


class TokenStore:
    """The digests of the tokens file, reloaded when the file changes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: _Stamp | None = None
        self._entries: list[tuple[bytes, str]] = []
        self.reloads = 0
        self._load()

    def _load(self) -> None:
        try:
            stamp = _stamp(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TokensFileError(f"auth.tokens_file {self.path}: cannot read it ({type(error).__name__})") from None
        entries = parse_tokens(text, f"auth.tokens_file {self.path}")
        if not entries:
            raise TokensFileError(f"auth.tokens_file {self.path}: holds no tokens")
        self._entries, self._stamp = entries, stamp

    def reload_if_changed(self) -> bool:
        """Re-reads the file if it changed; a file now missing or invalid keeps the old tokens."""
        try:
            if _stamp(self.path) == self._stamp:
                return False
            self._load()
        except (OSError, TokensFileError) as error:
            log.error("tokens file not reloaded, keeping the %d tokens loaded before: %s", len(self._entries), error)
            return False
        self.reloads += 1
        log.info("tokens file reloaded: %d tokens", len(self._entries))
        return True

    def role_of(self, token: str) -> str | None:
        """The token's role, or None. Compares with every digest, so time does not depend on which matched."""
        presented = _digest(token)
        role = None
        for digest, entry_role in self._entries:
            if hmac.compare_digest(presented, digest):
                role = entry_role
        return role


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_of_header(value)
    return None


def required_role(method: str) -> str | None:
    if method.startswith(UNGUARDED_PREFIX):
        return None
    return READ if method in READ_METHODS else WRITE


def bearer_of_header(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def authorize(tokens: TokenStore, token: str | None, method: str) -> None:
    """Raises Unauthenticated or PermissionDenied unless `token` may call `method` (a gRPC method
    path; the HTTP routes name the method they serve)."""
    needed = required_role(method)
    if needed is None:
        return
    role = tokens.role_of(token) if token is not None else None
    if role is None:
        reason = "unknown bearer token" if token is not None else "missing bearer token"
        raise Unauthenticated(f"{reason}: send `authorization: Bearer <token>` with a token from the server's tokens file")
    if ROLES[role] < ROLES[needed]:
        rpc = method.rsplit("/", 1)[-1]
        raise PermissionDenied(f"{rpc} needs a {needed} token; this token's role is {role}")


async def watch_file(interval: float, check) -> None:
    """Calls `check` (a blocking stat-and-reload) every `interval` seconds, off the event loop."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(check)
        except Exception:  # noqa: BLE001 - a failed check is retried next time
            log.exception("checking %s for changes failed", check)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(server: ServerConfig, auth: AuthConfig | None) -> None:
    """Secure by default: a port other machines can reach needs auth, or `auth: {mode: none}` said on purpose."""
    if auth is None and not is_loopback(server.host):
        raise ConfigError(
            f"server.host {server.host} is reachable from other machines and the config has no auth section: set "
            "auth.tokens_file (or RANKSTREAM_AUTH__TOKENS_FILE), or write `auth: {mode: none}` on purpose "
            "(for example behind a mesh that does mTLS)"
        )


def token_store(auth: AuthConfig | None) -> TokenStore | None:
    if auth is None or auth.mode == "none":
        return None
    try:
        return TokenStore(auth.tokens_file)
    except TokensFileError as error:
        raise ConfigError(str(error)) from None
