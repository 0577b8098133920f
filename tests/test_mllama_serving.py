"""Llama-3.2-Vision served: the exported graphs (make verify), the runtime path in process, and
a real tritonserver whose greedy answers equal transformers' own, with an image and
text-only, batched together with another stream. A tiny random-weight checkpoint in the
released layout; every gate non-zero, so the picture changes the answer (checked)."""

from __future__ import annotations

import contextlib
import io
import queue
import re
import threading

import numpy as np
import pytest
import torch
from edgevlm_client import Client, InvalidRequest
from PIL import Image

from edgevlm.export.mllama_graphs import export_mllama
from edgevlm.export.mllama_parity import run_mllama_parity
from edgevlm.model.mllama_checkpoint import write_random_mllama
from edgevlm.presets import MLLAMA_PRESETS
from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.image_cache import ImageCache
from edgevlm.runtime.intake import Intake, open_preprocessor
from edgevlm.runtime.observer import Quiet
from edgevlm.runtime.prefix_cache import PrefixCache
from edgevlm.runtime.scheduler import Scheduler
from edgevlm.runtime.text_model import open_text_model
from edgevlm.runtime.tiles import preprocess
from edgevlm.samples import sample_image
from support import PATIENCE_S
from test_mllama import transformers_mllama

transformers = pytest.importorskip("transformers")
CFG = MLLAMA_PRESETS["tiny-mllama"]
TOKENS = 12


def portrait() -> bytes:
    img = Image.open(io.BytesIO(sample_image("astronaut"))).convert("RGB").crop((100, 0, 260, 400))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


