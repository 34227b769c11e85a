"""Target ``grpc_request``: the bytes of a ``Generate`` call's request message.

Decoded as ``GenerateRequest`` (a DecodeError is the door's INVALID_ARGUMENT for an
undecodable message), then checked by :func:`router.api.validation.validate_generate`
and :func:`router.api.validation.validate_service`; an InvalidRequestError is
INVALID_ARGUMENT, anything else would be INTERNAL or UNKNOWN.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from backends._gen.hetero.router.v1 import router_pb2
from router.api.validation import validate_generate, validate_service
from router.errors import InvalidRequestError
from router.scheduling.registry import load_policy
from router.settings import Settings, load_pool

DECODE_REFUSALS: tuple[type[Exception], ...] = (DecodeError,)
REFUSALS: tuple[type[Exception], ...] = (InvalidRequestError,)

_SETTINGS = Settings()
_POOL = load_pool(None)
_SLO_CLASSES = load_policy().slo_classes


def one_input(data: bytes) -> None:
    try:
        message = router_pb2.GenerateRequest.FromString(data)
    except DECODE_REFUSALS:
        return
    try:
        validate_generate(message, _SETTINGS, _POOL.models, _POOL.resolved_default_model)
        validate_service(message, _SLO_CLASSES)
    except REFUSALS:
        return
