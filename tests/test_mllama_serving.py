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


def test_two_images_or_another_template_are_refused(in_process):
    photo = sample_image("chelsea")
    two = {"prompt": np.array([b"Compare."], dtype=object), "image": np.array([photo, photo], dtype=object)}
    with pytest.raises(BadRequest, match="2 images: this model .cross-attention. reads one image per request"):
        in_process.accept(two, _Stream())
    clip = {"prompt": np.array([b"What happens?"], dtype=object), "video": np.array([b"\x00" * 64], dtype=object)}
    with pytest.raises(BadRequest, match="takes no clip; send one frame as its image"):
        in_process.accept(clip, _Stream())
    other = {"prompt": np.array([b"Hi"], dtype=object), "template": np.array([b"llava_v1"], dtype=object)}
    with pytest.raises(BadRequest, match="template: this model's prompts are its checkpoint's chat template"):
        in_process.accept(other, _Stream())
    assert ask(in_process, "Name three colours.")[0]  # still serving


def test_served_answers_equal_transformers_batched_with_another_stream(start_server, onnx_dir, expected):
    with start_server(onnx_dir, max_sequences=8) as server:
        client = Client(server.grpc_url, timeout_s=PATIENCE_S)
        info = client.metadata()
        assert info.model_name == CFG.name and info.family == "mllama"
        assert info.image_tokens == 1  # an image takes one context position, its <|image|> token
        long = client.stream("Tell me a long story.", max_tokens=CFG.text.max_position - 64, temperature=0.0,
                             ignore_eos=True)
        deltas = iter(long)  # kept: a dropped iterator closes its stream (that cancels the generation)
        next(deltas)  # that stream is decoding: the others join its steps
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
        next(deltas)  # still decoding after the others ended: it was a row of every step between
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


@pytest.fixture(scope="module")
def precisions(onnx_dir):
    """onnx-fp16/ and onnx-int4/ beside the FP32 export, as `make quantize` writes them."""
    from edgevlm.export.mllama_quantize import fp16_mllama, quantize_mllama
    fp16_mllama(onnx_dir, onnx_dir.parent / "onnx-fp16", log=lambda m: None)
    quantize_mllama(onnx_dir, onnx_dir.parent / "onnx-int4", "int4", log=lambda m: None)
    return onnx_dir.parent


def test_int4_decoder_passes_its_gate_and_serves(precisions, onnx_dir, tmp_path, monkeypatch):
    from edgevlm.export import weight_only
    from edgevlm.export.mllama_quantize import quantize_mllama
    from edgevlm.export.quant_check import QuantizationError
    from edgevlm.manifest import OnnxArtifacts
    from edgevlm.runtime.runners import open_decoder
    q = OnnxArtifacts.open(precisions / "onnx-int4").manifest["quantization"]
    # the served MatMulNBits twin, the Q/DQ graph and its FP16 copy for TensorRT, each gated
    assert set(q["accuracy"]) == {"decoder_static_cpu", "decoder_static", "decoder_static_fp16"}
    assert open_decoder(precisions / "onnx-int4").path.name == "decoder.static.cpu.onnx"  # MatMulNBits served
    with runtime(precisions / "onnx-int4") as intake:
        text, stats = ask(intake, "What is in the image?", sample_image("chelsea"))
        assert text and stats.image_tiles == 4
    # a quantizer that loses the weights' scale fails the gate and leaves nothing behind
    real = weight_only.quantize_int4
    monkeypatch.setattr(weight_only, "quantize_int4", lambda w, block: (lambda q, s: (q, s * 0.1))(*real(w, block)))
    with pytest.raises(QuantizationError, match="int4 graph fails its accuracy check"):
        quantize_mllama(onnx_dir, tmp_path / "broken", "int4", log=lambda m: None)
    assert not (tmp_path / "broken").exists()


