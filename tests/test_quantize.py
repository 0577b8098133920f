"""make quantize on the tiny model: Q/DQ graphs that ONNX Runtime runs, checked against FP32,
in the forms TensorRT takes; a broken graph fails the check; a failed run leaves nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgevlm.manifest import OnnxArtifacts
from edgevlm.export import quant_check
from edgevlm.export.quant_check import (STEPS, THRESHOLDS, QuantizationError, QuantReport, check_forms,
                                        check_quantized)
from edgevlm.export.quantize import calibration_images
from edgevlm.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tiny_family):
    out = tiny_family / f"onnx-{request.param}"
    return request.param, out, OnnxArtifacts.open(out).manifest["quantization"]["accuracy"]


def weight_matmuls(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in inits for n in m.graph.node)


def test_quantized_export_meets_its_accuracy_thresholds(quantized):
    precision, out, report = quantized
    print(QuantReport(**report).summary(precision))
    for key, floor in THRESHOLDS[precision].items():
        assert report[key] >= floor, (key, report[key])
    manifest = OnnxArtifacts.open(out).manifest
    assert manifest["quantization"]["precision"] == precision
    assert manifest["quantization"]["accuracy"] == report
    # tiny: the FP32 lm_head is a quarter of the decoder; at 1.7B it is 5%
    assert report["size_mb"]["decoder"] < report["size_mb"]["decoder_fp32"] * (0.5 if precision == "int8" else 0.4)


def test_decoder_graph_is_in_the_form_tensorrt_takes(quantized, tiny_onnx):
    precision, out, _ = quantized
    m = onnx.load(str(out / "decoder.onnx"))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (17 if precision == "int8" else 21)
    inits = {t.name: t for t in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == weight_matmuls(tiny_onnx / "decoder.onnx") > 0  # every weight MatMul, nothing else
    for n in dqs:
        w, scale = inits[n.input[0]], numpy_helper.to_array(inits[n.input[1]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if precision == "int8":  # per output channel: 1-D scale along axis 1
            assert w.data_type == onnx.TensorProto.INT8 and attrs == {"axis": 1}
            assert scale.shape == (w.dims[1],)
        else:  # blocks of 128 along K, explicit zero points of 0
            assert w.data_type == onnx.TensorProto.INT4 and attrs["block_size"] == 128
            assert scale.shape == (-(-w.dims[0] // 128), w.dims[1])
            zp = inits[n.input[2]]
            assert zp.data_type == onnx.TensorProto.INT4 and not any(zp.raw_data)
    assert [n.op_type for n in m.graph.node].count("Gemm") == 1  # lm_head stays FP32


def test_vision_encoder_is_w8a8_with_symmetric_scales(quantized):
    _, out, _ = quantized
    m = onnx.load(str(out / "vision_encoder.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q, "no activation quantization"
    for n in q + [n for n in m.graph.node if n.op_type == "DequantizeLinear"]:
        if len(n.input) > 2 and n.input[2] in inits:
            assert not numpy_helper.to_array(inits[n.input[2]]).any(), "TensorRT takes zero points of 0 only"
    assert "LayerNormalization" in {n.op_type for n in m.graph.node}


def test_a_broken_graph_fails_the_check(quantized, tiny_onnx, tmp_path):
    precision, out, _ = quantized
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    m = onnx.load(str(broken / "decoder.onnx"))
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:  # scales off by a random factor, as a wrong export would be
        if t.name.endswith("_scales") or t.name.endswith("_scale"):
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a * rng.uniform(0.2, 5.0, a.shape)).astype(a.dtype), t.name))
    onnx.save(m, str(broken / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
              all_tensors_to_one_file=True)
    report = check_quantized(tiny_onnx, broken, calibration_images())
    assert report.failures(precision)
    with pytest.raises(QuantizationError, match="fails its accuracy check"):
        report.raise_if_failed(precision)


def test_one_reference_checks_both_forms_as_separate_checks_would(quantized, tiny_onnx):
    # make quantize runs the FP32 export once for the Q/DQ and the cpu forms; each report must
    # be what checking that form alone gives, and the manifest must hold those figures
    precision, out, _ = quantized
    # the static graphs: what the cpu target serves, in a third of the concat graphs' KV memory
    forms = [("decoder_static", "vision_encoder"), ("decoder_static_cpu", "vision_encoder_cpu")]
    together = check_forms(tiny_onnx, out, calibration_images(), forms)
    alone = [check_quantized(tiny_onnx, out, calibration_images(), d, v) for d, v in forms]
    assert [r.to_dict() for r in together] == [r.to_dict() for r in alone]
    q = OnnxArtifacts.open(out).manifest["quantization"]
    assert q["accuracy"] == together[0].to_dict()
    assert q["decoder"]["cpu_form"]["accuracy"] == together[1].to_dict()
    assert together[0].to_dict() != together[1].to_dict()  # two forms, two measurements


def test_an_export_checked_against_itself_is_exact(tiny_onnx):
    # the free-running continuation shares the teacher-forced one's prefill (a copied row):
    # against itself every token must agree and every greedy run be identical
    r = check_quantized(tiny_onnx, tiny_onnx, calibration_images())
    assert r.cases == 5 and r.greedy_identical == r.cases and r.first_divergence == [STEPS] * r.cases
    assert r.teacher_forced_agreement == 1.0 and r.logits_max_abs_err == 0.0


def test_long_image_prompts_check_fewer_photos(tiny_onnx, monkeypatch):
    # an anyres 7B prompt is ~2,900 positions: the check keeps its prefills within a budget
    # of positions per form, never below one photo, and always checks the text-only prompt
    monkeypatch.setattr(quant_check, "PHOTO_POSITIONS", 1)
    assert check_quantized(tiny_onnx, tiny_onnx, calibration_images()).cases == 2


def test_quantized_export_serves_on_the_cpu_target(quantized, tmp_path):
    from edgevlm.runtime.runners import VisionEncoder, open_decoder
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.text_model import open_text_model
    from tests.test_scheduler import alone
    _, out, _ = quantized
    assert open_decoder(out).path.name == "decoder.static.cpu.onnx"  # the MatMulNBits twin, in-place KV
    assert VisionEncoder(out).run.path.name == "vision_encoder.cpu.onnx"
    assert open_decoder(out, kv_cache="concat").path.name == "decoder.cpu.onnx"
    model = open_text_model(out)
    assert alone(model, model.tok.encode("Hello there"), SamplingParams(max_tokens=5))[1].decode_tokens >= 1


def unpack(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' B [N, blocks, blob] -> the signed integers [K, N] (the inverse of pack)."""
    if bits == 4:
        b = np.stack([b & 0xF, b >> 4], axis=-1)
    return (b.reshape(b.shape[0], -1)[:, :k].astype(np.int16) - (1 << (bits - 1))).T


