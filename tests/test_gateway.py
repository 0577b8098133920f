"""The OpenAI-compatible gateway, driven by the official `openai` SDK and by raw HTTP, in
front of a real tritonserver."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import threading
from urllib.parse import urlparse

import numpy as np
import openai
import pytest

from edgevlm.samples import sample_image
from support import LONG, abandoned_until_cancelled
from edgevlm.serve.tritonserver import free_port

MAX_BODY_MB = 1.0


def data_url(image: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(image).decode()


def user_with_image(text: str, image: bytes) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_url(image)}}]}


@pytest.fixture(scope="module")
def gateway(server, start_gateway):
    return start_gateway(server.grpc_url, "--max-body-mb", str(MAX_BODY_MB), "--max-image-mb", "0.5",
                         ready_status=())


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(base: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/v1/chat/completions", body=payload,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_models_lists_the_served_checkpoint(sdk):
    assert [m.id for m in sdk.models.list().data] == ["tiny"]


def test_sdk_chat_completion_with_an_image_matches_the_grpc_client(sdk, client):
    image = sample_image("chelsea")
    want = client.generate("What is in the image?", image=image, max_tokens=12)
    r = sdk.chat.completions.create(model="tiny", messages=[user_with_image("What is in the image?", image)],
                                    max_tokens=12)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert r.usage.total_tokens == want.prompt_tokens + 12


def test_sdk_streamed_chat_completion_with_an_image(sdk, client):
    image = sample_image("coffee")
    want = client.generate("Describe it.", image=image, max_tokens=16, seed=5, temperature=0.7, top_p=0.9)
    chunks = list(sdk.chat.completions.create(
        model="tiny", messages=[user_with_image("Describe it.", image)], max_tokens=16, seed=5, temperature=0.7,
        top_p=0.9, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == want.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_several_images_each_in_its_message_match_the_grpc_client(sdk, client):
    """Two cameras' frames: the first in an earlier turn, the second in the question; each at
    an <image> placeholder opening its turn."""
    first, second = sample_image("chelsea"), sample_image("camera")
    want = client.generate("<image>\nAnd this one?", image=[first, second], max_tokens=12,
                           history=[("<image>\nWhat is this?", "A cat.")])
    assert want.stats["images"] == 2
    messages = [user_with_image("What is this?", first), {"role": "assistant", "content": "A cat."},
                user_with_image("And this one?", second)]
    r = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens
    # the frames swapped are another request: the order reaches the model
    swapped = client.generate("<image>\nAnd this one?", image=[second, first], max_tokens=12,
                              history=[("<image>\nWhat is this?", "A cat.")])
    assert swapped.text != want.text


def test_conversation_system_and_stop_reach_the_model(sdk, client):
    image = sample_image("astronaut")
    first = client.generate("What is this?", image=image, max_tokens=6).text.strip()
    want = client.generate("And the colours?", image=image, max_tokens=12, history=[("What is this?", first)],
                           system="Answer briefly.").text
    messages = [{"role": "system", "content": "Answer briefly."}, user_with_image("What is this?", image),
                {"role": "assistant", "content": first}, {"role": "user", "content": "And the colours?"}]
    r = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert r.choices[0].message.content == want
    cut = want.strip()[3:6]
    stopped = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[cut])
    assert cut not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"


BAD = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "must be a JSON object"),
    "no messages": ({"model": "tiny", "messages": []}, 400, "'messages' must be a non-empty list"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}, 404,
                      "is not served here"),
    "bad role": ({"model": "tiny", "messages": [{"role": "robot", "content": "Hi"}]}, 400, "role must be"),
    "ends with assistant": ({"model": "tiny", "messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Yo"}]},
                            400, "start and end with a user message"),
    "nine images": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"\xff\xd8\xff")}}] * 9}]}, 400,
        "9 images, over the 8 a request may hold"),
    "a broken second image": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(sample_image("chelsea"))}},
        {"type": "image_url", "image_url": {"url": data_url(b"\xff\xd8\xff")}}]}]}, 400, "image 2: cannot decode"),
    "remote image URL": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.jpg"}}]}]}, 400,
        "remote image URLs are disabled"),
    "file URL": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400, "must be a data: URL"),
    "bad base64": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "not valid base64"),
    "undecodable image": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"},
        {"type": "image_url", "image_url": {"url": data_url(b"GIF89a garbage", "image/gif")}}]}]}, 400,
        "cannot decode image"),
    "oversized image": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"\xff" * 600_000)}}]}]}, 413, "byte limit"),
    "n = 9": ({"model": "tiny", "n": 9, "messages": [{"role": "user", "content": "Hi"}]}, 400, "'n' must be an integer"),
    "tool without a function": ({"model": "tiny", "tools": [{"type": "function"}], "messages": [
        {"role": "user", "content": "Hi"}]}, 400, "tools[0] must be"),
    "max_tokens as string": ({"model": "tiny", "max_tokens": "8", "messages": [{"role": "user", "content": "Hi"}]},
                             400, "max_tokens must be an integer"),
    # numbers are checked as sent: none wraps to int32 or overflows into a 500
    "max_tokens 2**32 + 5": ({"model": "tiny", "max_tokens": 2 ** 32 + 5, "messages": [
        {"role": "user", "content": "Hi"}]}, 400, "max_tokens must be in [1, 1000000], got 4294967301"),
    "max_tokens -2**32 + 7": ({"model": "tiny", "max_tokens": -2 ** 32 + 7, "messages": [
        {"role": "user", "content": "Hi"}]}, 400, "got -4294967289"),
    "seed 2**64 + 1": ({"model": "tiny", "seed": 2 ** 64 + 1, "messages": [{"role": "user", "content": "Hi"}]},
                       400, "seed must be in [0, 9223372036854775807]"),
    "temperature 1e400 as an integer": ({"model": "tiny", "temperature": 10 ** 400, "messages": [
        {"role": "user", "content": "Hi"}]}, 400, "temperature must be a finite number"),
    "body nested 100 000 deep": (b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 400, "nests too deeply"),
    "temperature out of range": ({"model": "tiny", "temperature": -1, "messages": [
        {"role": "user", "content": "Hi"}]}, 400, "temperature must be in"),
    "prompt over the context": ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}, 400,
                                "the context holds 512"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_shaped_errors(gateway, sdk, case):
    body, status, message = BAD[case]
    got_status, got = post(gateway, body)
    assert got_status == status, got
    assert set(got["error"]) == {"message", "type", "param", "code"} and message in got["error"]["message"]
    assert "\n" not in got["error"]["message"]
    assert sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3).usage.completion_tokens == 3


def test_oversized_body_is_refused_with_413(gateway):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * int(MAX_BODY_MB * 2 ** 20)}]})
    status, got = post(gateway, body.encode())
    assert status == 413 and "byte limit" in got["error"]["message"]


def test_sdk_raises_typed_errors(sdk):
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=-1,
                                    stream=True)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])


def test_unknown_route_and_method_answer_in_openai_shape(gateway):
    url = urlparse(gateway)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        conn.request(method, path)
        r = conn.getresponse()
        assert r.status == status and "error" in json.loads(r.read())
    conn.close()


def test_client_going_away_mid_stream_cancels_generation(gateway, server):
    url = urlparse(gateway)

    def abandon(max_tokens):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "tiny", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}),
            headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        assert r.readline().startswith(b"data: {")
        conn.sock.shutdown(2)  # gone without a word
        conn.close()

    delta = abandoned_until_cancelled(server, abandon, LONG)
    assert delta["tokens"] < LONG and delta["cancel_messages"] == 1  # the gateway sent a cancel message


def test_model_server_down_gives_503(start_gateway):
    base = start_gateway(f"127.0.0.1:{free_port()}")
    status, got = post(base, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 503 and got["error"]["code"] == "server_unavailable"


class _OneImage(http.server.BaseHTTPRequestHandler):
    image = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args):
        pass


def test_api_key_and_remote_images_when_enabled(server, client, start_gateway):
    image = sample_image("chelsea")
    _OneImage.image = image
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = start_gateway(server.grpc_url, "--allow-remote-images", "--api-key", "s3cret", ready_status=())
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{httpd.server_port}/cat.jpg"}}]}]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="tiny", messages=messages, max_tokens=4)
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        r = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
        assert r.choices[0].message.content == client.generate("What is in the image?", image=image,
                                                               max_tokens=10).text
    finally:
        httpd.shutdown()


def test_penalties_and_fixed_length_options_reach_the_sampler(sdk):
    """presence/frequency_penalty as OpenAI defines them; vLLM's ignore_eos and min_tokens (what
    aiperf sends for fixed-length answers) through the SDK's extra_body."""
    msgs = [{"role": "user", "content": "Say something."}]
    plain = sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    penalised = sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0,
                                            presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    fixed = sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True, "min_tokens": 24})
    assert fixed.usage.completion_tokens == 24 and fixed.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, extra_body={"min_tokens": 9})


