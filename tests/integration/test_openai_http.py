"""The OpenAI-compatible door, driven by the official openai SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import structlog

from backends.base import Role
from backends.errors import BackendError
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import eventually


@pytest.fixture
async def sdk(cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{cluster.admin_url}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_models_lists_what_the_pool_serves(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["llama-3.1-8b"]


async def test_completion_with_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(
        model="llama-3.1-8b", prompt="Hello", max_tokens=12, temperature=0, seed=3
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len("Hello") + 1
    assert 1 <= completion.usage.completion_tokens <= 12
    assert isinstance(choice.text, str)


async def test_streamed_completion_matches_the_unstreamed_one(sdk: openai.AsyncOpenAI) -> None:
    options: dict[str, Any] = {"model": "llama-3.1-8b", "prompt": "Stream", "max_tokens": 16,
                               "temperature": 0.7, "seed": 11}  # fmt: skip
    whole = await sdk.completions.create(**options)
    stream = await sdk.completions.create(
        **options, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop")
    assert all(f is None for f in finishes[:-1])


async def test_chat_with_the_sdk_streamed_and_not(sdk: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    whole = await sdk.chat.completions.create(
        model="llama-3.1-8b", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.role == "assistant"
    # The router's chat template: "<|role|>\ncontent\n" per message, then "<|assistant|>\n".
    template = "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(template) + 1
    stream = await sdk.chat.completions.create(
        model="llama-3.1-8b", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


async def post(cluster: Cluster, path: str, body: Any, **headers: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{cluster.admin_url}{path}", json=body, headers=headers)
        await response.read()
        return response


async def test_the_split_is_steered_by_header_or_body(cluster: Cluster) -> None:
    body = {"prompt": "steer", "max_tokens": 6, "temperature": 0}
    split = await post(cluster, "/v1/completions", body, **{"X-Hetero-Disaggregation": "split"})
    colocated = await post(cluster, "/v1/completions", {**body, "disaggregation": "colocated"})
    assert split.headers["X-Hetero-Route"].startswith("split prefill=h100")
    assert colocated.headers["X-Hetero-Route"].startswith("colocated prefill=groq")
    assert (await split.json())["choices"][0]["text"] == (await colocated.json())["choices"][0][
        "text"
    ]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"max_tokens": 5}, "'prompt' must be a string"),
        ("/v1/completions", {"prompt": ""}, "prompt must not be empty"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "'max_tokens' must be at least 1"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens must be between 1"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "'max_tokens' must be int"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "'temperature' must be >= 0"),
        ("/v1/completions", {"prompt": "x", "n": 3}, "only n=1"),
        ("/v1/completions", {"prompt": "x", "disaggregation": "sideways"}, "disaggregation"),
        ("/v1/completions", [1, 2], "JSON object"),
        ("/v1/chat/completions", {"messages": []}, "non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ],
)
async def test_bad_requests_get_400_in_openai_shape_and_reach_no_backend(
    cluster: Cluster, path: str, body: Any, message: str
) -> None:
    response = await post(cluster, path, body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert all(device.requests_received == 0 for device in cluster.devices.values())


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
        ("/v1/completions", {"prompt": "x", "disaggregation": "sideways"}, "disaggregation"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
        ),
    ],
)
async def test_the_error_names_the_parameter_at_fault(
    cluster: Cluster, path: str, body: Any, param: str
) -> None:
    response = await post(cluster, path, body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == param
    assert param in error["message"]
    assert all(device.requests_received == 0 for device in cluster.devices.values())


async def test_optional_fields_the_router_does_not_use_are_accepted(cluster: Cluster) -> None:
    body = {"prompt": "x", "max_tokens": 2, "user": "u-1", "logprobs": None, "echo": False,
            "presence_penalty": 0.0, "logit_bias": {}, "tools": [], "n": 1}  # fmt: skip
    response = await post(cluster, "/v1/completions", body)
    assert response.status == 200


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "required"),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "frequency_penalty", 0.5),
        ("/v1/completions", "logit_bias", {"50256": -100}),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "suffix", "!"),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "presence_penalty", 1.0),
    ],
)
async def test_a_field_the_door_does_not_implement_is_400_naming_it(
    cluster: Cluster, path: str, field: str, value: Any
) -> None:
    body: dict[str, Any] = {"max_tokens": 2, field: value}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    response = await post(cluster, path, body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    assert all(device.requests_received == 0 for device in cluster.devices.values())


async def test_the_sdk_refuses_an_unimplemented_field_with_bad_request(
    sdk: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk.chat.completions.create(
            model="llama-3.1-8b",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert raised.value.param == "tools"
    assert raised.value.code == "unsupported_parameter"


async def test_an_unknown_model_is_404_model_not_found(
    cluster: Cluster, sdk: openai.AsyncOpenAI
) -> None:
    response = await post(cluster, "/v1/completions", {"prompt": "x", "model": "n" * 20_000})
    assert response.status == 404
    error = (await response.json())["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert len(error["message"]) < 200  # the name is cut, not echoed whole
    with pytest.raises(openai.NotFoundError):
        await sdk.completions.create(model="nope", prompt="x")
    assert all(device.requests_received == 0 for device in cluster.devices.values())


async def test_one_model_is_read_by_its_id(cluster: Cluster, sdk: openai.AsyncOpenAI) -> None:
    model = await sdk.models.retrieve("llama-3.1-8b")
    assert (model.id, model.object) == ("llama-3.1-8b", "model")
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("nope")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{cluster.admin_url}/v1/models/{'x' * 5000}") as response,
    ):
        assert response.status == 404
        error = (await response.json())["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert len(error["message"]) < 200


async def raw_request(cluster: Cluster, head: bytes, body: bytes = b"") -> tuple[int, Any]:
    """Sends bytes as they are (no client library cleans them up); the status and JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.daemon.http_port)
    try:
        writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        writer.write(body)
        reply = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


