"""The client package against a real tritonserver: sync and asyncio streaming, images in
every accepted form, metadata, retries, timeouts, TLS, the CLI, and its install footprint."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from edgevlm_client import (TLS, AsyncClient, Client, InvalidRequest, Retry, ServerUnavailable,
                            Timeout)
from PIL import Image

from edgevlm.samples import sample_image
from edgevlm.serve.tritonserver import GrpcTLS, free_port
from support import LONG, RecordingRetry, abandoned_until_cancelled

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edgevlm_client.cli"]


def test_sync_stream_and_generate_agree(client):
    image = sample_image("chelsea")
    stream = client.stream("What is in the image?", image=image, max_tokens=16)
    deltas = list(stream)
    result = client.generate("What is in the image?", image=image, max_tokens=16)
    assert len(deltas) > 1 and "".join(deltas) == stream.text == result.text
    assert result.tokens == 16 and result.finish_reason == "length" and result.prompt_tokens > 16


def test_async_stream_and_generate_match_the_sync_client(server, client):
    image = sample_image("coffee")
    want = client.generate("Describe it.", image=image, max_tokens=16).text

    async def run():
        async with AsyncClient(server.grpc_url, timeout_s=60) as ac:
            stream = ac.stream("Describe it.", image=image, max_tokens=16)
            deltas = [d async for d in stream]
            result = await ac.generate("Describe it.", image=image, max_tokens=16)
            many = await asyncio.gather(*[ac.generate("Describe it.", image=image, max_tokens=16) for _ in range(4)])
            return deltas, stream, result, many

    deltas, stream, result, many = asyncio.run(run())
    assert "".join(deltas) == stream.text == result.text == want
    assert [r.text for r in many] == [want] * 4 and result.tokens == 16


def test_async_early_close_cancels_on_the_server(server):
    endings = []

    async def run(max_tokens):
        async with AsyncClient(server.grpc_url, timeout_s=60) as ac:
            async with ac.stream("Tell me a long story.", max_tokens=max_tokens) as stream:
                n = 0
                async for _ in stream:
                    n += 1
                    if n == 2:
                        break
            endings.append(stream.stats.get("finish_reason"))

    delta = abandoned_until_cancelled(server, lambda n: asyncio.run(run(n)), LONG)
    assert 2 <= delta["tokens"] < LONG
    # stopped by a cancel message on the stream: its final response (with stats) arrived
    assert endings[-1] == "cancelled" and delta["cancel_messages"] == 1


def test_async_chat_answers_a_follow_up_like_the_sync_chat(server, client):
    image = sample_image("astronaut")
    sync_chat = client.chat(image=image, max_tokens=8)
    want = [sync_chat.ask("What is in the image?").text, sync_chat.ask("What colour is it?").text]

    async def run():
        async with AsyncClient(server.grpc_url, timeout_s=60) as ac:
            chat = ac.chat(image=image, max_tokens=8)
            first = await chat.ask("What is in the image?")
            second = "".join([d async for d in chat.stream("What colour is it?")])
            return [first.text, second], chat.turns

    got, turns = asyncio.run(run())
    assert got == want and len(turns) == 2 and turns[0][0] == "What is in the image?"


def test_images_as_path_bytes_pil_and_numpy_give_the_same_answer(client, tmp_path):
    jpeg = sample_image("chelsea")
    path = tmp_path / "cat.jpg"
    path.write_bytes(jpeg)
    pil = Image.open(io.BytesIO(jpeg))
    forms = {"path": path, "str path": str(path), "bytes": jpeg, "PIL": pil, "numpy": np.asarray(pil.convert("RGB"))}
    answers = {name: client.generate("What is this?", image=img, max_tokens=12).text for name, img in forms.items()}
    assert len(set(answers.values())) == 1, answers
    assert answers["path"] != client.generate("What is this?", max_tokens=12).text  # the image mattered


@pytest.mark.parametrize("image,reason", [
    ("/nonexistent/cat.jpg", "cannot read image /nonexistent/cat.jpg"),
    (b"%PDF-1.7 not an image", "unsupported image type"),
    (b"", "empty"),
    (np.zeros((8, 8, 3), np.float32), "image array must be uint8"),
    (np.zeros((8, 8, 5), np.uint8), "image array must be uint8"),
    (12345, "unsupported image type int"),
])
def test_bad_images_are_refused_before_sending(image, reason):
    dead = Client(f"127.0.0.1:{free_port()}")  # nothing listens: the refusal must be local
    with pytest.raises(InvalidRequest, match=re.escape(reason)):
        dead.generate("What is this?", image=image)


def test_unsupported_file_type_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InvalidRequest, match="unsupported image type"):
        Client(f"127.0.0.1:{free_port()}").generate("Hi", image=text)


def test_metadata_describes_the_served_model(server, client):
    info = client.metadata()
    assert (info.name, info.model_name, info.max_context, info.image_tokens) == ("mobilevlm", "tiny", 512, 16)
    assert info.image_size == 112 and info.max_sequences == 4 and info.default_max_tokens == 32
    assert {"image", "prompt", "history", "system", "stop"} <= set(info.inputs)

    async def run():
        async with AsyncClient(server.grpc_url) as ac:
            return await ac.metadata()
    assert asyncio.run(run()) == info


def test_unreachable_server_retries_with_backoff_then_raises_unavailable():
    url = f"127.0.0.1:{free_port()}"
    for call in (lambda retry: Client(url, retry=retry).generate("Hi"),
                 lambda retry: asyncio.run(AsyncClient(url, retry=retry).generate("Hi")),
                 lambda retry: Client(url, retry=retry).metadata()):
        retry = RecordingRetry(attempts=3, backoff_s=0.2)
        with pytest.raises(ServerUnavailable) as e:
            call(retry)
        assert retry.drawn == [0.2, 0.4], "not retried twice with a doubling backoff"
        assert e.value.__cause__ is not None  # raised from the tritonclient / grpc error
    assert not Client(url).health()
    with pytest.raises(ServerUnavailable, match="not ready after"):
        Client(url).wait_ready(timeout_s=0.5)


def test_timeout_is_typed_and_cancels_the_request(server, client):
    with pytest.raises(Timeout, match="no response within"):
        client.generate("Tell me a long story.", max_tokens=300, timeout_s=0.001)
    assert client.generate("Hi", max_tokens=4).tokens == 4


def test_server_dying_mid_stream_raises_without_retrying(start_server, tiny_onnx):
    with start_server(tiny_onnx, supervised=False, max_sequences=1, default_max_tokens=32) as srv:
        retry = RecordingRetry(attempts=3, backoff_s=0.01)
        stream = Client(srv.grpc_url, timeout_s=60, retry=retry).stream("Tell me a long story.", max_tokens=LONG)
        it = iter(stream)
        next(it)
        next(it)
        os.killpg(srv.proc.pid, 9)
        with pytest.raises(ServerUnavailable):
            for _ in it:
                pass
        assert retry.drawn == [], "a request that had streamed text was sent again"
        assert stream.text


def test_grpc_over_mutual_tls(start_server, tiny_onnx, certs):
    tls = GrpcTLS(certs["server.pem"], certs["server.key"], client_ca=certs["ca.pem"])
    with start_server(tiny_onnx, tls=tls, max_sequences=2, default_max_tokens=8) as srv:
        ok = Client(srv.grpc_url, timeout_s=30,
                    tls=TLS(certs["ca.pem"], certs["client.pem"], certs["client.key"]))
        assert ok.health() and ok.generate("Hi", max_tokens=4).tokens == 4

        async def run():
            async with AsyncClient(srv.grpc_url, tls=TLS(certs["ca.pem"], certs["client.pem"],
                                                         certs["client.key"])) as ac:
                return await ac.generate("Hi", max_tokens=4)
        assert asyncio.run(run()).tokens == 4
        # plaintext, and TLS without a client certificate, are both turned away
        no_retry = Retry(attempts=1)
        for bad in (Client(srv.grpc_url, retry=no_retry, timeout_s=10),
                    Client(srv.grpc_url, retry=no_retry, timeout_s=10, tls=TLS(certs["ca.pem"]))):
            assert not bad.health()
            with pytest.raises(ServerUnavailable):
                bad.generate("Hi", max_tokens=4)


def test_tls_options_are_checked():
    with pytest.raises(ValueError, match="no such file"):
        TLS("/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="go together"):
        TLS(client_cert=__file__)


def test_cli_bench_reports_latency_percentiles_as_json(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(CLI + ["--url", server.grpc_url, "bench", "-n", "6", "-c", "3", "--max-tokens", "8",
                              "--json", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report == json.loads(out.read_text())
    assert report["ok"] == 6 and report["errors"] == {} and report["tokens"] == 48
    for key in ("ttft_ms", "itl_ms", "tok_s", "e2e_ms"):
        stats = report[key]
        assert stats["n"] > 0 and 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], (key, stats)
    table = subprocess.run(CLI + ["--url", server.grpc_url, "bench", "-n", "2", "-c", "2", "--max-tokens", "4"],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "TTFT ms" in table.stdout and "p99" in table.stdout


def test_cli_health_names_the_model(server):
    r = subprocess.run(CLI + ["--url", server.grpc_url, "health"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ready" in r.stdout and "serves tiny" in r.stdout
    dead = subprocess.run(CLI + ["--url", f"127.0.0.1:{free_port()}", "health"], capture_output=True, text=True,
                          timeout=60)
    assert dead.returncode == 1 and "not ready" in dead.stdout


def test_cli_chat_keeps_the_conversation(server, tmp_path):
    from edgevlm.samples import sample_image
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(sample_image("chelsea"))
    r = subprocess.run(CLI + ["--url", server.grpc_url, "chat", "--image", str(photo), "--max-tokens", "6"],
                       input="What is in the image?\nAnd its colour?\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.startswith("vlm> ")]
    assert len(answers) == 2 and all(len(a) > len("vlm> ") for a in answers)


def test_cli_ask_reports_errors_as_one_line_and_exit_2(server):
    r = subprocess.run(CLI + ["--url", server.grpc_url, "ask", "--image", "/nonexistent.jpg", "Hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "InvalidRequest: cannot read image /nonexistent.jpg" in r.stderr


@pytest.mark.skipif(os.environ.get("EDGEVLM_SKIP_INSTALL_TEST") == "1", reason="install test disabled")
def test_client_installs_alone_without_torch_or_onnxruntime(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = env_dir / "bin" / "pip"
    # from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    src = shutil.copytree(ROOT / "client", tmp_path / "client",
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run([str(pip), "install", "-q", str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    installed = subprocess.run([str(pip), "list", "--format=freeze"], capture_output=True, text=True).stdout.lower()
    assert "edgevlm-client" in installed and "tritonclient" in installed
    assert "torch" not in installed and "onnxruntime" not in installed
    r = subprocess.run([str(env_dir / "bin" / "edgevlm-client"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "ask" in r.stdout
