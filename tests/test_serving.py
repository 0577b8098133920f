"""The `mobilevlm` model on a real tritonserver over real gRPC (cpu target, tiny model)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from edgevlm.model.checkpoint import read_checkpoint
from edgevlm.runtime.image import preprocess
from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
from edgevlm.model.mobilevlm import MobileVLM
from edgevlm.serve.repository import render_repository
from edgevlm.samples import sample_image
from edgevlm.runtime.tokenizer import Tokenizer
from edgevlm_client import Client, InvalidRequest, ServerError
from edgevlm_client.client import Stream

from support import LONG, abandoned_until_cancelled
from test_image import _png_header_only

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    ck = read_checkpoint(tiny_ckpt)
    return MobileVLM.from_weights(ck.config, ck.weights()), Tokenizer(ck.tokenizer_path)


def expected(reference, image: bytes | None, question: str, max_tokens: int) -> tuple[str, int]:
    model, tok = reference
    ids = tokenize_prompt(tok, build_prompt(question, image=image is not None))
    px = torch.from_numpy(preprocess(image, model.cfg.vision.image_size)[None]) if image else None
    tokens = model.generate(ids, px, max_new_tokens=max_tokens)
    return tok.decode(tokens), len(tokens)


@pytest.mark.parametrize("photo,question", [("chelsea", "What is in the image?"),
                                            ("camera", "Who is holding the camera?"),
                                            (None, "Name three colours.")])
def test_streamed_text_is_the_pytorch_reference_greedy_output(client, reference, photo, question):
    image = sample_image(photo) if photo else None
    want, n = expected(reference, image, question, 24)
    stream = client.stream(question, image=image, max_tokens=24)
    deltas = list(stream)
    assert "".join(deltas) == want
    assert len(deltas) > 1  # streamed, not one blob
    st = stream.stats
    assert st["decode_tokens"] == n and st["finish_reason"] in ("length", "stop")
    assert st["prefill_tokens"] > 0 and st["decode_tokens_per_s"] > 0
    assert (st["image_encode_ms"] > 0 or st["image_cached"]) == (image is not None)  # encoded, or seen before


def test_eight_concurrent_streams_all_complete_correctly(client, reference):
    jobs = [(p, q, 8 + 3 * i) for i, (p, q) in enumerate(
        [(p, q) for p in ("chelsea", "coffee", "astronaut", None) for q in ("What is this?", "Describe it.")])]
    wants = [expected(reference, sample_image(p) if p else None, q, n)[0] for p, q, n in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: client.generate(j[1], image=sample_image(j[0]) if j[0] else None,
                                                      max_tokens=j[2]).text, jobs))
    assert got == wants


def _raw(prompt=b"Hi", **extra):
    """Inputs built by hand, for the malformed requests the client would never send."""
    inputs = []
    if prompt is not None:
        t = grpcclient.InferInput("prompt", [1], "BYTES")
        t.set_data_from_numpy(np.array([prompt], dtype=object))
        inputs.append(t)
    for name, (dtype, value) in extra.items():
        t = grpcclient.InferInput(name, list(np.shape(value)), dtype)
        t.set_data_from_numpy(np.asarray(value, dtype={"INT32": np.int32, "FP32": np.float32,
                                                       "INT64": np.int64, "BYTES": object}[dtype]))
        inputs.append(t)
    return inputs


BAD = {
    "undecodable image": (dict(prompt="What?", image=b"\x89PNG\r\n\x1a\n not really"), "cannot decode image"),
    "decompression bomb": (dict(prompt="What?", image=_png_header_only(100_000, 100_000)), "pixel limit"),
    "empty prompt": (dict(prompt="  "), "prompt is empty"),
    "prompt over the context": (dict(prompt="word " * 600), r"prompt is \d+ tokens, the context holds 512"),
    "negative temperature": (dict(prompt="Hi", temperature=-1.0), "temperature must be in"),
    "top_p zero": (dict(prompt="Hi", top_p=0.0), "top_p must be in"),
    "max_tokens zero": (dict(prompt="Hi", max_tokens=0), "max_tokens must be in"),
    "negative seed": (dict(prompt="Hi", seed=-5), "seed must be >= 0"),
    "empty stop string": (dict(prompt="Hi", stop=[""]), "stop takes"),
}
RAW_BAD = {  # refused by our model: INVALID_ARG
    "missing prompt": (_raw(prompt=None, max_tokens=("INT32", [4])), "prompt"),
    "prompt not utf-8": (_raw(prompt=b"\xff\xfe bad"), "not valid UTF-8"),
}
# Refused by Triton's gRPC frontend before the model sees them. On a stream, Triton 2.51 sends
# these without a status code even when asked for codes, so they arrive as ServerError with
# Triton's reason; our client never sends them (it builds tensors from the contract).
TRITON_REFUSED = {
    "temperature as int": (_raw(temperature=("INT32", [1])), "temperature"),
    "two temperatures": (_raw(temperature=("FP32", [0.5, 0.7])), "temperature"),
}


def _good_request_still_works(client):
    assert client.health()
    assert client.generate("Name three colours.", max_tokens=4).tokens == 4


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_one_line_reason_and_the_server_keeps_serving(client, case):
    kwargs, reason = BAD[case]
    prompt = kwargs.pop("prompt")
    with pytest.raises(InvalidRequest, match=reason) as e:
        client.generate(prompt, **kwargs)
    assert "\n" not in str(e.value)
    _good_request_still_works(client)


@pytest.mark.parametrize("case", list(RAW_BAD) + list(TRITON_REFUSED))
def test_malformed_tensors_are_refused(server, client, case):
    inputs, reason = {**RAW_BAD, **TRITON_REFUSED}[case]
    with pytest.raises(InvalidRequest if case in RAW_BAD else ServerError, match=reason):
        list(Stream(client, inputs, 30))
    _good_request_still_works(client)


def test_cancelled_stream_stops_generating(server, client):
    """Leaving the loop stops the generation with a cancel message on the same stream: its
    final response still arrives (stats, finish_reason cancelled), no gRPC-level cancel."""
    endings = []

    def abandon(max_tokens):
        stream = client.stream("Tell me a long story.", max_tokens=max_tokens)
        for n, _ in enumerate(stream, 1):
            if n == 3:
                break  # leaving the loop closes the stream, cancelling the request
        endings.append(stream.stats.get("finish_reason"))

    delta = abandoned_until_cancelled(server, abandon, LONG)
    assert 3 <= delta["tokens"] < LONG
    assert endings[-1] == "cancelled" and delta["cancel_messages"] == 1
    _good_request_still_works(client)


def test_a_raw_grpc_cancel_still_stops_generating(server, client):
    """A client that cancels at the gRPC level (raw tritonclient), or goes away, is still
    stopped by Triton's own cancellation; no cancel message is involved."""
    import queue

    import tritonclient.grpc as grpcclient
    from edgevlm_client.contract import MODEL
    from edgevlm_client.request import build_inputs

    def abandon(max_tokens):
        got = queue.Queue()
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        raw.start_stream(callback=lambda result, error: got.put((result, error)))
        try:
            raw.async_stream_infer(MODEL, build_inputs("Tell me a long story.", max_tokens=max_tokens))
            for _ in range(3):
                assert got.get(timeout=60)[1] is None
        finally:
            raw.stop_stream(cancel_requests=True)
            raw.close()

    delta = abandoned_until_cancelled(server, abandon, LONG)
    assert delta["tokens"] < LONG and delta["cancel_messages"] == 0
    _good_request_still_works(client)