def test_logprobs_through_the_sdk_streamed_and_not(sdk, client):
    msgs = [{"role": "user", "content": "Say something."}]
    got = sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                      logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == 12
    for t in content:  # greedy: the chosen token is the most likely, and probabilities add up to at most 1
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == t.logprob and sum(np.exp([a.logprob for a in t.top_logprobs])) <= 1.0001
    assert bytes(b for t in content for b in t.bytes).decode().strip() == got.choices[0].message.content.strip()
    chunks = list(sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices[0].logprobs is None
    # over gRPC: the same entries (the gateway's template and the client's default are the same prompt)
    grpc_entries = client.generate("Say something.", max_tokens=12, temperature=0.0, logprobs=3).logprobs
    assert [(e["token"], e["logprob"]) for e in grpc_entries] == [(t.token, t.logprob) for t in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be in"):
        sdk.chat.completions.create(model="tiny", messages=msgs, logprobs=True, top_logprobs=21)


def test_n_answers_in_order_and_streamed_by_index(sdk):
    msgs = [{"role": "user", "content": "Describe a sunset."}]
    one = [sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.9, seed=40 + i)
           for i in range(3)]
    got = sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.9, seed=40, n=3)
    assert [c.index for c in got.choices] == [0, 1, 2]
    # choice i samples with seed + i: the same answers one request at a time gives
    assert [c.message.content for c in got.choices] == [o.choices[0].message.content for o in one]
    assert len({c.message.content for c in got.choices}) > 1
    assert got.usage.completion_tokens == 30 and got.usage.prompt_tokens == one[0].usage.prompt_tokens
    text = {0: "", 1: "", 2: ""}
    finished = set()
    for c in sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.9, seed=40, n=3,
                                         stream=True):
        for choice in c.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2} and [text[i] for i in range(3)] == [c.message.content for c in got.choices]
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer in"):
        sdk.chat.completions.create(model="tiny", messages=msgs, n=9)