def test_cpu_form_holds_the_same_weights_and_a_quantized_lm_head(quantized, tiny_onnx):
    precision, out, _ = quantized
    qdq = onnx.load(str(out / "decoder.onnx"))
    cpu = onnx.load(str(out / "decoder.cpu.onnx"))
    q_inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    c_inits = {t.name: numpy_helper.to_array(t) for t in cpu.graph.initializer}
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    expected = {}  # MatMul output -> the weights the Q/DQ graph multiplies by
    for n in qdq.graph.node:
        if n.op_type == "MatMul" and n.input[1] in dq_of:
            dq = dq_of[n.input[1]]
            w, s = q_inits[dq.input[0]].astype(np.float32), q_inits[dq.input[1]]
            block = {x.name: onnx.helper.get_attribute_value(x) for x in dq.attribute}.get("block_size")
            expected[n.output[0]] = w * (np.repeat(s, block, axis=0)[:w.shape[0]] if block else s)
    nbits = [n for n in cpu.graph.node if n.op_type == "MatMulNBits"]
    assert not [n for n in cpu.graph.node if n.op_type in ("DequantizeLinear", "Gemm")]
    assert not [n for n in cpu.graph.node if n.op_type == "MatMul" and n.input[1] in c_inits]
    assert len(nbits) == len(expected) + 1 == weight_matmuls(tiny_onnx / "decoder.onnx") + 1
    for n in nbits:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        q = unpack(c_inits[n.input[1]], a["bits"], a["K"]).astype(np.float32)
        scales = c_inits[n.input[2]].reshape(a["N"], -1).T  # [blocks, N]
        w = q * np.repeat(scales, a["block_size"], axis=0)[:a["K"]]
        if n.output[0] == "logits":  # the lm_head: blocks of the tier's bits, within half a step of FP32
            assert (a["bits"], a["block_size"]) == ((8, 128) if precision == "int8" else (4, 32))
            ref = numpy_helper.to_array(next(t for t in onnx.load(str(tiny_onnx / "decoder.onnx")).graph.initializer
                                             if t.name == "decoder.lm_head.weight")).T
            assert np.all(np.abs(w - ref) <= np.repeat(scales, a["block_size"], axis=0)[:a["K"]] / 2 + 1e-7)
        else:
            assert a["bits"] == (8 if precision == "int8" else 4)
            np.testing.assert_array_equal(w, expected[n.output[0]])  # the same integers and scales
    # the vision encoder's cpu form: every weight MatMul in int8 with activations quantized per
    # call, attention left in FP32
    vision = onnx.load(str(out / "vision_encoder.cpu.onnx"), load_external_data=False)
    v_inits = {t.name for t in vision.graph.initializer}
    assert sum(n.op_type == "MatMulInteger" for n in vision.graph.node) == weight_matmuls(
        tiny_onnx / "vision_encoder.onnx") > 0
    assert not [n for n in vision.graph.node if n.op_type == "MatMul" and n.input[1] in v_inits]
    assert [n for n in vision.graph.node if n.op_type == "MatMul"]  # attention
    cpu_form = OnnxArtifacts.open(out).manifest["quantization"]["decoder"]["cpu_form"]
    # the static twin the cpu target serves runs each layer's attention as one fused kernel
    static = onnx.load(str(out / "decoder.static.cpu.onnx"), load_external_data=False)
    layers = OnnxArtifacts.open(out).config.text.num_layers
    assert [n.op_type for n in static.graph.node].count("GroupQueryAttention") == layers
    assert cpu_form["static_attention"] == "com.microsoft.GroupQueryAttention per layer"
    derived = OnnxArtifacts.open(out).manifest["quantization"]["decoder"]["derived_graphs_logits_cosine"]
    assert derived["decoder.static.cpu.onnx"] >= 0.99  # the served twin agrees with the gated one
    for key, floor in THRESHOLDS[precision].items():  # its own parity gate against FP32
        assert cpu_form["accuracy"][key] >= floor, (key, cpu_form["accuracy"][key])
    sizes = cpu_form["accuracy"]["size_mb"]
    assert sizes["decoder"] < OnnxArtifacts.open(out).manifest["quantization"]["accuracy"]["size_mb"]["decoder"]


