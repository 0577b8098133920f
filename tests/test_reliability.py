"""Reliability on a real tritonserver: a soak of concurrent streams with random prompts,
images and cancellations; a python stub killed mid-stream; the server restarted under a
client; preprocessing fuzzed with random input. Bounded in time and count, loopback only."""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from edgevlm_client import Client, EdgeVLMError, InvalidRequest, Retry, ServerError, ServerUnavailable, Timeout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm.presets import IMAGE_TOKEN_INDEX
from edgevlm.samples import sample_images
from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.requests import Preprocessor, parse_history, sampling_params
from edgevlm.serve.tritonserver import TritonServer
from support import OUTCOMES, RecordingRetry, active, outcomes, settle, wait_until

WORDS = ("cat robot door red open table light what where how many is the a of describe "
         "colour left right near far box person car tree sky ÷ é 猫 🙂").split()
SOAK_REQUESTS = 200
SOAK_CLIENTS = 8
RSS_GROWTH_MB = 64  # after warm-up; a leaked KV cache at tiny size is ~0.1 MB per sequence,
                    # so this catches steady leaks of buffers, stubs or threads, not one sequence


@pytest.fixture(scope="module")
def own_server(start_server, tiny_onnx):
    """A server of this module's own: its metrics and memory see only these tests' requests."""
    with start_server(tiny_onnx, max_sequences=4, default_max_tokens=32) as srv:
        yield srv


def random_request(rng: random.Random, images: dict[str, bytes]) -> dict:
    image = rng.choice([None, None, *images.values(), b"\x89PNG\r\n\x1a\n broken"])
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    req = dict(prompt=prompt, image=image, max_tokens=rng.randint(1, 40),
               temperature=rng.choice([0.0, 0.0, 0.8]), seed=rng.randint(0, 1000),
               cancel_after=rng.randint(1, 5) if rng.random() < 0.25 else None)
    if rng.random() < 0.05:
        req["prompt"] = "word " * 600  # refused by the server: over the context (the client checks numbers itself)
    return req


def run_one(client: Client, req: dict) -> str:
    """complete | cancelled | invalid, or the type of the error a crashed server gave the
    stream (EdgeVLMError: typed); anything untyped fails the soak."""
    req = dict(req)
    cancel_after = req.pop("cancel_after")
    stream = client.stream(req.pop("prompt"), image=req.pop("image"), **req)
    try:
        for n, _ in enumerate(stream, 1):
            if cancel_after and n >= cancel_after:
                stream.close()
                return "cancelled"
    except InvalidRequest:
        return "invalid"
    except EdgeVLMError as e:
        return type(e).__name__
    assert stream.stats["finish_reason"] in ("stop", "length")
    assert 1 <= stream.stats["decode_tokens"] <= req["max_tokens"]
    return "complete"


