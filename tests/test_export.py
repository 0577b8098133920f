"""ONNX export of tiny V1 (LDP) and V2 (LDPv2) models: contract, parity, atomic outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgevlm.export import cleanup, graphs
from edgevlm.model.checkpoint import CheckpointError
from edgevlm.manifest import ManifestError, OnnxArtifacts
from edgevlm.export.graphs import decoder_io, export_onnx
from edgevlm.export.parity import run_parity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["tiny", "tiny-v1"])
def exported(request, tmp_path_factory):
    ckpt = request.getfixturevalue("tiny_ckpt" if request.param == "tiny" else "tiny_v1_ckpt")
    out = tmp_path_factory.mktemp("onnx") / request.param
    export_onnx(ckpt, out, log=lambda m: None)
    return ckpt, out


def test_manifest_describes_the_tensor_contract(exported):
    ckpt, out = exported
    art = OnnxArtifacts.open(out)
    m = art.manifest
    cfg = art.config
    assert m["opset"] == 17 and m["source"]["sha256"] and m["image"]["tokens"] == cfg.image_tokens
    v = m["io"]["vision_encoder"]
    assert v["inputs"] == [{"name": "pixel_values", "dtype": "float32",
                            "shape": ["batch", 3, cfg.vision.image_size, cfg.vision.image_size]}]
    assert v["outputs"][0]["shape"] == ["batch", cfg.image_tokens, cfg.text.hidden_size]
    d = m["io"]["decoder"]
    ins, outs = decoder_io(cfg.text.num_layers)
    assert [t["name"] for t in d["inputs"]] == ins and [t["name"] for t in d["outputs"]] == outs
    assert d["inputs"][0]["shape"] == ["batch", "seq", cfg.text.hidden_size]
    assert d["inputs"][1]["dtype"] == "int64"
    assert d["inputs"][2]["shape"] == ["batch", cfg.text.num_kv_heads, "past", cfg.text.head_dim]
    assert d["outputs"][0]["shape"] == ["batch", cfg.text.vocab_size]
    assert not list(out.parent.glob(".*partial"))


def test_graphs_are_opset_17_and_checker_clean(exported):
    _, out = exported
    for name in ("vision_encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(out / name))
        assert {o.domain: o.version for o in model.opset_import}.get("", 17) == 17
        assert model.ir_version == 8  # TensorRT 8.5 (JetPack 5) rejects newer IR versions
        onnx.checker.check_model(model, full_check=True)
        assert not [n for n in model.graph.node if n.op_type == "Constant"]  # folded


def test_parity_with_the_pytorch_reference_on_real_photos(exported):
    ckpt, out = exported
    report = run_parity(ckpt, out, images=["chelsea", "camera"], new_tokens=32, log=lambda m: None)
    assert report.ok(1e-3), report.summary(1e-3)
    assert len(report.cases) == 3 and all(c.tokens_match for c in report.cases)
    assert all(c.static_tokens == c.ref_tokens for c in report.cases)  # decoder.static.onnx too
    assert report.worst("logits_err") < 1e-3


def test_decoder_handles_batches_and_a_prefill_then_decode_split(exported):
    _, out = exported
    art = OnnxArtifacts.open(out)
    t = art.config.text
    sess = ort.InferenceSession(str(art.path("decoder")))
    ins, _ = decoder_io(t.num_layers)
    x = np.random.default_rng(0).standard_normal((2, 7, t.hidden_size)).astype(np.float32)

    def run(xs, pos, past):
        feeds = {"inputs_embeds": xs, "position_ids": pos, **dict(zip(ins[2:], past))}
        return sess.run(None, feeds)

    empty = [np.zeros((2, t.num_kv_heads, 0, t.head_dim), np.float32)] * (2 * t.num_layers)
    full = run(x, np.tile(np.arange(7), (2, 1)), empty)
    first = run(x[:, :5], np.tile(np.arange(5), (2, 1)), empty)
    mid = run(x[:, 5:6], np.full((2, 1), 5), first[1:])
    last = run(x[:, 6:], np.full((2, 1), 6), mid[1:])
    np.testing.assert_allclose(last[0], full[0], atol=1e-4)
    assert last[1].shape == (2, t.num_kv_heads, 7, t.head_dim)


def test_static_decoder_is_tensor_scatter_from_input_to_output_on_shared_weights(exported):
    """What TensorRT's KVCacheUpdate import needs: opset 24 TensorScatter on axis -2 reading a
    graph input cache and producing a graph output; its weights are decoder.onnx's bytes."""
    _, out = exported
    art = OnnxArtifacts.open(out)
    t = art.config.text
    path = art.path("decoder_static")
    model = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import} == {"": 24} and model.ir_version == 10
    scatters = [n for n in model.graph.node if n.op_type == "TensorScatter"]
    assert len(scatters) == 2 * t.num_layers
    inputs, outputs = {v.name for v in model.graph.input}, {v.name for v in model.graph.output}
    for n in scatters:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"axis": -2, "mode": b"linear"}
        assert n.input[0] in inputs and n.output[0] in outputs
        assert n.output[0] == n.input[0].replace("past_", "present_")
    locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations <= {"decoder.onnx.data"} and not (out / "decoder.static.onnx.data").exists()
    onnx.checker.check_model(str(path), full_check=True)
    io = art.manifest["io"]["decoder_static"]
    assert io["inputs"][2]["shape"] == ["batch", t.num_kv_heads, "cache", t.head_dim]
    assert io["outputs"][2]["shape"] == io["inputs"][2]["shape"]


