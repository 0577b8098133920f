"""Continuous batching through the real tritonserver: streams decoded together give the text
each gives alone, a full model answers UNAVAILABLE "busy" at once (429 + Retry-After through
the gateway) and serves again when load drops, and the scheduler's metrics add up."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
from edgevlm_client import AsyncClient, Client, Retry, ServerBusy

from edgevlm.samples import sample_image
from support import LONG, OUTCOMES, RecordingRetry, active, outcomes, settle, wait_until

BUSY = re.compile(r"^busy: 1 sequences active, 0 queued$")


def metric(server, name: str) -> float:
    return server.metrics().get(f'{name}{{model="mobilevlm"}}', 0.0)


def test_concurrent_streams_each_give_their_text_alone(server, client):
    """Different prompts, lengths, images and sampling settings in flight together (the
    server decodes them in shared steps) against the same requests one at a time."""
    jobs = [dict(prompt="Describe it.", image=sample_image("coffee"), max_tokens=20),
            dict(prompt="What is in the image?", image=sample_image("chelsea"), max_tokens=31),
            dict(prompt="Tell me a story about a robot and a cat.", max_tokens=27),
            dict(prompt="Hi", max_tokens=9, temperature=0.9, seed=4),
            dict(prompt="Count.", max_tokens=24, repetition_penalty=1.2),
            dict(prompt="Name three colours.", max_tokens=15, temperature=0.7, top_p=0.8, seed=11)]
    alone = [client.generate(**job).text for job in jobs]
    steps_before = metric(server, "edgevlm_decode_steps_total")
    rows_before = metric(server, "edgevlm_decode_step_rows_total")

    async def together():
        async with AsyncClient(server.grpc_url, timeout_s=120) as ac:
            return await asyncio.gather(*[ac.generate(**job) for job in jobs])
    results = asyncio.run(together())
    assert [r.text for r in results] == alone
    settle(server, 0)
    steps = metric(server, "edgevlm_decode_steps_total") - steps_before
    rows = metric(server, "edgevlm_decode_step_rows_total") - rows_before
    # every generated token after a prefill's first came from a decode row, and rows shared steps
    assert rows == sum(r.tokens - 1 for r in results)
    assert rows > steps > 0


@pytest.fixture(scope="module")
def one_slot(start_server, tiny_onnx):
    """A server that decodes one sequence and queues none: the second request is refused."""
    with start_server(tiny_onnx, max_sequences=1, max_queue=0, default_max_tokens=8) as srv:
        yield srv


def _occupied(srv):
    """Start a long generation and take its first text: the only slot is taken until it ends
    or is closed. Returns (stream, its iterator): dropping the iterator would close the stream."""
    stream = Client(srv.grpc_url, timeout_s=60).stream("Tell me a long story.", max_tokens=LONG)
    it = iter(stream)
    next(it)
    return stream, it


def _while_occupied(srv, probe, attempts: int = 3):
    """Run probe() while a long generation holds the only slot; returns its first refusal.
    The generation may end before the probe on a fast enough machine, so one attempt in
    `attempts` must be refused; a model that never refuses fails them all."""
    for _ in range(attempts):
        settle(srv, 0)
        stream, _it = _occupied(srv)
        try:
            refusal = probe()
        finally:
            stream.close()
        if refusal is not None:  # a refusal itself shows the slot was taken
            return refusal
    raise AssertionError("the model never refused a request while its only slot was taken")


def test_a_full_model_refuses_at_once_then_serves_when_load_drops(one_slot):
    no_retry = Client(one_slot.grpc_url, timeout_s=60, retry=Retry(attempts=1))

    def probe():
        try:
            no_retry.generate("Hi", max_tokens=2)
        except ServerBusy as e:
            return str(e)
    assert BUSY.match(_while_occupied(one_slot, probe))
    wait_until(lambda: active(one_slot) == 0, "the slot to be freed")
    assert no_retry.generate("Hi", max_tokens=2).tokens == 2  # load dropped: served
    assert metric(one_slot, "edgevlm_queued_requests") == 0
    assert outcomes(one_slot)["refused"] >= 1


def test_the_gateway_answers_a_full_model_with_429_and_retry_after(one_slot, start_gateway):
    gateway = start_gateway(one_slot.grpc_url)
    body = json.dumps({"model": Client(one_slot.grpc_url).metadata().model_name, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()

    def post():
        request = urllib.request.Request(gateway + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=60).close()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After"), json.loads(e.read())["error"]
    assert post() is None  # warm: the gateway has asked the server for its model once
    status, retry_after, error = _while_occupied(one_slot, post)
    assert (status, retry_after, error["code"]) == (429, "1", "server_busy")
    assert BUSY.search(error["message"].removeprefix("model server busy: ")), error


def test_the_clients_retry_rides_out_a_full_model(one_slot):
    """Refused busy, the default client retries; the slot is freed the moment it decides to."""
    settle(one_slot, 0)
    holder = {}

    def free_the_slot(i):
        holder["stream"].close()
        wait_until(lambda: active(one_slot) == 0, "the slot to be freed")
    for _ in range(3):
        holder["stream"], holder["it"] = _occupied(one_slot)
        retry = RecordingRetry(attempts=3, backoff_s=0.2, on_retry=free_the_slot)
        result = Client(one_slot.grpc_url, timeout_s=60, retry=retry).generate("Hi", max_tokens=3)
        holder["stream"].close()
        if retry.drawn:  # refused once while the slot was taken, then served
            break
    else:
        raise AssertionError("no request was refused while the only slot was taken")
    assert result.tokens == 3 and len(retry.drawn) == 1


def test_metrics_add_up_under_mixed_load(server):
    """Complete, cancelled and invalid requests at once: every one counted once, the gauges
    back to zero, tokens equal to what the clients received."""
    settle(server, 0)
    before = outcomes(server)
    rng = np.random.default_rng(3)

    async def run():
        async with AsyncClient(server.grpc_url, timeout_s=120) as ac:
            async def complete(i):
                return (await ac.generate(f"Question {i}?", max_tokens=int(rng.integers(4, 30)))).tokens

            async def cancelled(i):
                stream = ac.stream(f"Long story {i}.", max_tokens=LONG)
                async for _ in stream:
                    break
                await stream.aclose()
                return 0

            async def invalid(i):  # refused by the server: over the context
                try:
                    await ac.generate(f"Bad {i} " + "word " * 600, max_tokens=4)
                except Exception:
                    return 0
            kinds = [complete] * 8 + [cancelled] * 3 + [invalid] * 3
            return await asyncio.gather(*[k(i) for i, k in enumerate(kinds)])
    got = asyncio.run(run())
    after = settle(server, sum(before[o] for o in OUTCOMES) + 14)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["invalid"] == 3 and delta["error"] == 0
    # a cancelled stream may finish before the server hears of it: then it counts as complete
    assert delta["complete"] + delta["cancelled"] == 11 and delta["complete"] >= 8
    assert delta["tokens"] >= sum(got)
    assert active(server) == 0 and metric(server, "edgevlm_queued_requests") == 0
