"""Server TLS from files, re-read when they change (cert-manager rotates them in place).

grpc's dynamic server credentials ask for the certificate configuration at each new handshake;
we answer with a new one only when a file's stamp changed, so rotation needs no restart and an
unchanged file costs three stats a handshake. A file that turns unreadable keeps the last good
configuration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from rankstream_server.config import ConfigError, TlsConfig

log = logging.getLogger(__name__)


class CertificateFiles:
    def __init__(self, tls: TlsConfig):
        self._paths = [Path(p) for p in (tls.key_file, tls.cert_file, tls.client_ca_file) if p]
        self._tls = tls
        self.reloads = 0
        try:
            self._stamps = self._read_stamps()
            self._initial = self._configuration()
        except (OSError, ValueError) as error:
            raise ConfigError(f"server.tls: cannot read the certificate files ({error})") from None

    def _read_stamps(self) -> list[tuple[int, int, int]]:
        return [(s.st_ino, s.st_mtime_ns, s.st_size) for s in (p.stat() for p in self._paths)]

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        tls = self._tls
        client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        return grpc.ssl_server_certificate_configuration(
            [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())], root_certificates=client_ca
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc at each handshake: a new configuration when the files changed, else None."""
        try:
            stamps = self._read_stamps()
            if stamps == self._stamps:
                return None
            configuration = self._configuration()
        except Exception as error:  # noqa: BLE001 - mid-rotation or gone: keep serving the last good one
            log.warning("TLS files not reloaded (%s); serving the previous certificate", error)
            return None
        self._stamps = stamps
        self.reloads += 1
        log.info("TLS certificate files reloaded")
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self._tls.client_ca_file is not None
        )
