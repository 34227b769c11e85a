"""The one error a mock device raises, translated into a gRPC status at its edge."""

from __future__ import annotations


class DeviceError(Exception):
    """A request the device cannot serve; ``code`` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