def test_sampling_with_a_seed_is_reproducible(client):
    a = client.generate("Say something.", max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    b = client.generate("Say something.", max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    assert a.text == b.text and a.tokens == 12


def test_stop_string_ends_the_answer_before_it(client, reference):
    full, _ = expected(reference, None, "Name three colours.", 24)
    cut = full[6:9]  # some text from inside the greedy answer
    r = client.generate("Name three colours.", max_tokens=24, stop=[cut])
    assert r.text == full[:full.index(cut)] and r.finish_reason == "stop"


def test_rendered_repository_is_complete_and_refuses_unbuilt_jetson(tiny_onnx, tmp_path):
    from edgevlm.manifest import ManifestError
    repo = render_repository(tiny_onnx, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir()) == ["mobilevlm", "vision_encoder"]
    for model in repo.iterdir():
        config = (model / "config.pbtxt").read_text()
        assert "${" not in config and f'name: "{model.name}"' in config
        assert (model / "1" / "model.py").is_file() and (model / "1" / "adapter.py").is_file()
    with pytest.raises(ManifestError, match="make engines"):
        render_repository(tiny_onnx, tmp_path / "jetson", "jetson")
    assert not (tmp_path / "jetson").exists()


def test_jetson_target_selects_this_devices_engines_by_manifest(tiny_onnx, tmp_path, monkeypatch):
    """Engine selection and manifest checks only: building or loading engines needs TensorRT."""
    import json
    import shutil

    from edgevlm.manifest import ManifestError
    art_root = tmp_path / "model"
    onnx_dir = shutil.copytree(tiny_onnx, art_root / "onnx")
    from edgevlm.manifest import OnnxArtifacts, read_manifest, write_manifest
    sha = OnnxArtifacts.open(onnx_dir).digest
    monkeypatch.setenv("EDGEVLM_TRT_VERSION", "10.3.0")
    monkeypatch.setenv("EDGEVLM_SM", "87")
    with pytest.raises(ManifestError, match=r"no engines for this device \(10.3.0-sm87\)"):
        render_repository(onnx_dir, tmp_path / "r0", "jetson")
    for tag, digest in (("10.3.0-sm87", sha), ("8.5.2-sm87", sha)):
        (art_root / "engines" / tag).mkdir(parents=True)
        (art_root / "engines" / tag / "manifest.json").write_text(json.dumps(
            {"format": 1, "kind": "tensorrt", "onnx_sha256": digest, "device_tag": tag,
             "kv_cache": "static", "max_context": 256}))
    repo = render_repository(onnx_dir, tmp_path / "r1", "jetson")
    config = (repo / "mobilevlm" / "config.pbtxt").read_text()
    assert 'string_value: "tensorrt"' in config and "engines/10.3.0-sm87" in config
    # what the engines were built with, not the model's defaults, reaches the config
    assert 'key: "kv_cache" value: { string_value: "static" }' in config
    assert 'key: "max_context" value: { string_value: "256" }' in config
    monkeypatch.setenv("EDGEVLM_TRT_VERSION", "8.5.2")
    # another export of the same checkpoint (here: one file differs), engines built from it
    other = shutil.copytree(onnx_dir, tmp_path / "other-export")
    with open(other / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    m = read_manifest(other)
    write_manifest(other, {k: v for k, v in m.items() if k not in ("format", "sha256")})
    assert read_manifest(other)["source"] == read_manifest(onnx_dir)["source"]  # same checkpoint
    (art_root / "engines" / "8.5.2-sm87" / "manifest.json").write_text(json.dumps(
        {"format": 1, "kind": "tensorrt", "onnx_sha256": OnnxArtifacts.open(other).digest,
         "device_tag": "8.5.2-sm87"}))
    with pytest.raises(ManifestError, match="built from another export"):
        render_repository(onnx_dir, tmp_path / "r2", "jetson")
    with pytest.raises(ManifestError, match="are for '10.3.0-sm87'"):
        from edgevlm.serve.repository import check_engines
        check_engines(art_root / "engines" / "10.3.0-sm87", OnnxArtifacts.open(onnx_dir), "8.5.2-sm87")


def test_both_kv_cache_layouts_serve_the_same_text(server, start_server, tiny_onnx, tmp_path, client):
    """The default repository serves the in-place static cache; `make repo KV=concat` serves
    decoder.onnx behind the same tritonserver path, with the same answers."""
    assert 'string_value: "static"' in (server.repository / "mobilevlm" / "config.pbtxt").read_text()
    repo = render_repository(tiny_onnx, tmp_path / "repo", kv_cache="concat", default_max_tokens=32)
    assert 'string_value: "concat"' in (repo / "mobilevlm" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="unknown kv_cache 'paged'"):
        render_repository(tiny_onnx, tmp_path / "bad", kv_cache="paged")
    with start_server(tiny_onnx, kv_cache="concat", default_max_tokens=32) as srv:
        concat = Client(srv.grpc_url, timeout_s=60)
        for photo, question in (("coffee", "What is on the table?"), (None, "Name three colours.")):
            image = sample_image(photo) if photo else None
            want = client.generate(question, image=image, max_tokens=24)
            got = concat.generate(question, image=image, max_tokens=24)
            assert got.text == want.text and got.stats["decode_tokens"] == want.stats["decode_tokens"]


def test_an_export_from_before_the_static_decoder_still_serves(tiny_onnx, tmp_path):
    import json
    import shutil

    from edgevlm.manifest import ManifestError
    old = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    m = json.loads((old / "manifest.json").read_text())
    del m["files"]["decoder_static"], m["io"]["decoder_static"]
    (old / "manifest.json").write_text(json.dumps(m))
    repo = render_repository(old, tmp_path / "repo")  # auto falls back to concat
    assert 'key: "kv_cache" value: { string_value: "concat" }' in (repo / "mobilevlm" / "config.pbtxt").read_text()
    with pytest.raises(ManifestError, match="no decoder_static file; run `make onnx` again"):
        render_repository(old, tmp_path / "static", kv_cache="static")


def test_chat_follow_up_uses_the_multi_turn_template(client, reference):
    model, tok = reference
    image = sample_image("chelsea")
    chat = client.chat(image=image, max_tokens=12)
    first = chat.ask("What is in the image?")
    second = "".join(chat.stream("What colour is it?"))
    assert len(chat.turns) == 2 and chat.turns[0] == ("What is in the image?", first.text.strip())
    # the reference, given the same two-turn `v1` prompt (image in turn one), says the same
    prompt = build_prompt("What colour is it?", history=[("What is in the image?", first.text.strip())])
    assert "</s>USER: What colour is it? ASSISTANT:" in prompt
    ids = tokenize_prompt(tok, prompt)
    px = torch.from_numpy(preprocess(image, model.cfg.vision.image_size)[None])
    assert second == tok.decode(model.generate(ids, px, max_new_tokens=12))


@pytest.mark.parametrize("history,reason", [("not json", "history is not JSON"),
                                            ('[["only a question"]]', "history must be a JSON list"),
                                            ('{"q": "a"}', "history must be a JSON list")])
def test_malformed_history_is_refused(server, client, history, reason):
    inputs = _raw(history=("BYTES", [history.encode()]))
    with pytest.raises(InvalidRequest, match=reason):
        list(Stream(client, inputs, 30))
    _good_request_still_works(client)
