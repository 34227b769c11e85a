"""A fake vLLM OpenAI-compatible server with NixlConnector, on 127.0.0.1, port 0.

The vLLM adapter's contract tests run against it, and the benchmarks run it as a
zero-cost engine (bench/fake_engine.py).

It answers like the real engine, in the shapes a real vLLM 0.32 P/D pair answered
(``engines/recorded/``, re-recorded by ``python -m bench.engines.record_shapes``), and
checks what the real engine relies on:

- a prefill leg (``kv_transfer_params.do_remote_decode``) must carry exactly vLLM's
  remote-decode request, ``stream: false``, a one-token limit, no ``stream_options``
  and no ``min_tokens`` above 1 (vLLM refuses a minimum above the limit, so the
  client's own cannot go on this leg); it is answered with a completion whose
  ``kv_transfer_params`` name the blocks to read;
- a decode leg carrying ``kv_transfer_params`` must hand back, unchanged, parameters
  this server issued, and stream;
- both legs must send ``X-Request-Id``.

A request breaking a rule gets a 400, as vLLM would refuse it, and the rule goes to
``violations`` so a test can assert there are none. Like vLLM, it also refuses (400,
vLLM's words, not a violation) a request whose prompt does not fit ``max_model_len``
with its ``max_tokens``; its tokenizer makes one token of each whitespace-separated
word (of the prompt, or of every message's role and content). ``GET /v1/models``
lists the served models with their ``max_model_len``, ``POST /tokenize`` gives a
prompt's (or messages') token ids and ``POST /detokenize`` the text of ids, as vLLM's
do. Every request is recorded, and the ids whose client went away (vLLM's abort) go
to ``disconnected``. The failure modes are plain attributes, set by a test before it
sends.

Its "model" is greedy and exact: the answer to any prompt is ``tokens`` (ids 100,
101, ...), at most ``max_tokens`` of them. A prompt given as token ids (vLLM takes
them) that ends with the first k of those ids continues from token k, so a resumed
request gets exactly the rest of the uninterrupted answer. With ``return_token_ids``
chunks carry their ids and the first one the prompt's ids, as vLLM's do.

A token of ``tokens`` may be raw bytes, written as surrogate escapes (``"\\udcc3"`` is
the byte 0xC3, Python's ``surrogateescape``): a character split across tokens. Text is
then made as vLLM's incremental detokenizer makes it: a token whose bytes leave a
character incomplete adds no text, the one completing it adds the character, and
``/detokenize`` shows an incomplete one as U+FFFD. ``echo_incomplete_prompt`` (on, as
vLLM 0.32 does) keeps that detokenizer's defect: primed with a token-id prompt whose text
ends in an incomplete character, its first text is the whole prompt's with the new one.

It also speaks SGLang's P/D protocol when ``sglang_mode`` names its role (SGLang's
``--disaggregation-mode prefill|decode``): a request carrying ``bootstrap_host``,
``bootstrap_port`` and ``bootstrap_room`` is one leg of an SGLang split, sent to both
engines alike; the prefill engine answers with the first token, the decode engine streams
the answer. The three fields must come together, with a host, a port (or null) and a room
in [0, 2**63 - 1]; a leg breaking that, or sent to an engine with no SGLang role, is a
violation. Neither leg needs ``X-Request-Id`` (SGLang pairs legs by room).

Every generation leg it answers is counted by protocol and role in ``leg_counts``
(bench/fake_legs.py: the counts, and fingerprints of the keys that pair the legs of one
request), which ``GET /fake/legs`` answers, so a benchmark can check that a router it
measures really split. ``POST /v1/completions/render`` (and the chat one), which
vllm-router's default policy calls on every engine for every request, is answered as a
vLLM 0.32 ``vllm serve`` without ``--enable-scale-out`` answers it: 403, and counted.

For the adapters' checks of what engines send, ``stream_override`` replaces a stream's
events, ``prefill_reply`` the prefill answer and ``models_reply`` the listing (any
JSON value, or raw bytes), and ``runaway_chunks`` streams that many chunks in one
write, past ``max_tokens``, as a runaway engine would.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict

from bench import fake_legs

# What a real vLLM P/D pair answered (python -m bench.engines.record_shapes): the fake's
# answers are these, with the fields a test cares about replaced.
RECORDED: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent / "engines" / "recorded" / "vllm-0.32.0.json").read_text()
)

PREFILL_KV_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: CIMultiDict[str]  # header names are case-insensitive (aiohttp sends X-Request-ID)
    body: dict[str, Any] | None
    client_port: int  # tells apart the connections the client used

    @property
    def request_id(self) -> str:
        return self.headers.get("X-Request-Id", "")

    @property
    def is_generation(self) -> bool:
        return self.path in ("/v1/completions", "/v1/chat/completions")

    @property
    def is_prefill(self) -> bool:
        params = (self.body or {}).get("kv_transfer_params") or {}
        return bool(params.get("do_remote_decode"))


@dataclass
class FakeVllm:
    api_key: str | None = None
    # A 401 that quotes the key it refused, as some proxies in front of an engine do.
    refusal_quotes_key: bool = False
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    prompt_tokens: int = 7
    # Prefill behaviour.
    prefill_status: int = 200
    prefill_kv: bool = True  # answer with kv_transfer_params
    prefill_finish_reason: str = "length"
    prefill_delay_s: float = 0.0
    # Decode (and colocated) behaviour.
    decode_status: int = 200
    decode_finish_reason: str = "length"
    chunk_delay_s: float = 0.0  # before each chunk after the first
    one_write: bool = False  # the whole stream in one write (an engine ahead of its reader)
    # vLLM 0.32's first text after a token-id prompt ending in an incomplete character:
    # the prompt's text too (see the module docstring).
    echo_incomplete_prompt: bool = True
    # A decode leg with kv_transfer_params waits this long before its first event: a
    # KV read stalled (a NIXL handshake to a restarted prefill engine).
    handoff_stall_s: float = 0.0
    drop_after: int | None = None  # cut the connection after this many chunks
    end_after: int | None = None  # end the body cleanly (no finish, no [DONE]) after this many
    error_after: int | None = None  # send vLLM's {"error": ...} event after this many
    # A decode leg's kv_transfer_params must be ones this server issued; off when
    # the prefill engine is another process (benchmarks with two fakes).
    verify_issued: bool = True
    # The context length: prompt tokens + max_tokens beyond it are refused.
    max_model_len: int = 131072
    # Probes.
    health_status: int = 200
    model_ids: tuple[str, ...] = ("meta-llama/Llama-3.1-8B-Instruct",)  # /v1/models lists
    models_status: int = 200
    list_max_model_len: bool = True  # off: /v1/models entries without it (an older build)
    tokenize_status: int = 200
    tokenize_reply: Any = None  # answered instead of the count
    tokenize_delay_s: float = 0.0
    metrics_text: str = ""
    # Replies of the wrong shape: see the module docstring.
    stream_override: list[Any] | None = None
    prefill_reply: Any = None
    models_reply: Any = None
    runaway_chunks: int = 0
    # Serves HTTPS with this context (its certificate, and clients it requires).
    ssl_context: ssl.SSLContext | None = None
    # Its role in SGLang's P/D protocol (see the module docstring); None: not in that mode.
    sglang_mode: Literal["prefill", "decode"] | None = None
    # Off: ``requests`` stays empty (a long benchmark would hold every request).
    keep_requests: bool = True

    requests: list[Recorded] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    disconnected: set[str] = field(default_factory=set)
    issued: dict[str, dict[str, Any]] = field(default_factory=dict)
    leg_counts: fake_legs.LegCounts = field(default_factory=fake_legs.LegCounts)

    def __post_init__(self) -> None:
        self._vocabulary: dict[int, str] = {}  # prompt word ids seen, for /detokenize
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/v1/completions/render", self._render)
        app.router.add_post("/v1/chat/completions/render", self._render)
        app.router.add_get("/fake/legs", self._legs)
        # Like vLLM, stop a handler whose client went away: that is how abort works.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, condition: Any, timeout_s: float = 2.0) -> None:
        """Waits until ``condition()`` holds, woken by each request and disconnect."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(condition)

    def legs(self, request_id: str) -> list[Recorded]:
        """The generation legs of one request (completions, chat completions)."""
        return [r for r in self.requests if r.request_id == request_id and r.is_generation]

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _health(self, request: web.Request) -> web.Response:
        await self._record(request, None)
        return web.Response(status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._record(request, None)
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request, None)
        refusal = self._refusal(request)  # vLLM's --api-key guards every /v1 path
        if refusal is not None:
            return refusal
        if self.models_status != 200:
            return _error(self.models_status, "models listing failed")
        if self.models_reply is not None:
            return _reply(self.models_reply)
        entries = []
        for model_id in self.model_ids:
            entry: dict[str, Any] = {"id": model_id, "object": "model", "owned_by": "vllm"}
            if self.list_max_model_len:
                entry["max_model_len"] = self.max_model_len
            entries.append(entry)
        return web.json_response({"object": "list", "data": entries})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self._record(request, body)
        await asyncio.sleep(self.tokenize_delay_s)
        if self.tokenize_reply is not None:
            return web.json_response(self.tokenize_reply)
        if self.tokenize_status != 200:
            return _error(self.tokenize_status, "tokenizer failed")
        if ("messages" in body) == ("prompt" in body):
            return _error(400, "tokenize takes a prompt or messages")
        tokens = self._token_ids(body)
        reply = {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}
        return web.json_response(reply)

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self._record(request, body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return _error(400, "tokens must be a list of token ids")
        return web.json_response({"prompt": self._text(tokens)})

    def _token_ids(self, body: dict[str, Any]) -> list[int]:
        """The fake tokenizer: one id per word (see ``count_tokens``)."""
        if "messages" in body:
            words = [
                word
                for m in body["messages"]
                for word in f"{m.get('role', '')} {m.get('content', '')}".split()
            ]
        else:
            words = str(body.get("prompt", "")).split()
        ids = []
        for word in words:
            token = _WORD_IDS + zlib.crc32(word.encode()) % _WORD_ID_SPAN
            self._vocabulary[token] = word
            ids.append(token)
        return ids

    def _text(self, tokens: list[int]) -> str:
        """The text of ``tokens``, an incomplete character as U+FFFD (as vLLM decodes)."""
        return self._bytes(tokens).decode("utf-8", "replace")

    def _bytes(self, tokens: list[int]) -> bytes:
        return b"".join(_raw(self._piece(t)) for t in tokens)

    def _piece(self, token: int) -> str:
        if token in self._vocabulary:
            return self._vocabulary[token] + " "
        index = token - _OUTPUT_IDS
        return self.tokens[index] if 0 <= index < len(self.tokens) else f"<{token}>"

    async def _record(self, request: web.Request, body: dict[str, Any] | None) -> None:
        headers = CIMultiDict(request.headers)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        port = peer[1] if peer else 0
        if self.keep_requests:
            self.requests.append(Recorded(request.method, request.path, headers, body, port))
        await self._notify()

    async def _legs(self, request: web.Request) -> web.Response:
        return web.json_response(self.leg_counts.as_json())

    async def _render(self, request: web.Request) -> web.Response:
        """vLLM 0.32's answer when its scale-out endpoints are off (the default)."""
        await self._record(request, None)
        self.leg_counts.add(fake_legs.RENDER)
        message = (
            "Scale-out endpoints are disabled. Restart vllm serve with "
            "--enable-scale-out to enable them."
        )
        error = {"message": message, "type": "PermissionDeniedError", "code": 403}
        return web.json_response({"error": error}, status=403)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        await self._record(request, body)
        request_id = request.headers.get("X-Request-Id", "")
        chat = request.path.endswith("/chat/completions")
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        too_long = self._too_long(body)
        if too_long:
            return _error(400, too_long)
        try:
            if any(name in body for name in _BOOTSTRAP_FIELDS):
                return await self._sglang_leg(request, body, chat)
            if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
                return await self._prefill(request_id, body, chat)
            return await self._decode(request, request_id, body, chat)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.add(request_id)
            await asyncio.shield(self._notify())
            raise

    def _refusal(self, request: web.Request) -> web.Response | None:
        """vLLM's answer to a wrong or missing key (``--api-key``), None when it is right."""
        presented = request.headers.get("Authorization", "")
        if self.api_key is None or presented == f"Bearer {self.api_key}":
            return None
        message = f"Unauthorized: {presented}" if self.refusal_quotes_key else "Unauthorized"
        return web.json_response({"error": message}, status=401)

    def _too_long(self, body: dict[str, Any]) -> str | None:
        """vLLM 0.32's refusal of a request its context cannot hold, in its words
        (bench/engines/recorded/); a prompt that fits with fewer than max_tokens left
        is served."""
        tokens, limit = count_tokens(body), self.max_model_len
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        if tokens > limit:
            return (
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt contains at least {limit + 1} input tokens, which exceeds this "
                "limit even without any output tokens. Please reduce the length of the "
                f"input prompt. (parameter=input_tokens, value={limit + 1})"
            )
        if tokens == limit:
            return "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
        if max_tokens > limit:
            return (
                f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})"
            )
        return None

    def _refuse(self, rule: str) -> web.Response:
        self.violations.append(rule)
        self.leg_counts.violations += 1
        return _error(400, rule)

    async def _sglang_leg(
        self, request: web.Request, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        """One leg of SGLang's split: the same body goes to both engines, each its role."""
        rule = _bootstrap_rule_broken(body, self.sglang_mode)
        if rule:
            return self._refuse(rule)
        room = str(body["bootstrap_room"])
        if self.sglang_mode == "prefill":
            self.leg_counts.add(fake_legs.SGLANG_PREFILL, room)
            return await self._first_token(request, body, chat)
        if body.get("stream") is not True:
            self.leg_counts.add(fake_legs.SGLANG_DECODE, room)
            return self._whole_answer(body, chat)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.leg_counts.add(fake_legs.SGLANG_DECODE, room)
        await self._stream_events(request, response, body, chat)
        return response

    async def _first_token(
        self, request: web.Request, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        """An SGLang prefill engine's answer: the first token, streamed if asked."""
        await asyncio.sleep(self.prefill_delay_s)
        if body.get("stream") is not True:
            return self._whole_answer({**body, "max_tokens": 1}, chat)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        content = {"content": self.tokens[0]} if chat else self.tokens[0]
        await response.write(_sse(_chunk(chat, content, "length", None)) + _DONE)
        await response.write_eof()
        return response

    def _whole_answer(self, body: dict[str, Any], chat: bool) -> web.Response:
        """A non-streamed completion of at most ``max_tokens`` of the answer."""
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(self.tokens)
        text = "".join(self.tokens[:limit])
        answer = _recorded("prefill_chat" if chat else "prefill_completion")
        (choice,) = answer["choices"]
        if chat:
            choice["message"]["content"] = text
        else:
            choice["text"] = text
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": min(limit, len(text))}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        answer.update(id="cmpl-x", model=body.get("model"), usage=usage, kv_transfer_params=None)
        return web.json_response(answer)

    async def _prefill(self, request_id: str, body: dict[str, Any], chat: bool) -> web.Response:
        rule = _prefill_rule_broken(request_id, body, chat)
        if rule:
            return self._refuse(rule)
        await asyncio.sleep(self.prefill_delay_s)
        if self.prefill_status != 200:
            return _error(self.prefill_status, "prefill engine failed")
        if self.prefill_reply is not None:
            return _reply(self.prefill_reply)
        remote_request_id = f"cmpl-{request_id}-0"
        params = None
        if self.prefill_kv:
            # vLLM's own keys, remote_block_ids a list (per KV group) of lists.
            params = _recorded("prefill_completion")["kv_transfer_params"]
            params.update(
                remote_block_ids=[[3, 4, 5]],
                remote_engine_id="engine-p0",
                remote_request_id=remote_request_id,
                remote_port=5600,
                remote_num_tokens=self.prompt_tokens,
            )
            self.issued[remote_request_id] = params
        self.leg_counts.add(fake_legs.VLLM_PREFILL, remote_request_id if params else None)
        first = self.tokens[0] if self.prefill_finish_reason == "length" else ""
        answer = _recorded("prefill_chat" if chat else "prefill_completion")
        (choice,) = answer["choices"]
        choice["finish_reason"] = self.prefill_finish_reason
        if chat:
            choice["message"]["content"] = first
        else:
            choice["text"] = first
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": 1}
        usage["total_tokens"] = self.prompt_tokens + 1
        answer.update(
            id=remote_request_id, model=body["model"], usage=usage, kv_transfer_params=params
        )
        return web.json_response(answer)

    async def _decode(
        self, request: web.Request, request_id: str, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        params = body.get("kv_transfer_params")
        if params is not None and self.verify_issued and params not in self.issued.values():
            return self._refuse("decode kv_transfer_params differ from those issued")
        if body.get("stream") is not True:
            return self._refuse("decode leg must stream")
        if not request_id:
            return self._refuse("X-Request-Id missing")
        if self.decode_status != 200:
            return _error(self.decode_status, "decode engine unavailable")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if params is None:
            self.leg_counts.add(fake_legs.PLAIN)
        else:
            key = params.get("remote_request_id") if isinstance(params, dict) else None
            self.leg_counts.add(fake_legs.VLLM_DECODE, str(key))
            await asyncio.sleep(self.handoff_stall_s)
        await self._stream_events(request, response, body, chat)
        return response

    async def _stream_events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        body: dict[str, Any],
        chat: bool,
    ) -> None:
        """Streams the answer's events into a prepared response, with the failure knobs."""
        if self.runaway_chunks:  # everything at once, as fast as the socket takes it
            content = {"content": " x"} if chat else " x"
            chunk = _sse(_chunk(chat, content, None, [_OUTPUT_IDS]))
            last = _sse(_chunk(chat, content, "length", [_OUTPUT_IDS]))
            chunks = self.runaway_chunks
            final = self._final_events(body, chat, chunks)
            await response.write(chunk * (chunks - 1) + last + final)
            await response.write_eof()
            return
        events, drop = self._events(body, chat)
        if self.one_write:
            events = [b"".join(events)]
        for event in events:
            await response.write(event)
            await asyncio.sleep(self.chunk_delay_s)
        if drop:  # the connection dies mid-body, as when an engine process is killed
            transport = request.transport
            if transport is not None:  # None: the client has already gone
                transport.abort()
            return
        await response.write_eof()

    def _events(self, body: dict[str, Any], chat: bool) -> tuple[list[bytes], bool]:
        """The SSE events of one stream, and whether the connection drops after them."""
        if self.stream_override is not None:
            return [_override(event) for event in self.stream_override], False
        events: list[bytes] = []
        if chat:  # vLLM's first chat chunk names the role and has no content
            events.append(_sse(_chunk(chat, {"role": "assistant", "content": ""}, None, None)))
        prompt = body.get("prompt")
        start = _resumed_from(prompt, len(self.tokens)) if isinstance(prompt, list) else 0
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(self.tokens)
        answer = self.tokens[start : start + limit]
        detokenizer = _Detokenizer(
            self._bytes(prompt) if isinstance(prompt, list) else b"", self.echo_incomplete_prompt
        )
        for index, piece in enumerate(answer):
            token = detokenizer.step(piece)
            if index == self.drop_after:
                return events, True
            if index == self.end_after:
                return events, False
            if index == self.error_after:
                # vLLM reports a failure after the 200 as an error event, then [DONE].
                error = {"message": "engine core died", "type": "InternalServerError", "code": 500}
                return [*events, _sse({"error": error}), _DONE], False
            ids = [_OUTPUT_IDS + start + index] if body.get("return_token_ids") else None
            finish = None
            if index == len(answer) - 1:
                cut = start + len(answer) < len(self.tokens)
                finish = "length" if cut else self.decode_finish_reason
            chunk = _chunk(chat, {"content": token} if chat else token, finish, ids)
            if index == 0 and body.get("return_token_ids"):
                chunk["choices"][0]["prompt_token_ids"] = self._prompt_ids(body)
            events.append(_sse(chunk))
        return [*events, self._final_events(body, chat, len(answer))], False

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        return list(prompt) if isinstance(prompt, list) else self._token_ids(body)

    def _final_events(self, body: dict[str, Any], chat: bool, completion_tokens: int) -> bytes:
        """The usage chunk (when asked for) and ``[DONE]``."""
        events = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = body.get("prompt")
            prompt_tokens = len(prompt) if isinstance(prompt, list) else self.prompt_tokens
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            usage["total_tokens"] = prompt_tokens + completion_tokens
            final = _recorded_event(
                "decode_chat_stream" if chat else "decode_completion_stream", -2
            )
            final.update(id="cmpl-x", usage=usage)
            events = _sse(final)
        return events + _DONE


class _Detokenizer:
    """vLLM's incremental detokenizer (tokenizers' DecodeStream) over the fake's pieces:
    the text each token adds, none while the text ends in an incomplete character.

    Primed with a prompt's bytes: the new text starts after the prompt's, less the bytes
    of an incomplete character at its end (which the next tokens complete); with
    ``echo_incomplete`` such a prompt's text is sent too, as vLLM 0.32 does.
    """

    def __init__(self, prompt: bytes, echo_incomplete: bool) -> None:
        complete = len(prompt)
        while complete and _decoded(prompt[:complete]).endswith(_INCOMPLETE):
            complete -= 1
        echoed = echo_incomplete and complete < len(prompt)
        self._held = prompt if echoed else prompt[complete:]  # bytes with no text sent yet

    def step(self, piece: str) -> str:
        data = self._held + _raw(piece)
        text = _decoded(data)
        if text.endswith(_INCOMPLETE):
            self._held = data
            return ""
        self._held = b""
        return text


def _raw(piece: str) -> bytes:
    """A piece's bytes: its characters' UTF-8, and raw bytes written as surrogate escapes."""
    return piece.encode("utf-8", "surrogateescape")


def _decoded(data: bytes) -> str:
    return data.decode("utf-8", "replace")


_INCOMPLETE = "\ufffd"

# The fake tokenizer's ids: the answer's tokens from 100, prompt words from 1000.
_OUTPUT_IDS = 100
_WORD_IDS = 1000
_WORD_ID_SPAN = 1_000_000


def _resumed_from(prompt: list[Any], answer_length: int) -> int:
    """How many of the answer's first ids end a token-id prompt: the longest k for which
    it ends with [100, 101, ..., 100 + k - 1]."""
    for k in range(min(len(prompt), answer_length), 0, -1):
        if prompt[len(prompt) - k :] == list(range(_OUTPUT_IDS, _OUTPUT_IDS + k)):
            return k
    return 0


def _override(event: Any) -> bytes:
    """One event of ``stream_override``: bytes as they are, anything else as JSON data."""
    if isinstance(event, bytes):
        return event
    return f"data: {json.dumps(event)}\n\n".encode()


def _reply(value: Any) -> web.Response:
    """A 200 answer of exactly ``value``: raw bytes, or any JSON value."""
    if isinstance(value, bytes):
        return web.Response(body=value, content_type="application/json")
    return web.json_response(value)


_DONE = b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _chunk(
    chat: bool, content: Any, finish: str | None, token_ids: list[int] | None
) -> dict[str, Any]:
    """A stream event shaped as vLLM's (``token_ids`` null unless asked for)."""
    if chat:
        chunk = _recorded_event("decode_chat_stream", 1)
        chunk["choices"][0]["delta"] = content
    else:
        chunk = _recorded_event("decode_completion_stream", 0)
        chunk["choices"][0]["text"] = content
    chunk["choices"][0].update(finish_reason=finish, token_ids=token_ids)
    chunk["id"] = "cmpl-x"
    return chunk


def _recorded(name: str) -> dict[str, Any]:
    """A fresh copy of a recorded answer's body."""
    body: dict[str, Any] = copy.deepcopy(RECORDED[name]["body"])
    return body


def _recorded_event(name: str, index: int) -> dict[str, Any]:
    event: dict[str, Any] = copy.deepcopy(RECORDED[name]["events"][index])
    return event


def count_tokens(body: dict[str, Any]) -> int:
    """The fake tokenizer: one token per whitespace-separated word of the prompt, or of
    each message's role and content (its chat template adds nothing else); a prompt of
    token ids is as long as its list."""
    if isinstance(body.get("prompt"), list):
        return len(body["prompt"])
    if "messages" in body:
        words = (f"{m.get('role', '')} {m.get('content', '')}" for m in body["messages"])
        return sum(len(text.split()) for text in words)
    return len(str(body.get("prompt", "")).split())


def _error(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "BadRequestError", "code": status}
    return web.json_response({"error": error}, status=status)


_BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
_MAX_ROOM = (1 << 63) - 1


def _bootstrap_rule_broken(body: dict[str, Any], mode: str | None) -> str | None:
    """What is wrong with one leg of an SGLang split, None when nothing is."""
    if mode is None:
        return "SGLang bootstrap fields sent to an engine not in disaggregation mode"
    if not all(name in body for name in _BOOTSTRAP_FIELDS):
        return "bootstrap_host, bootstrap_port and bootstrap_room go together"
    host, port, room = (body[name] for name in _BOOTSTRAP_FIELDS)
    if not isinstance(host, str) or not host:
        return "bootstrap_host must name the prefill engine's host"
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        return "bootstrap_port must be a port number or null"
    if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room <= _MAX_ROOM:
        return "bootstrap_room must be an integer in [0, 2**63 - 1]"
    if "kv_transfer_params" in body:
        return "a leg is SGLang's or vLLM's, not both"
    return None


def _prefill_rule_broken(request_id: str, body: dict[str, Any], chat: bool) -> str | None:
    if not request_id:
        return "X-Request-Id missing"
    if body["kv_transfer_params"] != PREFILL_KV_REQUEST:
        return f"prefill kv_transfer_params {body['kv_transfer_params']} are not vLLM's"
    if body.get("stream") is not False:
        return "prefill must not stream"
    if body.get("max_tokens") != 1:
        return "prefill max_tokens must be 1"
    if chat and body.get("max_completion_tokens", 1) != 1:
        return "prefill max_completion_tokens must be 1"
    if "stream_options" in body:
        return "prefill must not carry stream_options"
    for minimum in ("min_tokens", "min_completion_tokens"):
        # vLLM refuses a minimum above the limit: the client's own minimum cannot go on
        # a one-token prefill, though a minimum of 1 (vllm-router sends it) may.
        if not isinstance(body.get(minimum, 0), int) or body.get(minimum, 0) > 1:
            return f"prefill {minimum} must not exceed its one-token limit"
    if ("messages" in body) != chat or ("prompt" in body) == chat:
        return "prompt belongs to /v1/completions, messages to /v1/chat/completions"
    return None
