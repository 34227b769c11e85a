"""TLS of both doors: the server's certificate, the client certificates mTLS asks for,
and new files taken up without a restart.

Both doors watch the files' modification time, size and inode. The gRPC door asks at
each new handshake (grpc calls its certificate fetcher then), the HTTP door every
``tls_reload_interval_s`` (``HttpTls.reload_if_changed``; a stat of two or three files
per handshake would cost more than the minute it saves). Changed files are checked
before they are used: a pair that does not load (a certificate rewritten before its
key) is logged and the old one kept, until the files change again.

The HTTP door loads the new chain into the SSLContext it listens with, which new
handshakes use; a changed client CA bundle is added to what it trusts (Python's
SSLContext cannot drop a CA: to retire one, restart). The gRPC door takes the whole
new configuration, CA bundle included.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from router.errors import ConfigError
from router.logging import get_logger
from router.settings import TlsFiles

log = get_logger(__name__)

_Loaded = TypeVar("_Loaded")

_Signature = tuple[tuple[int, int, int] | None, ...]


class FileWatch:
    """Says whether files changed (modification time, size, inode) since it last said."""

    def __init__(self, paths: tuple[Path, ...]) -> None:
        self._paths = paths
        self._seen = self._signature()

    def changed(self) -> bool:
        """True once for each change; a missing file counts as a change too."""
        now = self._signature()
        if now == self._seen:
            return False
        self._seen = now
        return True

    def _signature(self) -> _Signature:
        signature: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                stat = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(signature)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The HTTP door's context (TLS 1.2 or later); with a client CA, a client
    certificate it signed is required. ConfigError names a file that does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, files)
    if files.client_ca_file is not None:
        # Only the CA named: ssl.create_default_context would trust the system's too.
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(context: ssl.SSLContext, files: TlsFiles) -> None:
    for path in files.paths:
        if not path.is_file():
            raise ConfigError(f"cannot read TLS file: {path} is not a readable file")
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except OSError as error:  # ssl.SSLError is one too
        raise ConfigError(
            f"cannot load TLS pair {files.cert_file}, {files.key_file}: {error}"
        ) from error
    if files.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca_file)
        except OSError as error:
            raise ConfigError(
                f"cannot load tls_client_ca_file {files.client_ca_file}: {error}"
            ) from error


class HttpTls:
    """The HTTP door's SSLContext and its reload."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._watch = FileWatch(files.paths)
        self.context = server_context(files)

    def reload_if_changed(self) -> bool:
        """Loads changed files into the context; whether it did."""

        def load() -> ssl.SSLContext:
            server_context(self._files)  # the files load together, or nothing changes
            _load(self.context, self._files)
            return self.context

        return _reloaded(self._watch, load, "http") is not None


def _reloaded(watch: FileWatch, load: Callable[[], _Loaded], door: str) -> _Loaded | None:
    """What ``load`` makes of the files when they changed since the last look; None when
    they did not, or when they do not load (logged: the door keeps what it has)."""
    if not watch.changed():
        return None
    try:
        loaded = load()
    except ConfigError as error:
        log.warning("tls files not reloaded: keeping the ones loaded", door=door, reason=str(error))
        return None
    log.info("tls files reloaded", door=door)
    return loaded


def grpc_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """The gRPC door's credentials: the files as they are now, then whatever they become
    (read at the first handshake after a change); with a client CA, a client certificate
    it signed is required."""
    watch = FileWatch(files.paths)
    initial = _grpc_configuration(files)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc at every handshake: None keeps the configuration it has.
        return _reloaded(watch, lambda: _grpc_configuration(files), "grpc")

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=files.client_ca_file is not None
    )


def _grpc_configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """grpc takes PEM bytes and checks them only at a handshake: ssl checks them first."""
    server_context(files)
    try:
        pair = (files.key_file.read_bytes(), files.cert_file.read_bytes())
        ca = None if files.client_ca_file is None else files.client_ca_file.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read TLS file: {error}") from error
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)