SURROGATE = b'"\\ud800"'  # JSON's escape for a lone surrogate, as a client may send it
DEEP = b"[" * 100_000 + b"]" * 100_000
TEXT_PART = b'[{"type":"text","text":5}]'
CODES = {"value": "invalid_value", "type": "invalid_type", "json": "invalid_json"}
# Name: (path, body, Content-Type parameters, param, code); each was once a 500 or served.
HOSTILE: dict[str, tuple[str, bytes, str, str | None, str]] = {
    "surrogate prompt": ("completions", b'{"prompt":' + SURROGATE + b"}", "", "prompt", "value"),
    "surrogate stop": ("completions", b'{"prompt":"x","stop":' + SURROGATE + b"}", "", "stop",
                       "value"),
    "surrogate model": ("completions", b'{"prompt":"x","model":' + SURROGATE + b"}", "", "model",
                        "value"),
    "surrogate content": ("chat/completions",
                          b'{"messages":[{"role":"user","content":' + SURROGATE + b"}]}", "",
                          "messages[0].content", "value"),
    "not utf-8": ("completions", b'{"prompt":"\xbc"}', "", None, "json"),
    "unknown charset": ("completions", b'{"prompt":"x"}', "; charset=hc", None, "json"),
    "top_p of 401 digits": ("completions", b'{"prompt":"x","top_p":1' + b"0" * 400 + b"}", "",
                            "top_p", "value"),
    "max_tokens of 5000 digits": ("completions",
                                  b'{"prompt":"x","max_tokens":' + b"9" * 5000 + b"}", "",
                                  "max_tokens", "value"),
    "nested 100000 deep": ("completions", b'{"prompt":' + DEEP + b"}", "", None, "json"),
    "disaggregation [0.0]": ("completions", b'{"prompt":"x","disaggregation":[0.0]}', "",
                             "disaggregation", "type"),
    "disaggregation {a:1}": ("completions", b'{"prompt":"x","disaggregation":{"a":1}}', "",
                             "disaggregation", "type"),
    "disaggregation {}": ("completions", b'{"prompt":"x","disaggregation":{}}', "",
                          "disaggregation", "type"),
    "n true": ("completions", b'{"prompt":"x","n":true}', "", "n", "type"),
    "max_tokens 2**63": ("completions", b'{"prompt":"x","max_tokens":%d}' % 2**63, "",
                         "max_tokens", "value"),
    "max_tokens -3": ("completions", b'{"prompt":"x","max_tokens":-3}', "", "max_tokens",
                      "value"),
    "NaN": ("completions", b'{"prompt":"x","temperature":NaN}', "", None, "json"),
    "text part 5": ("chat/completions",
                    b'{"messages":[{"role":"user","content":' + TEXT_PART + b"}]}", "",
                    "messages[0].content", "type"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_bodies_get_400_naming_the_parameter_with_no_trace_logged(
    cluster: Cluster, case: str
) -> None:
    path, body, content_type, param, code = HOSTILE[case]
    head = (
        f"POST /v1/{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json{content_type}\r\n"
    )
    with structlog.testing.capture_logs() as logs:
        status, reply = await raw_request(cluster, head.encode(), body)
    assert status == 400
    error = reply["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["code"] == CODES[code]
    assert len(error["message"]) < 200
    assert [event for event in logs if event["log_level"] in ("error", "critical")] == []
    assert all(device.requests_received == 0 for device in cluster.devices.values())


@pytest.mark.parametrize(
    "header", ["X-Request-Id", "X-Hetero-SLO-Class", "X-Hetero-Disaggregation"]
)
async def test_a_header_that_is_no_utf8_is_400_naming_it(cluster: Cluster, header: str) -> None:
    # aiohttp reads such bytes as lone surrogates (surrogateescape), which protobuf refuses.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + header.encode() + b": a\xff\xfe\r\n"
    with structlog.testing.capture_logs() as logs:
        status, reply = await raw_request(cluster, head, b'{"prompt": "x", "max_tokens": 2}')
    assert status == 400
    assert reply["error"]["param"] == header
    assert [event for event in logs if event["log_level"] == "error"] == []
    assert all(device.requests_received == 0 for device in cluster.devices.values())


async def test_a_header_in_utf8_is_served_and_echoed_as_sent(cluster: Cluster) -> None:
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: é-1\r\n".encode()
    status, reply = await raw_request(cluster, head, b'{"prompt": "x", "max_tokens": 2}')
    assert status == 200
    assert reply["id"].endswith("é-1")


async def test_a_bad_header_number_is_400_naming_the_header(cluster: Cluster) -> None:
    response = await post(
        cluster, "/v1/completions", {"prompt": "x"}, **{"X-Hetero-Priority": "9" * 5000}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "X-Hetero-Priority"
    assert len(error["message"]) < 200


async def test_invalid_json_is_400(cluster: Cluster) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{cluster.admin_url}/v1/completions", data=b"{oops") as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert "not valid JSON" in error["message"]
    assert error["code"] == "invalid_json"


async def test_no_backend_is_503(cluster: Cluster) -> None:
    for device in cluster.devices.values():
        await device.stop(grace_s=0)
    await cluster.daemon.health.check_all()
    response = await post(cluster, "/v1/completions", {"prompt": "x"})
    assert response.status == 503
    assert "no healthy backend" in (await response.json())["error"]["message"]


async def test_a_client_leaving_a_stream_aborts_the_backend_work() -> None:
    cluster = await start_cluster(time_scale=1.0)
    try:
        body = {"prompt": "long", "max_tokens": 3000, "stream": True, "disaggregation": "split"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{cluster.admin_url}/v1/completions", json=body) as response,
        ):
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: ")
            assert any(used for used, _ in cluster.kv_in_use().values())
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


async def test_a_request_no_device_can_hold_is_400_before_any_device_sees_it() -> None:
    cluster = await start_cluster(device_options={"kv_capacity_tokens": 64})
    try:
        response = await post(cluster, "/v1/completions", {"prompt": "x" * 40, "max_tokens": 100})
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert "needs 140 KV tokens" in error["message"]
        assert "holds 64; lower max_tokens" in error["message"]
        assert all(d.requests_received == 0 for d in cluster.devices.values())
    finally:
        await stop_cluster(cluster)


def events(body: str) -> list[Any]:
    """The payloads of a server-sent event stream, ``[DONE]`` as the string it is."""
    payloads = [event.removeprefix("data: ") for event in body.split("\n\n") if event]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stream_failing_after_its_first_token_ends_with_an_error_event_not_done(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    real = cluster.daemon.dispatcher.generate

    async def fails_after_a_frame(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(real(*args, **kwargs)) as frames:
            yield await anext(frames)
        raise BackendError("groq-0", "connection lost")

    monkeypatch.setattr(cluster.daemon.dispatcher, "generate", fails_after_a_frame)
    body: dict[str, Any] = {"max_tokens": 8, "temperature": 0, "stream": True}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "fail me"}]
    else:
        body["prompt"] = "fail me"
    response = await post(cluster, path, body)
    assert response.status == 200
    first, *rest = events(await response.text())
    assert first["choices"]
    assert rest == [
        {
            "error": {
                "message": "backend groq-0: connection lost",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    ]


async def test_the_sdk_raises_on_a_stream_whose_decode_device_dies() -> None:
    cluster = await start_cluster([("groq-0", Role.DECODE, "groq-lpu")], time_scale=1.0)
    sdk = openai.AsyncOpenAI(base_url=f"{cluster.admin_url}/v1", api_key="unused", max_retries=0)
    received: list[str] = []

    async def read_while_the_device_dies() -> None:
        stream = await sdk.completions.create(
            model="llama-3.1-8b", prompt="die midway", max_tokens=4000, stream=True
        )
        async for chunk in stream:
            if not received:
                await cluster.devices["groq-0"].stop(grace_s=0)
            received.append(chunk.choices[0].text)

    try:
        with pytest.raises(openai.APIError) as raised:
            await read_while_the_device_dies()
    finally:
        await sdk.close()
        await stop_cluster(cluster)
    assert 1 <= len(received) < 4000
    assert type(raised.value) is openai.APIError  # an error event, not a cut connection
    assert "groq-0" in raised.value.message
    assert raised.value.type == "server_error"


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"prompt": "x", "max_tokens": 5000}, {}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, {}, "top_p"),
        ({"prompt": ""}, {}, "prompt"),
        ({"prompt": "x"}, {"X-Request-Id": "r" * 200}, "X-Request-Id"),
        ({"prompt": "x"}, {"X-Hetero-Priority": "10"}, "X-Hetero-Priority"),
    ],
)
async def test_a_limit_checked_after_parsing_names_the_parameter_too(
    cluster: Cluster, body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    response = await post(cluster, "/v1/completions", body, **headers)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["param"], error["code"]) == (param, "invalid_value")