def test_static_decoder_writes_into_the_callers_cache_buffer(exported):
    """ONNX Runtime updates the bound buffer itself: after a step it holds the concat graph's
    keys and values at the written slots and zeros beyond."""
    from edgevlm.runtime.onnxruntime import OrtDecoder
    _, out = exported
    art = OnnxArtifacts.open(out)
    t = art.config.text
    concat = OrtDecoder(art.path("decoder"), t)
    static = OrtDecoder(art.path("decoder_static"), t, static=True)
    x = np.random.default_rng(1).standard_normal((1, 6, t.hidden_size)).astype(np.float32)
    want_logits, want_kv = concat(x, np.arange(6)[None], concat.empty_cache())
    pool = static.open_pool(1, max_context=10)
    row = pool.acquire(10)
    buffers = [b.ctypes.data for b in pool.buffers]
    pool.prefill(row, x[:, :5])
    got = pool.prefill(row, x[:, 5:])
    np.testing.assert_allclose(got, want_logits[0], atol=1e-4)
    assert [b.ctypes.data for b in pool.buffers] == buffers  # same buffers, no swap
    for buf, want in zip(pool.buffers, want_kv):
        cache = pool._view(buf, row.index, 1)
        np.testing.assert_allclose(cache[:, :, :6], want, atol=1e-5)
        assert not cache[:, :, 6:].any()
    with pytest.raises(ValueError, match="capacity 10 exceeded"):
        pool.prefill(row, np.zeros((1, 5, t.hidden_size), np.float32))


def test_a_full_static_pool_admits_a_row_the_spare_granule_crowded(exported):
    """A lone row grows its width a granule past its need while the budget has room; a second
    row that fits() at the rows' capacities is then still admitted, the first row's cache kept."""
    from edgevlm.runtime.onnxruntime import OrtDecoder
    from edgevlm.runtime.packed_rows import GRANULE
    _, out = exported
    art = OnnxArtifacts.open(out)
    t = art.config.text
    static = OrtDecoder(art.path("decoder_static"), t, static=True)
    per = t.kv_bytes_per_position(static.kv_dtype.itemsize)
    pool = static.open_pool(2, budget_bytes=2 * 2 * GRANULE * per)  # two rows of 2 granules
    x = np.random.default_rng(2).standard_normal((1, GRANULE + 6, t.hidden_size)).astype(np.float32)
    first = pool.acquire(2 * GRANULE)
    pool.prefill(first, x)
    assert pool.width == 3 * GRANULE  # the spare granule, while there is room for it
    kept = pool.save(first, first.length)
    second = pool.acquire(2 * GRANULE)
    pool.load(second, kept)
    for a, b in zip(pool.save(first, first.length), pool.save(second, second.length)):
        np.testing.assert_array_equal(a, b)
    assert pool.width * len(pool.rows) <= pool.positions


