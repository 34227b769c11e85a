"""Target ``openai_body``: a body POSTed to /v1/completions or /v1/chat/completions.

The bytes are decoded as the door decodes a body (:func:`router.api.openai_models.read_json`:
UTF-8 JSON, refused with an InvalidRequestError otherwise), then read as each request
model with :func:`router.api.openai_models.parse_body` and checked as the door checks
them: the prompt (for chat, the rendered messages), the sampling parameters as a gRPC
``SamplingParams``, and :func:`router.api.validation.validate_generate`. An
InvalidRequestError is the door's 400; anything else would be a 500.
"""

from __future__ import annotations

import contextlib

from backends._gen.hetero.router.v1 import router_pb2
from router.api import chat_template
from router.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    parse_body,
    read_json,
)
from router.api.validation import validate_generate
from router.errors import InvalidRequestError
from router.settings import Settings, load_pool

REFUSALS: tuple[type[Exception], ...] = (InvalidRequestError,)

_SETTINGS = Settings()
_POOL = load_pool(None)


def one_input(data: bytes) -> None:
    try:
        body = read_json(data)
    except REFUSALS:
        return
    if not isinstance(body, dict):
        return  # the door's 400: the body must be a JSON object
    for chat in (False, True):
        with contextlib.suppress(*REFUSALS):
            _through_the_door(body, chat=chat)


def _through_the_door(body: dict[str, object], *, chat: bool) -> None:
    fields: OpenAIRequest
    if chat:
        chat_fields = parse_body(ChatCompletionRequest, body)
        prompt = chat_template.render(chat_fields.chat_messages())
        fields = chat_fields
    else:
        completion = parse_body(CompletionRequest, body)
        prompt, fields = completion.prompt, completion
    message = router_pb2.GenerateRequest(
        model=fields.model or "", prompt=prompt, sampling=fields.sampling()
    )
    validate_generate(message, _SETTINGS, _POOL.models, _POOL.resolved_default_model)