def test_fp16_export_keeps_caches_and_image_kv_in_half_and_passes_its_gate(precisions, onnx_dir, tmp_path,
                                                                          monkeypatch):
    from edgevlm.export import half
    from edgevlm.export.mllama_parity import ServedDecoder
    from edgevlm.export.mllama_quantize import fp16_mllama
    from edgevlm.export.quant_check import THRESHOLDS, QuantizationError
    from edgevlm.manifest import OnnxArtifacts
    art = OnnxArtifacts.open(precisions / "onnx-fp16")
    for key in ("decoder", "decoder_static"):
        types = {t["name"]: t["dtype"] for t in art.manifest["io"][key]["inputs"]}
        assert types["past_key_0"] == types["cross_value_1"] == "float16", key
        assert types["inputs_embeds"] == types["cross_mask"] == types["has_image"] == "float32", key
    assert {t["dtype"] for t in art.manifest["io"]["cross_kv"]["outputs"]} == {"float16"}
    acc = art.manifest["quantization"]["accuracy"]["decoder_static"]
    assert acc["logits_cosine_min"] >= THRESHOLDS["fp16"]["logits_cosine_min"] and acc["image_cosine_min"] >= 0.999
    pool = ServedDecoder(precisions / "onnx-fp16").decoder.open_pool(1, max_context=64)
    assert {b.dtype for b in pool.cross} == {np.dtype(np.float16)}  # a row's image K/V held in half
    pool.close()
    # weights that lose their range in the conversion fail the gate; nothing is written
    monkeypatch.setattr(half, "FP16_MAX", 1e-3)
    with pytest.raises(QuantizationError, match="fp16 graph fails its accuracy check"):
        fp16_mllama(onnx_dir, tmp_path / "broken", log=lambda m: None)
    assert not (tmp_path / "broken").exists()


def test_engine_profiles_cover_the_picture_batch_and_every_rows_image_kv(precisions, tiny_onnx, tmp_path):
    import json
    import shutil

    from edgevlm.engines.profiles import (ProfileError, cross_kv_profiles, decoder_profiles, static_decoder_profiles,
                                          vision_profiles)
    from edgevlm.manifest import OnnxArtifacts
    art = OnnxArtifacts.open(precisions / "onnx-fp16")
    n, d = CFG.cross_length, CFG.text.hidden_size
    (images,) = vision_profiles(art, max_batch=2)  # whole pictures, every tile slot
    assert images.shapes["pixel_values"] == ((1, 4, 3, 56, 56), (1, 4, 3, 56, 56), (2, 4, 3, 56, 56))
    assert images.shapes["aspect_ratio_mask"] == ((1, 4), (1, 4), (2, 4))
    (kv,) = cross_kv_profiles(art, max_batch=2)
    assert kv.shapes == {"cross_states": ((1, n, d), (1, n, d), (2, n, d))}
    pinned, (prefill, decode) = static_decoder_profiles(art, max_sequences=4)
    assert pinned == {"cache": 1024}
    # the picture is one <|image|> position in the prompt, not its 68 cross positions
    assert prefill.shapes["inputs_embeds"] == ((1, 1, d), (1, 57, d), (1, 1023, d))
    assert prefill.shapes["cross_mask"] == ((1, 1, n), (1, 57, n), (1, 1023, n))
    assert decode.shapes["cross_key_1"] == ((1, 2, n, 32), (4, 2, n, 32), (4, 2, n, 32))
    assert decode.shapes["has_image"] == ((1,), (4,), (4,))
    assert {t["name"] for t in art.manifest["io"]["decoder"]["inputs"]} == set(decoder_profiles(art)[1].shapes)
    # Llama 3.1's 131072 positions: engines hold 4096 unless asked for more
    long = tmp_path / "onnx-fp16"
    shutil.copytree(precisions / "onnx-fp16", long)
    m = json.loads((long / "manifest.json").read_text())
    m["limits"]["max_context"] = 131072
    (long / "manifest.json").write_text(json.dumps(m))
    assert static_decoder_profiles(OnnxArtifacts.open(long))[0] == {"cache": 4096}
    assert static_decoder_profiles(OnnxArtifacts.open(long), max_context=8192)[0] == {"cache": 8192}
    with pytest.raises(ProfileError, match="not a cross-attention model"):
        cross_kv_profiles(OnnxArtifacts.open(tiny_onnx))


@pytest.mark.parametrize("release", ["8.6", "10.3", "10.16", "11.4"])
def test_make_engines_hands_each_release_three_graphs_its_parser_takes(precisions, release):
    from test_trt_api import _release
    from tools.trt_api import graphs
    from tools.trt_api.bindings import RELEASES
    _, features = _release(release)
    handed = graphs.graphs_for(precisions / "onnx", features)
    assert handed and ("int4/concat" in handed) == features.int4
    for what, paths in handed.items():
        names = [p.name for p in paths]
        assert [n.split(".")[0] for n in names] == ["vision_encoder", "cross_kv", "decoder"], (what, names)
        # strongly typed builds take the FP16 graphs: the fp16 export, the quantized one's copies
        assert all(".fp16." in n or p.parent.name == "onnx-fp16" for n, p in zip(names, paths)) == \
            features.strongly_typed, (what, names)
    n, problems = graphs.problems(precisions / "onnx", next(r for r in RELEASES if r.name == release).version, features)
    assert n >= 3 and problems == []