def test_pinned_static_decoder_has_fixed_cache_shapes(exported, tmp_path):
    """make engines pins batch and cache before TensorRT parses the graph: the pinned graph
    runs at exactly that capacity and gives the unpinned graph's logits."""
    import shutil
    _, out = exported
    art = OnnxArtifacts.open(out)
    t = art.config.text
    shutil.copy2(out / "decoder.onnx.data", tmp_path)
    model = cleanup.pin_dims(onnx.load(str(art.path("decoder_static")), load_external_data=False),
                           {"batch": 1, "cache": 24})
    onnx.save(model, str(tmp_path / "pinned.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "pinned.onnx"))
    assert sess.get_inputs()[2].shape == [1, t.num_kv_heads, 24, t.head_dim]
    assert sess.get_inputs()[0].shape == [1, "seq", t.hidden_size]
    x = np.random.default_rng(2).standard_normal((1, 4, t.hidden_size)).astype(np.float32)
    cache = [np.zeros((1, t.num_kv_heads, 24, t.head_dim), np.float32)] * (2 * t.num_layers)
    names = decoder_io(t.num_layers)[0]
    feeds = {"inputs_embeds": x, "position_ids": np.arange(4)[None], **dict(zip(names[2:], cache))}
    free = ort.InferenceSession(str(art.path("decoder_static")))
    np.testing.assert_allclose(sess.run(["logits"], feeds)[0], free.run(["logits"], feeds)[0], atol=1e-5)
    small = {**feeds, **{n: c[:, :, :16] for n, c in zip(names[2:], cache)}}
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(["logits"], small)


def test_failed_export_leaves_no_files_and_keeps_the_previous_output(tmp_path, tiny_ckpt, monkeypatch):
    out = tmp_path / "onnx"
    with pytest.raises(CheckpointError):
        export_onnx(tmp_path / "nowhere", out, log=lambda m: None)
    assert not out.exists()

    out.mkdir()
    (out / "manifest.json").write_text("{}")

    def broken(*a, **k):
        raise cleanup.GraphError("simulated failure in graph cleanup")

    monkeypatch.setattr(graphs.cleanup, "clean", broken)
    with pytest.raises(cleanup.GraphError):
        export_onnx(tiny_ckpt, out, log=lambda m: None)
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no .partial directory
    assert json.loads((out / "manifest.json").read_text()) == {}
    with pytest.raises(ManifestError, match="format"):
        OnnxArtifacts.open(out)


def test_opset18_split_and_reduce_are_rewritten_for_opset17(tmp_path):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6])
    outs = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in
            (("a", [2, 3]), ("b", [2, 3]), ("m", [2, 1]))]
    axes = h.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])
    nodes = [h.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
             h.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1, noop_with_empty_axes=0)]
    model = h.make_model(h.make_graph(nodes, "g", [x], outs, [axes]), opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "in.onnx")
    cleanup.clean(tmp_path / "in.onnx", tmp_path / "out.onnx", ["x"], ["a", "b", "m"])
    data = np.arange(12, dtype=np.float32).reshape(2, 6)
    want = ort.InferenceSession(str(tmp_path / "in.onnx")).run(None, {"x": data})
    got = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"x": data})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    cleaned = onnx.load(str(tmp_path / "out.onnx"))
    assert (cleaned.opset_import[0].version, cleaned.ir_version) == (17, 8)


def test_verify_cli_fails_on_a_broken_graph(exported, tmp_path):
    import shutil
    ckpt, out = exported
    broken = shutil.copytree(out, tmp_path / "broken")
    table = np.load(broken / "embed_tokens.npy")
    np.save(broken / "embed_tokens.npy", table + 0.05 * np.random.default_rng(0).standard_normal(table.shape).astype(np.float32))
    cmd = [sys.executable, str(ROOT / "build" / "verify.py"), "--checkpoint", str(ckpt),
           "--images", "chelsea", "--tokens", "8"]
    good = subprocess.run(cmd + ["--onnx", str(out)], capture_output=True, text=True)
    bad = subprocess.run(cmd + ["--onnx", str(broken)], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "parity PASS" in good.stdout.splitlines()[-1]
    assert bad.returncode == 1 and "parity FAIL" in bad.stdout