MOVE = {"type": "function", "function": {
    "name": "move_to", "description": "Drive to a shelf",
    "parameters": {"type": "object", "properties": {"shelf": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["shelf"]}}}
REPORT = {"type": "function", "function": {
    "name": "report", "description": "Report what is seen",
    "parameters": {"type": "object", "properties": {"what": {"type": "string", "maxLength": 12}}, "required": ["what"]}}}


def test_tool_calls_through_the_sdk_named_required_streamed_and_answered(sdk, client):
    msgs = [{"role": "user", "content": "Go to shelf 3."}]
    named = sdk.chat.completions.create(model="tiny", messages=msgs, tools=[MOVE, REPORT], max_tokens=64,
                                        tool_choice={"type": "function", "function": {"name": "move_to"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls  # parallel calls allowed: one or more, each of move_to
    assert calls and all(c.function.name == "move_to" and 1 <= json.loads(c.function.arguments)["shelf"] <= 9
                         for c in calls) and len({c.id for c in calls}) == len(calls)
    call = calls[0]
    required = sdk.chat.completions.create(model="tiny", messages=msgs, tools=[MOVE, REPORT], max_tokens=64,
                                           tool_choice="required", parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls" and len(required.choices[0].message.tool_calls) == 1
    # streamed as OpenAI streams them: the SDK's own accumulator puts the call together
    with sdk.chat.completions.stream(model="tiny", messages=msgs, tools=[MOVE], max_tokens=64,
                                     tool_choice="required", parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert streamed and all(c.function.name == "move_to" and json.loads(c.function.arguments)["shelf"] >= 1
                            for c in streamed)
    # the call and its result in the history: the model answers after them
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
                     *[{"role": "tool", "tool_call_id": c.id, "content": "arrived"} for c in calls]]
    after = sdk.chat.completions.create(model="tiny", messages=follow, tools=[MOVE], tool_choice="none", max_tokens=8)
    assert after.choices[0].message.content and after.choices[0].finish_reason == "length"
    # over gRPC: the same tools, the calls in the result
    result = client.generate("Go to shelf 3.", tools=[MOVE], tool_choice="move_to", parallel_tool_calls=False,
                             max_tokens=64)
    assert result.finish_reason == "tool_calls" and result.tool_calls[0]["name"] == "move_to"


@pytest.mark.parametrize("body,param,message", [
    ({"tools": [MOVE], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
     "names 'fly', which is not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "tools[0] must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?<=look-behind)"}}}}}]}, "tools", "tools:"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"},
                   {"role": "user", "content": "And?"}]}, "messages[1].tool_call_id", "answers no tool call"),
])
def test_bad_tool_requests_are_400_naming_the_field(gateway, sdk, body, param, message):
    status, got = post(gateway, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **body})
    assert status == 400 and got["error"]["param"] == param and message in got["error"]["message"], got
    assert sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2).usage.completion_tokens == 2