def test_failed_quantize_leaves_nothing_and_says_why(tiny_onnx, tmp_path):
    out = tmp_path / "onnx-int8"
    r = subprocess.run([sys.executable, str(ROOT / "build" / "quantize.py"), "--onnx", str(tiny_onnx),
                        "--precision", "int8", "--out", str(out), "--calib-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "no calibration images" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".onnx-int8*"))


def test_fp16_copy_for_strongly_typed_builds(quantized):
    precision, out, _ = quantized
    manifest = OnnxArtifacts.open(out).manifest
    copy = manifest["quantization"]["decoder"]["fp16_copy"]
    assert manifest["quantization"]["decoder"]["derived_graphs_logits_cosine"]["decoder.fp16.onnx"] >= 0.99
    m = onnx.load(str(out / copy["file"]))
    # FP16 DQ scales need 19 (within TensorRT 10.0's documented opsets); INT4 is a 21 type
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == (19 if precision == "int8" else 21)
    inits = {t.name: t for t in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dqs)  # FP16 MatMuls
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in m.graph.input
               if i.name != "position_ids")  # FP32 at the engine boundary
    kept = {n.op_type for n in m.graph.node if n.op_type in ("ReduceMean", "Gemm")}
    assert kept == {"ReduceMean", "Gemm"}
    # the W8A8 vision encoder's FP16 copy: FP16 Q/DQ scales, LayerNorm in FP32, close to W8A8
    vis = manifest["quantization"]["vision_encoder"]["fp16_copy"]
    assert vis["embedding_cosine"] >= 0.99
    v = onnx.load(str(out / vis["file"]))
    vinits = {t.name: t for t in v.graph.initializer}
    vdq = [n for n in v.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in vinits]
    assert vdq and all(vinits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in vdq)
    assert _fp32_inputs(v, "LayerNormalization")


def test_static_kv_twins_share_the_quantized_weights(quantized):
    """decoder.static.onnx and its FP16 copy: the same quantized bytes as the concat graphs
    (no second data file), TensorScatter straight from FP16 cache inputs to outputs in the FP16
    copy (what KVCacheUpdate needs), and the same logits as the quantized concat decoder."""
    precision, out, _ = quantized
    art = OnnxArtifacts.open(out)
    cosines = art.manifest["quantization"]["decoder"]["derived_graphs_logits_cosine"]
    assert cosines["decoder.static.onnx"] > 0.9999 and cosines["decoder.static.fp16.onnx"] >= 0.99
    assert not list(out.glob("decoder.static*.data"))
    for name, data in (("decoder.static.onnx", "decoder.onnx.data"), ("decoder.static.fp16.onnx", "decoder.fp16.onnx.data")):
        m = onnx.load(str(out / name), load_external_data=False)
        assert {e.value for i in m.graph.initializer for e in i.external_data if e.key == "location"} == {data}
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == len([n for n in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node
                               if n.op_type == "DequantizeLinear"]) > 0
    m = onnx.load(str(out / "decoder.static.fp16.onnx"), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    inputs, outputs = {v.name for v in m.graph.input}, {v.name for v in m.graph.output}
    assert types["past_key_0"] == types["present_value_0"] == onnx.TensorProto.FLOAT16
    assert types["inputs_embeds"] == types["logits"] == onnx.TensorProto.FLOAT
    for n in (n for n in m.graph.node if n.op_type == "TensorScatter"):
        assert n.input[0] in inputs and n.output[0] in outputs
    assert "decoder_static" in art.manifest["io"]


def test_engine_builder_picks_the_graph_for_layout_and_typing(quantized, tiny_onnx):
    """Which ONNX `make engines` hands TensorRT (chosen off-device; the build itself needs it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_engines", ROOT / "build" / "build_engines.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    _, out, _ = quantized
    art, fp32 = OnnxArtifacts.open(out), OnnxArtifacts.open(tiny_onnx)
    pick = lambda a, kv, typed: build.decoder_onnx(a, kv, typed).name  # noqa: E731
    assert pick(art, "static", True) == "decoder.static.fp16.onnx"  # TensorRT 10.15+, Q/DQ
    assert pick(art, "concat", True) == "decoder.fp16.onnx"          # TensorRT 10.3, Q/DQ
    assert pick(art, "concat", False) == "decoder.onnx"              # TensorRT 8.5, INT8 flags
    assert pick(fp32, "static", False) == "decoder.static.onnx"      # FP16 flags, in place
    assert pick(fp32, "concat", False) == "decoder.onnx"


@pytest.fixture(scope="module")
def fp16(tiny_family):
    out = tiny_family / "onnx-fp16"
    return out, OnnxArtifacts.open(out).manifest["quantization"]["accuracy"]


def _fp32_inputs(model, op_type) -> bool:
    """Every float input of every `op_type` node is FP32 (typed by ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    return bool(nodes) and all(types.get(i) in (onnx.TensorProto.FLOAT, None, onnx.TensorProto.INT64)
                               for n in nodes for i in n.input if i)


def test_fp16_export_is_what_strongly_typed_builds_need(fp16, tiny_onnx):
    out, report = fp16
    art = OnnxArtifacts.open(out)
    assert QuantReport(**report).failures("fp16") == []
    assert art.manifest["quantization"]["source_digest"] == OnnxArtifacts.open(tiny_onnx).digest
    assert art.manifest["quantization"]["decoder"]["static_logits_cosine"] >= 0.99
    assert art.manifest["opset"] == {"vision_encoder": 17, "decoder": 17}  # no DQ: the export's own opset
    dec = onnx.load(str(art.path("decoder")))
    io = {v.name: v.type.tensor_type.elem_type for v in (*dec.graph.input, *dec.graph.output)}
    assert io["inputs_embeds"] == io["logits"] == onnx.TensorProto.FLOAT  # FP32 at the boundary
    assert io["past_key_0"] == io["present_value_1"] == onnx.TensorProto.FLOAT16  # half the cache traffic
    weights = [t for t in dec.graph.initializer if len(t.dims) == 2]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > len(weights) // 2
    for op in ("ReduceMean", "Pow", "Softmax", "Gemm"):  # norms, attention softmax, lm_head
        assert _fp32_inputs(dec, op), op
    vis = onnx.load(str(art.path("vision_encoder")))
    assert _fp32_inputs(vis, "LayerNormalization")
    # the cpu runner opens it like any export, FP16 cache and all
    from edgevlm.runtime.runners import open_decoder
    from edgevlm.runtime.text_model import open_text_model
    from tests.test_scheduler import alone
    assert open_decoder(out, kv_cache="concat").kv_dtype == np.float16
    model = open_text_model(out, kv_cache="concat")
    assert alone(model, model.tok.encode("Hi"), SamplingParams(max_tokens=4))[1].decode_tokens == 4


def test_int4_answers_through_tritonserver_as_it_does_in_process(tiny_family, start_server):
    """`make repo PRECISION=int4` on the cpu target: tritonserver runs the MatMulNBits decoder
    and the W8A8 vision encoder, and streams what the same export gives in process."""
    from edgevlm_client import Client

    from edgevlm.runtime.image import preprocess
    from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
    from edgevlm.runtime.runners import VisionEncoder
    from edgevlm.runtime.scheduler import Scheduler
    from edgevlm.runtime.text_model import open_text_model
    from edgevlm.samples import sample_image
    out = tiny_family / "onnx-int4"
    image = sample_image("chelsea")
    model = open_text_model(out)
    vision = VisionEncoder(out)
    embeds, _ = vision(preprocess(image, vision.cfg.vision.image_size)[None])
    ids = tokenize_prompt(model.tok, build_prompt("What is in the image?", image=True))
    sched = Scheduler(model, max_queue=1)
    try:
        local = list(sched.generate(ids, embeds, SamplingParams(max_tokens=12)))
    finally:
        sched.close()
    with start_server(out, max_sequences=2) as srv:
        r = Client(srv.grpc_url, timeout_s=120).generate("What is in the image?", image=image, max_tokens=12)
    assert r.text == "".join(e.text for e in local) and r.text
    assert r.stats["decode_tokens"] == local[-1].stats.decode_tokens


def _dq_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MatMul output -> (integers, scales) of the DequantizeLinear feeding it."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        dq = producers.get(n.input[1]) if n.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            out[n.output[0]] = (numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8),
                                numpy_helper.to_array(inits[dq.input[1]]))
    return out


def test_int4_pass_has_onnx_runtimes_integers_and_scales(tiny_onnx, tmp_path):
    """Our streaming INT4 pass against ONNX Runtime's own weight-only quantizer (QDQ form)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from edgevlm.export.quantize import quantize_decoder_weights
    quantize_decoder_weights(tiny_onnx / "decoder.onnx", tmp_path / "ours.onnx", 4)
    model = onnx.version_converter.convert_version(onnx.load(str(tiny_onnx / "decoder.onnx")), 21)
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, quant_format=QuantFormat.QDQ,
                                          op_types_to_quantize=("MatMul",), bits=4)
    q = MatMulNBitsQuantizer(model, algo_config=config)
    q.process()
    onnx.save(q.model.model, str(tmp_path / "ort.onnx"))
    ours, theirs = _dq_weights(tmp_path / "ours.onnx"), _dq_weights(tmp_path / "ort.onnx")
    assert set(ours) == set(theirs) and len(ours) == weight_matmuls(tiny_onnx / "decoder.onnx")
    for k in ours:
        np.testing.assert_array_equal(ours[k][0], theirs[k][0])
        np.testing.assert_array_equal(ours[k][1], theirs[k][1])


@pytest.mark.slow
def test_half_stored_export_quantizes_to_the_same_weights(tiny_ckpt, tiny_onnx, tmp_path):
    """A 16-bit-stored export (how a 7B is built) quantizes its projections from the 16-bit
    initializer behind each Cast, to the integers the FP32 export gives (the checkpoint is bf16,
    so the two hold the same values)."""
    from edgevlm.export.graphs import export_onnx
    from edgevlm.export.quantize import quantize_decoder_weights
    from edgevlm.runtime.onnxruntime import half_stored
    half = export_onnx(tiny_ckpt, tmp_path / "half", log=lambda m: None, weights="half")
    assert half_stored(half / "decoder.onnx") and not half_stored(tiny_onnx / "decoder.onnx")
    for bits in (8, 4):
        quantize_decoder_weights(half / "decoder.onnx", tmp_path / f"h{bits}.onnx", bits)
        quantize_decoder_weights(tiny_onnx / "decoder.onnx", tmp_path / f"f{bits}.onnx", bits)
        a, b = _dq_weights(tmp_path / f"h{bits}.onnx"), _dq_weights(tmp_path / f"f{bits}.onnx")
        assert len(a) == len(b) == weight_matmuls(tiny_onnx / "decoder.onnx")
        for x, y in zip(sorted(a.values(), key=lambda v: v[0].shape), sorted(b.values(), key=lambda v: v[0].shape)):
            np.testing.assert_array_equal(x[0], y[0])
        h = onnx.load(str(tmp_path / f"h{bits}.onnx"), load_external_data=False)
        assert not any(n.op_type == "Cast" and n.input[0] in {t.name for t in h.graph.initializer}
                       for n in h.graph.node)  # no 16-bit weight left behind
