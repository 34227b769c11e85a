"""TLS from the router to a backend: the pool file's ``tls`` option, read once at start.

A backend's ``options.tls`` turns TLS on for the router's connections to it::

    tls: true                      # verify the engine against the system's CAs
    tls:
      ca_file: engine-ca.pem       # verify it against this PEM bundle instead
      cert_file: router.pem        # the router's client certificate (mutual TLS) ...
      key_file: router-key.pem     # ... and its private key, unencrypted PEM

The engine's certificate must name the host of the backend's address (a DNS name
or an IP address in its subject alternative names). Every file is read and parsed
here, when the adapter is built, so that a missing or broken one stops the router
at start with the option and the file named, never at the first request.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

OPTION = "tls"
_FIELDS = ("ca_file", "cert_file", "key_file")


@dataclass(frozen=True)
class ClientTLS:
    """A backend's checked ``tls`` option: the context its connections use."""

    context: ssl.SSLContext
    client_certificate: bool  # the router shows one (mutual TLS)

    def explain(self, failure: BaseException, detail: str) -> str:
        """A failed connection's ``detail``, with what TLS may have had to do with it.

        An engine that requires a client certificate and gets none ends the connection
        after a TLS 1.3 handshake the client saw succeed: all the router sees is a
        disconnect, so the likely cause is named.
        """
        if isinstance(failure, aiohttp.ServerDisconnectedError) and not self.client_certificate:
            return (
                f"{detail} (if the engine requires a client certificate, set "
                f"{OPTION}.cert_file and {OPTION}.key_file)"
            )
        return detail


def client_tls(options: Mapping[str, Any]) -> ClientTLS | None:
    """A backend's ``tls`` option, or None for plain connections; ValueError names the
    option and the file at fault."""
    raw = options.get(OPTION)
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{OPTION} must be true or a mapping of {', '.join(_FIELDS)}")
    unknown = sorted(str(key) for key in raw if key not in _FIELDS)
    if unknown:
        raise ValueError(
            f"unknown {OPTION} option(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}"
        )
    files = {name: _read(name, raw.get(name)) for name in _FIELDS}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ValueError(f"{OPTION}.cert_file and {OPTION}.key_file go together")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files["ca_file"] is not None:
        _load_ca(context, raw["ca_file"], files["ca_file"])
    if files["cert_file"] is not None:
        _load_pair(context, raw["cert_file"], files["cert_file"], raw["key_file"])
    return ClientTLS(context, client_certificate=files["cert_file"] is not None)


def _read(name: str, path: object) -> bytes | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise ValueError(f"{OPTION}.{name} must be a file path")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{OPTION}.{name} {path}: {error.strerror}") from None


def _load_ca(context: ssl.SSLContext, path: str, pem: bytes) -> None:
    try:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise ValueError(f"{OPTION}.ca_file {path}: not a PEM certificate bundle") from None


def _load_pair(context: ssl.SSLContext, cert_path: str, cert_pem: bytes, key_path: str) -> None:
    try:
        # Parsed alone first, so that a broken certificate is not blamed on the key.
        ssl.create_default_context().load_verify_locations(cadata=cert_pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise ValueError(f"{OPTION}.cert_file {cert_path}: not a PEM certificate") from None
    try:
        # A password callback that has none: an encrypted key fails here instead of
        # OpenSSL asking for its passphrase on the terminal.
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except (ssl.SSLError, ValueError):
        raise ValueError(
            f"{OPTION}.key_file {key_path}: not an unencrypted PEM private key "
            f"of the certificate in {OPTION}.cert_file"
        ) from None


def _no_password() -> bytes:
    return b""