def sse_chunks(base: str, body: dict) -> list[dict]:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                     headers={"Content-Type": "application/json"})
        lines = conn.getresponse().read().decode().splitlines()
        return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    finally:
        conn.close()


def test_a_streamed_call_arrives_as_a_name_then_argument_deltas(gateway):
    schema = {"type": "object", "properties": {"what": {"type": "string", "minLength": 6, "maxLength": 10}},
              "required": ["what"]}
    chunks = sse_chunks(gateway, {"model": "tiny", "max_tokens": 64, "tool_choice": "required",
                                  "parallel_tool_calls": False, "messages": [{"role": "user", "content": "Report."}],
                                  "tools": [{"type": "function", "function": {"name": "report", "parameters": schema}}]})
    deltas = [d for c in chunks if c.get("choices") for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == "report" and deltas[0]["id"].startswith("call_")
    pieces = [d["function"]["arguments"] for d in deltas[1:]]
    assert len(pieces) > 1 and 6 <= len(json.loads("".join(pieces))["what"]) <= 10  # several deltas, one object
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices"))  # never as text


def test_call_stream_follows_strings_nesting_and_several_calls():
    from edgevlm_client.openai_api import CallStream
    text = '[{"name":"f","arguments":{"a":"x}],\\"y","b":[1,{"c":2}]}},{"name":"g","arguments":7}]'
    for step in (1, 3, 7, len(text)):
        s, calls = CallStream(), {}
        for k in range(0, len(text), step):
            for d in s.feed(text[k:k + step]):
                c = calls.setdefault(d["index"], ["", ""])
                c[0] = d["function"].get("name", c[0])
                c[1] += d["function"]["arguments"]
        assert {k: (n, json.loads(a)) for k, (n, a) in calls.items()} == {
            0: ("f", {"a": 'x}],"y', "b": [1, {"c": 2}]}), 1: ("g", 7)} and s.state == "done"
    single = CallStream()  # the one-object form a chat template may teach
    deltas = [d for ch in '{"name":"g","parameters":{"z":"}"}}' for d in single.feed(ch)]
    assert deltas[0]["function"]["name"] == "g" and single.state == "done"
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"z": "}"}