# (question, image, history): each is answered by transformers and by us
CASES = {
    "landscape photo": ("What is in the image?", lambda: sample_image("chelsea"), []),
    "portrait photo": ("Describe it.", portrait, []),
    "follow-up": ("And the colour?", lambda: sample_image("coffee"), [["What is this?", "A cup of coffee."]]),
    "text only": ("Name three colours.", lambda: None, []),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_mllama(tmp_path_factory.mktemp("mllama") / "tiny-mllama", CFG, seed=3)


@pytest.fixture(scope="module")
def onnx_dir(ckpt, tmp_path_factory):
    return export_mllama(ckpt, tmp_path_factory.mktemp("mllama-onnx") / "onnx", log=lambda m: None)


@pytest.fixture(scope="module")
def expected(ckpt):
    """transformers' greedy answer to each case, as its processor and generate() make it."""
    model, proc = transformers_mllama(ckpt)
    tok = proc.tokenizer
    out = {}
    for name, (question, image, history) in CASES.items():
        data = image()
        parts = [{"type": "image"}] if data else []
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": parts + [{"type": "text", "text": q}]},
                         {"role": "assistant", "content": [{"type": "text", "text": a}]}]
            parts = []
        messages.append({"role": "user", "content": parts + [{"type": "text", "text": question}]})
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        images = [Image.open(io.BytesIO(data)).convert("RGB")] if data else None
        inputs = proc(images=images, text=text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
        out[name] = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


@contextlib.contextmanager
def runtime(onnx_dir, prefix_cache_mib: int = 64):
    """The runtime as the Triton model assembles it, without Triton, its caches empty."""
    model = open_text_model(onnx_dir, max_rows=4)
    sched = Scheduler(model, max_queue=8, prefix_cache=PrefixCache(prefix_cache_mib << 20))
    pre, encoder = open_preprocessor(onnx_dir, model.tok, 10 ** 8)
    intake = Intake(pre, sched, encoder, image_cache=ImageCache(16 << 20), observer=Quiet(), max_batch=4,
                    default_max_tokens=TOKENS)
    try:
        yield intake
    finally:
        intake.close()
        sched.close()


@pytest.fixture(scope="module")
def in_process(onnx_dir):
    with runtime(onnx_dir) as intake:
        yield intake


class _Stream:
    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    emit = fail = lambda self, e: self.events.put(e)  # noqa: E731

    def cancelled(self) -> bool:
        return False

    def result(self):
        text = []
        while True:
            e = self.events.get(timeout=PATIENCE_S)
            if isinstance(e, Exception):
                raise e
            text.append(e.text)
            if e.final:
                return "".join(text), e.stats


def ask(intake, question, image=None, history=(), **inputs):
    import json
    tensors = {"prompt": np.array([question.encode()], dtype=object), "temperature": np.array([0.0], np.float32),
               "max_tokens": np.array([TOKENS], np.int32), **inputs}
    if image is not None:
        tensors["image"] = np.array([image], dtype=object)
    if history:
        tensors["history"] = np.array([json.dumps(list(history)).encode()], dtype=object)
    stream = _Stream()
    intake.accept(tensors, stream)
    return stream.result()


def test_exported_graphs_match_the_reference(ckpt, onnx_dir):
    report = run_mllama_parity(ckpt, onnx_dir, ["chelsea", "coffee"], new_tokens=12, log=lambda m: None)
    assert report.ok(1e-3), report.summary(1e-3)
    assert [c.name for c in report.cases] == ["chelsea", "coffee", "text only"]


def test_in_process_answers_equal_transformers(in_process, expected):
    for name, (question, image, history) in CASES.items():
        text, stats = ask(in_process, question, image(), history)
        assert text == expected[name], name
        data = image()
        tiles = 0 if data is None else int(preprocess(Image.open(io.BytesIO(data)).convert("RGB"), CFG.vision)[2].sum())
        assert (stats.image_tiles, stats.image_tokens) == (tiles, tiles * CFG.vision.tile_tokens)
    assert expected["landscape photo"] != ask(in_process, "What is in the image?")[0]  # the picture mattered


def test_the_prefix_cache_never_lends_one_images_kv_to_another(onnx_dir, expected):
    """Every position of a cross-attention prompt depends on its image (those before the image
    token too): a prompt about another photo reuses nothing; the same photo again reuses its prefix."""
    with runtime(onnx_dir) as intake:
        first, _ = ask(intake, "What is in the image?", sample_image("astronaut"))
        text, stats = ask(intake, "What is in the image?", sample_image("chelsea"))
        assert text == expected["landscape photo"] and text != first and stats.cached_tokens == 0
        again, stats = ask(intake, "What is in the image?", sample_image("chelsea"))
        assert again == text and stats.cached_tokens > 0 and stats.image_cached
        alone, stats = ask(intake, "What is in the image?")
        assert alone != text and stats.cached_tokens == 0  # text-only shares nothing with an image prompt


@pytest.mark.parametrize("inputs,reason", [
    ({"prompt": "Look: <|image|> what is it?"}, "prompt contains the special token <|image|>"),
    ({"prompt": "Hi<|eot_id|>"}, "prompt contains the special token <|eot_id|>"),
    ({"prompt": "<|image|>What is it?", "raw_prompt": True}, "raw prompt has 1 <|image|> token(s) for 0 image(s)"),
    ({"prompt": "word " * 1100}, "the context holds 1024"),
])
def test_bad_requests_get_a_one_line_reason(in_process, inputs, reason):
    tensors = {k: np.array([v.encode() if isinstance(v, str) else v], dtype=object if isinstance(v, str) else bool)
               for k, v in inputs.items()}
    with pytest.raises(BadRequest, match=re.escape(reason)):
        in_process.accept(tensors, _Stream())
    assert ask(in_process, "Name three colours.")[0]  # still serving


def test_served_answers_equal_transformers_batched_with_another_stream(start_server, onnx_dir, expected):
    with start_server(onnx_dir, max_sequences=8) as server:
        client = Client(server.grpc_url, timeout_s=PATIENCE_S)
        info = client.metadata()
        assert info.model_name == CFG.name and info.family == "mllama"
        assert info.image_tokens == 1  # an image takes one context position, its <|image|> token
        long = client.stream("Tell me a long story.", max_tokens=CFG.text.max_position - 64, temperature=0.0)
        next(iter(long))  # that stream is decoding: the others join its steps
        before = server.metrics()
        got = {}

        def run(name, question, image, history):
            got[name] = client.generate(question, image=image(), history=history or None, max_tokens=TOKENS,
                                        temperature=0.0).text
        threads = [threading.Thread(target=run, args=(name, *case)) for name, case in CASES.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = server.metrics()
        long.close()
        assert got == expected
        rows, steps = (f'edgevlm_decode_{name}_total{{model="mobilevlm"}}' for name in ("step_rows", "steps"))
        assert after[rows] - before[rows] > after[steps] - before[steps] > 0  # some steps decoded several rows
        with pytest.raises(InvalidRequest, match=re.escape("special token <|image|>")):
            client.generate("Is there a <|image|> here?", image=sample_image("chelsea"))


def test_constrained_answers_parse(in_process):
    """Constrained decoding over Llama 3's BPE vocabulary (llguidance reads its tokenizer.json)."""
    import json
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for fmt, check in [({"type": "json_schema", "schema": schema}, lambda t: isinstance(json.loads(t)["n"], int)),
                       ({"type": "regex", "pattern": "(yes|no), [a-z]{2,8}"},
                        lambda t: re.fullmatch("(yes|no), [a-z]{2,8}", t))]:
        text, stats = ask(in_process, "Is there a cat?", sample_image("chelsea"), max_tokens=np.array([40], np.int32),
                          response_format=np.array([json.dumps(fmt).encode()], dtype=object))
        assert check(text) and stats.finish_reason == "stop", (fmt, text)


def test_int4_decoder_passes_its_gate_and_serves(onnx_dir, tmp_path, monkeypatch):
    from edgevlm.export import weight_only
    from edgevlm.export.mllama_quantize import quantize_mllama
    from edgevlm.export.quant_check import QuantizationError
    from edgevlm.runtime.runners import open_decoder
    reports = quantize_mllama(onnx_dir, tmp_path / "onnx-int4", "int4", log=lambda m: None)
    assert set(reports) == {"decoder_static_cpu", "decoder_static"}
    assert open_decoder(tmp_path / "onnx-int4").path.name == "decoder.static.cpu.onnx"  # MatMulNBits served
    with runtime(tmp_path / "onnx-int4") as intake:
        text, stats = ask(intake, "What is in the image?", sample_image("chelsea"))
        assert text and stats.image_tiles == 4
    # a quantizer that loses the weights' scale fails the gate and leaves nothing behind
    real = weight_only.quantize_int4
    monkeypatch.setattr(weight_only, "quantize_int4", lambda w, block: (lambda q, s: (q, s * 0.1))(*real(w, block)))
    with pytest.raises(QuantizationError, match="int4 graph fails its accuracy check"):
        quantize_mllama(onnx_dir, tmp_path / "broken", "int4", log=lambda m: None)
    assert not (tmp_path / "broken").exists()


def test_layouts_and_targets_not_built_for_it_are_refused_at_make_repo(onnx_dir, tmp_path):
    from edgevlm.manifest import ManifestError
    from edgevlm.serve.repository import render_repository
    with pytest.raises(ManifestError, match="KV=concat is not built for cross-attention models"):
        render_repository(onnx_dir, tmp_path / "a", kv_cache="concat")
    with pytest.raises(ManifestError, match="TensorRT engines for cross-attention models are not built yet"):
        render_repository(onnx_dir, tmp_path / "b", target="jetson", engine_dir=tmp_path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    repo = render_repository(onnx_dir, tmp_path / "c")
    assert sorted(p.name for p in repo.iterdir()) == ["mobilevlm"]  # its images are encoded in process


def test_a_tool_call_in_the_form_the_checkpoints_template_teaches(in_process):
    """The template renders the tools (the Llama 3 way); the grammar holds the answer to the one
    call object that template asks for, read back as an OpenAI-style call."""
    import json
    tools = [{"type": "function", "function": {"name": "move_to", "description": "Drive to a shelf", "parameters": {
        "type": "object", "properties": {"shelf": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["shelf"]}}}]
    text, stats = ask(in_process, "Go to shelf 3.", sample_image("chelsea"), max_tokens=np.array([40], np.int32),
                      tools=np.array([json.dumps(tools).encode()], dtype=object),
                      tool_choice=np.array([b"required"], dtype=object))
    assert text.startswith('{"name":"move_to","parameters":') and stats.finish_reason == "tool_calls"
    (call,) = stats.tool_calls
    assert call["name"] == "move_to" and 1 <= json.loads(call["arguments"])["shelf"] <= 9