def test_soak_every_request_ends_cleanly_and_nothing_leaks(own_server):
    """Every request ends complete, cancelled or invalid, the server's counters add up and
    nothing leaks. A tritonserver crash (2.51 has known races; the supervisor restarts it) is
    reported, and then only the clients' side is checked: each of their requests ended in one
    of those ways or with a typed error."""
    images = sample_images()
    client = Client(own_server.grpc_url, timeout_s=60)
    rng = random.Random(1234)
    warmup = [random_request(rng, images) for _ in range(16)]
    with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        list(pool.map(lambda r: run_one(client, r), warmup))
    settle(own_server, len(warmup))
    rss_before = own_server.unleaked_rss_mb()
    before = outcomes(own_server)

    jobs = [random_request(rng, images) for _ in range(SOAK_REQUESTS)]
    restarts = len(own_server.supervisor.restarts)
    with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        futures = [pool.submit(run_one, client, r) for r in jobs]
        endings = [f.result(timeout=120) for f in futures]  # raises on any untyped failure or loss

    crashes = len(own_server.supervisor.restarts) - restarts
    if crashes:  # the server's counters started again at 0: only the clients' side can be checked
        print(f"soak: tritonserver crashed {crashes} time(s) and was restarted; endings {Counter(endings)}; "
              f"its log: {', '.join(map(str, own_server.supervisor.kept_logs))}")
        client.wait_ready(timeout_s=120)
        assert client.generate("Still there?", max_tokens=4).tokens == 4
        return
    typed = [e for e in endings if e not in ("complete", "cancelled", "invalid")]
    assert not typed, f"requests failed without a crash: {Counter(typed)}"

    after = settle(own_server, sum(before[o] for o in OUTCOMES) + len(jobs))
    seen = {o: after[o] - before[o] for o in OUTCOMES}
    assert sum(seen.values()) == len(jobs), f"server finished {seen} for {len(jobs)} requests"
    assert seen["error"] == 0
    assert seen["invalid"] == endings.count("invalid") > 0
    # a cancel can lose the race with the answer's last token: then the server completed it
    assert seen["complete"] >= endings.count("complete") and seen["cancelled"] <= endings.count("cancelled")
    assert seen["cancelled"] > 0
    assert active(own_server) == 0, "a sequence is still active after every request ended"
    growth = own_server.unleaked_rss_mb() - rss_before
    print(f"soak: {len(jobs)} requests, outcomes {seen}, RSS {rss_before:.0f} MiB -> +{growth:.1f} MiB")
    assert growth < RSS_GROWTH_MB, f"server RSS grew {growth:.0f} MiB over {len(jobs)} requests"
    assert client.generate("Still there?", max_tokens=4).tokens == 4


def test_killed_stub_gives_a_typed_error_and_serving_resumes(start_server, tiny_onnx):
    with start_server(tiny_onnx, max_sequences=2, default_max_tokens=8) as srv:
        supervisor, logged = srv.supervisor, srv.messages
        srv.expected_restarts = 1  # this test's own doing: not a crash to report
        client = Client(srv.grpc_url, timeout_s=10, retry=Retry(attempts=6, backoff_s=0.5))
        stream = client.stream("Tell me a long story.", max_tokens=400, temperature=0.8, seed=9)
        it = iter(stream)
        next(it)
        os.kill(srv.stub_pid("mobilevlm"), signal.SIGKILL)
        with pytest.raises((ServerError, ServerUnavailable, Timeout)):
            for _ in it:
                pass
        client.wait_ready(timeout_s=60)
        assert client.generate("Back again?", max_tokens=4).tokens == 4
        assert len(supervisor.restarts) == 1, logged
        assert any("stub of mobilevlm died" in m or "exited" in m for m in logged), logged
        # the dead server's log survives the restart, in a file of its own, named in the message
        [kept] = supervisor.kept_logs
        assert str(kept) in " ".join(logged)
        first_run = kept.read_text(errors="replace")
        assert "successfully loaded 'mobilevlm'" in first_run and first_run.startswith("# edgevlm: ")
        assert first_run.count("Started GRPCInferenceService") == 1  # that run only, not the new one


def test_server_restart_is_ridden_out_by_wait_ready_and_retry(start_server, tiny_onnx, tmp_path):
    first = start_server(tiny_onnx, supervised=False, max_sequences=2, default_max_tokens=8).server
    ports = dict(grpc_port=first.grpc_port, http_port=first.http_port, metrics_port=first.metrics_port)
    assert Client(first.grpc_url, timeout_s=30).generate("Hi", max_tokens=3).tokens == 3
    first.stop()
    second = TritonServer(first.repository, log_path=tmp_path / "second.log", **ports)
    # The server comes back at the moment the client, refused, decides to retry.
    retry = RecordingRetry(attempts=3, backoff_s=0.5, on_retry=lambda i: i == 0 and second.start())
    client = Client(first.grpc_url, timeout_s=30, retry=retry)
    assert not client.health()
    try:
        # sent while nothing listens: refused, retried after the backoff, answered
        assert client.generate("Hi again", max_tokens=3).tokens == 3
        assert len(retry.drawn) == 1
        client.wait_ready(timeout_s=30)
        assert client.generate("And again", max_tokens=3).tokens == 3
    finally:
        second.stop()


