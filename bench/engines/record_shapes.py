"""Records what a real vLLM P/D pair answers, for the contract fake (bench/fake_vllm.py).

``python -m bench.engines.record_shapes`` starts a prefill (``kv_producer``) and a
decode (``kv_consumer``) server of the tiny model, sends each kind of request the
vLLM adapter sends, and writes the answers to ``recorded/vllm-<version>.json``:
the prefill leg's answer (its ``kv_transfer_params`` above all), the decode leg's
and a colocated stream's events, ``/v1/models``, ``/tokenize`` and the engine's
refusals. The fake answers in these shapes, so a change in the engine's shapes shows
as a diff of that file. Needs the engine environment (``make test-engines``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.engines import env, servers
from bench.engines.servers import SERVED_MODEL, VllmServer
from bench.fake_vllm import PREFILL_KV_REQUEST

HERE = Path(__file__).resolve().parent
PROMPT = "def handler(request):\n    return request.json()\n" * 12


def post(server: VllmServer, path: str, body: dict[str, Any], request_id: str) -> Any:
    request = urllib.request.Request(  # a local http URL built here
        server.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:  # as above
            raw = answer.read().decode()
            status = int(answer.status)
    except urllib.error.HTTPError as error:
        raw, status = error.read().decode(), int(error.code)
    if body.get("stream"):
        events = [line.removeprefix("data: ") for line in raw.splitlines() if line.strip()]
        return {"status": status, "events": [e if e == "[DONE]" else json.loads(e) for e in events]}
    return {"status": status, "body": json.loads(raw)}


def record(prefill: VllmServer, decode: VllmServer) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": SERVED_MODEL,
        "prompt": PROMPT,
        "temperature": 0,
        "max_tokens": 8,
    }
    chat: dict[str, Any] = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    chat |= {"temperature": 0, "max_tokens": 8}
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    shapes: dict[str, Any] = {}
    leg = {"max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV_REQUEST}
    shapes["prefill_completion"] = post(prefill, "/v1/completions", base | leg, "rec-p1")
    params = shapes["prefill_completion"]["body"]["kv_transfer_params"]
    shapes["decode_completion_stream"] = post(
        decode, "/v1/completions", base | stream | {"kv_transfer_params": params}, "rec-p1"
    )
    chat_leg = leg | {"max_completion_tokens": 1}
    shapes["prefill_chat"] = post(prefill, "/v1/chat/completions", chat | chat_leg, "rec-p2")
    params = shapes["prefill_chat"]["body"]["kv_transfer_params"]
    shapes["decode_chat_stream"] = post(
        decode, "/v1/chat/completions", chat | stream | {"kv_transfer_params": params}, "rec-p2"
    )
    shapes["colocated_completion_stream"] = post(decode, "/v1/completions", base | stream, "rec-c1")
    shapes["models"] = {"status": 200, "body": decode.get_json("/v1/models")}
    shapes["tokenize"] = post(decode, "/tokenize", {"model": SERVED_MODEL, "prompt": PROMPT}, "t")
    too_long = " ".join(str(i) for i in range(3000))
    shapes["refused_prompt_too_long"] = post(
        decode, "/v1/completions", base | {"prompt": too_long}, "rec-e1"
    )
    shapes["refused_max_tokens_too_large"] = post(
        decode, "/v1/completions", base | {"max_tokens": servers.MAX_MODEL_LEN + 100}, "rec-e2"
    )
    shapes["refused_unknown_model"] = post(
        decode, "/v1/completions", base | {"model": "no-such-model"}, "rec-e3"
    )
    for data in shapes["models"]["body"]["data"]:
        data["root"] = "<model folder>"  # a path of the recording machine
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="default: recorded/vllm-<version>.json")
    args = parser.parse_args()
    model = env.ensure_model()
    with tempfile.TemporaryDirectory(prefix="hetero-router-record-") as logs:
        prefill = servers.vllm_server("prefill", model, Path(logs), kv_role="kv_producer")
        decode = servers.vllm_server("decode", model, Path(logs), kv_role="kv_consumer")
        with servers.running(prefill, decode):
            shapes = record(prefill, decode)
            version = decode.get_json("/version")["version"]
    shapes = {"vllm_version": version, **shapes}
    out = args.out or HERE / "recorded" / f"vllm-{version}.json"
    out.write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")
    print(out)


if __name__ == "__main__":
    main()