def test_layouts_and_targets_not_built_for_it_are_refused_at_make_repo(onnx_dir, tmp_path):
    from edgevlm.manifest import ManifestError
    from edgevlm.serve.repository import render_repository
    with pytest.raises(ManifestError, match="KV=concat is not built for cross-attention models"):
        render_repository(onnx_dir, tmp_path / "a", kv_cache="concat")
    with pytest.raises(ManifestError, match="the jetson target does not serve cross-attention models yet"):
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


@pytest.fixture(scope="module")
def half_dir(ckpt, tmp_path_factory):
    """The export as the 11B is made on a 24 GiB machine: the text decoder's projections kept
    in the checkpoint's 16 bits, widened where they are used."""
    return export_mllama(ckpt, tmp_path_factory.mktemp("mllama-half") / "onnx", log=lambda m: None, weights="half")


def test_a_half_stored_export_answers_as_the_fp32_one_and_quantizes_the_same(half_dir, onnx_dir, precisions,
                                                                             tmp_path):
    # the checkpoint is bf16: both exports hold the same values, one widened at load, one per call
    import onnx
    from edgevlm.export.mllama_parity import ServedDecoder
    from edgevlm.export.mllama_quantize import quantize_mllama
    from edgevlm.manifest import OnnxArtifacts
    from edgevlm.runtime.cross_attention import CrossImage
    from edgevlm.runtime.cross_requests import CrossImageEncoder, CrossPreprocessor
    from edgevlm.runtime.onnxruntime import half_stored
    from test_quantize import _dq_weights
    assert half_stored(half_dir / "decoder.static.onnx") and not half_stored(onnx_dir / "decoder.static.onnx")
    t = CFG.text
    for graph, widened in (("decoder.onnx", 7 * t.kv_layers + 5 * len(t.cross_attention_layers)),
                           ("cross_kv.onnx", 2 * len(t.cross_attention_layers))):
        m = onnx.load(str(half_dir / graph), load_external_data=False)
        bf16 = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.BFLOAT16}
        assert sum(n.op_type == "Cast" and n.input[0] in bf16 for n in m.graph.node) == widened, graph
    pre = CrossPreprocessor(onnx_dir)
    prepared = pre.from_inputs({"prompt": np.array([b"What is in the image?"], dtype=object),
                                "image": np.array([sample_image("chelsea")], dtype=object)})
    ids = prepared.input_ids.tolist()
    logits = []
    for root in (onnx_dir, half_dir):
        kv, _ = CrossImageEncoder(root)(prepared.image.pixel_values)
        cross = pre.attach(ids, [CrossImage([a[0] for a in kv], prepared.image.tiles, CFG.vision.tile_tokens)])
        logits.append(ServedDecoder(root).logits(ids, cross["cross"], 8))
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4, rtol=0)
    # its INT4 export: the FP32 export's integers, and its gate passed
    quantize_mllama(half_dir, tmp_path / "int4", "int4", log=lambda m: None)
    assert OnnxArtifacts.open(tmp_path / "int4").manifest["quantization"]["accuracy"]["decoder_static_cpu"]
    a, b = _dq_weights(tmp_path / "int4" / "decoder.onnx"), _dq_weights(precisions / "onnx-int4" / "decoder.onnx")
    assert len(a) == len(b) == 7 * t.kv_layers + 5 * len(t.cross_attention_layers)
    for x, y in zip(sorted(a.values(), key=lambda v: (v[0].shape, v[0].tobytes())),
                    sorted(b.values(), key=lambda v: (v[0].shape, v[0].tobytes()))):
        np.testing.assert_array_equal(x[0], y[0])


def test_the_gate_encodes_fewer_photos_when_each_is_long(precisions, onnx_dir, monkeypatch):
    # an 11B picture is 6404 positions through a 0.9B encoder: the gate keeps its photos within
    # a budget of positions, never below one photo, always with the text-only prompt
    from edgevlm.export import mllama_quantize
    from edgevlm.export.quantize import calibration_images
    forms = {"decoder_static_cpu": ("vision_encoder", "cross_kv")}
    whole = mllama_quantize._check(onnx_dir, precisions / "onnx-int4", forms, calibration_images())
    assert whole["decoder_static_cpu"].cases == 5
    monkeypatch.setattr(mllama_quantize, "CROSS_POSITIONS", 2 * CFG.cross_length)
    two = mllama_quantize._check(onnx_dir, precisions / "onnx-int4", forms, calibration_images())
    assert two["decoder_static_cpu"].cases == 3
    monkeypatch.setattr(mllama_quantize, "CROSS_POSITIONS", 1)
    assert mllama_quantize._check(onnx_dir, precisions / "onnx-int4", forms,
                                  calibration_images())["decoder_static_cpu"].cases == 2