@pytest.fixture(scope="module")
def preprocessor(tiny_onnx):
    return Preprocessor(tiny_onnx)


text_or_bytes = st.one_of(st.text(max_size=3000), st.binary(max_size=200))
scalars = st.one_of(st.none(), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=st.one_of(st.none(), st.binary(max_size=512),
                       st.binary(max_size=256).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                       st.binary(max_size=256).map(lambda b: b"\xff\xd8\xff" + b)),
       prompt=text_or_bytes, raw=st.booleans(),
       history=st.one_of(st.none(), text_or_bytes,
                         st.lists(st.tuples(st.text(max_size=40), st.text(max_size=40)), max_size=4)
                         .map(lambda t: __import__("json").dumps(t))),
       system=st.one_of(st.none(), text_or_bytes))
def test_fuzzed_preprocess_gives_a_result_or_a_clean_refusal(preprocessor, image, prompt, raw, history, system):
    try:
        prepared = preprocessor(image, np.array([prompt], dtype=object), raw, history, system)
    except BadRequest as e:
        assert str(e) and "\n" not in str(e)
        return
    ids = prepared.input_ids
    assert ids.dtype == np.int64 and 0 < len(ids) < preprocessor.cfg.text.max_position
    assert len(prepared.images) == (image is not None) == (IMAGE_TOKEN_INDEX in ids)
    for one in prepared.images:
        assert one.pixel_values.dtype == np.float32 and np.isfinite(one.pixel_values).all()
        assert one.tokens == preprocessor.cfg.image_tokens


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k",
                                               "repetition_penalty", "seed"]), scalars),
       shape=st.sampled_from([(1,), (2,), (0,), (1, 1)]),
       stop=st.one_of(st.none(), st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=8)), max_size=6)))
def test_fuzzed_generation_parameters_give_params_or_a_clean_refusal(values, shape, stop):
    inputs = {}
    for name, v in values.items():
        if v is not None:
            dtype = np.bool_ if isinstance(v, bool) else np.float32 if isinstance(v, float) else np.int64
            try:
                inputs[name] = np.full(shape, v, dtype=dtype)
            except OverflowError:
                continue
    if stop is not None:
        inputs["stop"] = np.array(stop, dtype=object)
    try:
        params = sampling_params(inputs, 32)
    except BadRequest as e:
        assert str(e) and "\n" not in str(e)
        return
    assert params.max_tokens >= 1 and params.temperature >= 0 and 0 < params.top_p <= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(min_size=0, max_size=400), image=st.one_of(st.none(), st.binary(max_size=64).map(
    lambda b: b"GIF89a" + b)), max_tokens=st.integers(-5, 40), temperature=st.floats(-1, 3),
    top_p=st.floats(-0.5, 1.5), stop=st.lists(st.text(max_size=5), max_size=3))
def test_fuzzed_requests_through_the_server_answer_or_refuse(own_server, prompt, image, max_tokens, temperature,
                                                              top_p, stop):
    client = Client(own_server.grpc_url, timeout_s=60, retry=Retry(attempts=1))
    restarts = len(own_server.supervisor.restarts)
    try:
        r = client.generate(prompt, image=image, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            stop=stop, seed=1)
    except InvalidRequest as e:
        assert str(e) and "\n" not in str(e)
        return
    except (ServerUnavailable, ServerError, Timeout):
        # typed, as a crash gives them; a crash (reported at the end of the session) and nothing else
        wait_until(lambda: len(own_server.supervisor.restarts) > restarts or None, "a restart explaining the failure")
        client.wait_ready(timeout_s=120)
        return
    assert r.finish_reason in ("stop", "length") and 1 <= r.tokens <= max_tokens


def test_history_parser_refuses_every_malformed_shape():
    for bad in ("{", "[1]", '[["a"]]', '[["a", 1]]', '{"a": "b"}', '[["a", "b", "c"]]', "[" * 5000):
        with pytest.raises(BadRequest):
            parse_history(np.array([bad.encode()], dtype=object))
