"""The cpu twin's attention as GroupQueryAttention computes what the exported attention does:
same logits and the same cache contents, through prefill, decode, a prompt continued on a
filled cache, and a packed batch of rows at different lengths."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest

from edgevlm.export import fused_attention
from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.onnxruntime import OrtDecoder
from edgevlm.runtime.ort_packed_pool import OrtPackedPool


def _pair(export_dir, out):
    """(the export's static decoder, the same graph with fused attention saved in `out`)."""
    art = OnnxArtifacts.open(export_dir)
    text = art.config.text
    src = art.path("decoder_static")
    model = onnx.load(str(src), load_external_data=False)
    before = len(model.graph.node)
    assert fused_attention.fuse(model, text) == text.num_layers
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == text.num_layers
    assert "TensorScatter" not in ops and "Softmax" not in ops and len(ops) < before
    for f in export_dir.iterdir():  # the graph's weights stay in the export's data file
        if f.name.endswith(".data"):
            shutil.copy(f, out / f.name)
    onnx.save(model, str(out / "decoder.static.onnx"))
    return (OrtDecoder(src, text, static=True), OrtDecoder(out / "decoder.static.onnx", text, static=True))


@pytest.fixture(scope="module")
def decoders(tiny_onnx, tmp_path_factory):
    return _pair(tiny_onnx, tmp_path_factory.mktemp("fused"))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """tiny-llava-v1.6: 2 KV heads for 4 query heads, rope theta 1e6 (the Mistral 7B's shape)."""
    from edgevlm.export.graphs import export_onnx
    from edgevlm.model.random_weights import write_random_checkpoint
    from edgevlm.presets import PRESETS
    root = tmp_path_factory.mktemp("grouped")
    ckpt = write_random_checkpoint(root / "checkpoint", PRESETS["tiny-llava-v1.6"], layout_format="llava-hf",
                                   fmt="safetensors", seed=3)
    (root / "fused").mkdir()
    return _pair(export_onnx(ckpt, root / "onnx", log=lambda m: None), root / "fused")


def _embeds(rng, s, d):
    return (rng.standard_normal((1, s, d)) * 0.5).astype(np.float32)


@pytest.mark.parametrize("which", ["decoders", "grouped"])
def test_one_sequence_gives_the_same_logits_and_cache(which, request):
    exported, fused = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    (pa, a), (pb, b) = [(p, p.acquire(48)) for p in (exported.open_pool(1, max_context=48),
                                                       fused.open_pool(1, max_context=48))]
    for s in (13, 1, 1, 6, 1):  # a prompt, two tokens, a follow-up prompt on the filled cache, a token
        x = _embeds(rng, s, exported.cfg.hidden_size)
        np.testing.assert_allclose(pb.prefill(b, x), pa.prefill(a, x), atol=1e-4, rtol=0)
    for ka, kb in zip(pa.save(a, a.length), pb.save(b, b.length)):
        np.testing.assert_allclose(kb, ka, atol=1e-5, rtol=0)


def test_a_packed_batch_of_rows_at_different_lengths(decoders):
    # the batching scheduler's pool: rows prefilled one by one, then decoded together, one of
    # them restored from a saved prefix first (as the prefix cache does)
    rng = np.random.default_rng(1)
    d = decoders[0].cfg.hidden_size
    prompts = [_embeds(rng, n, d) for n in (9, 4, 15)]
    steps = [(rng.standard_normal((3, 1, d)) * 0.5).astype(np.float32) for _ in range(4)]
    results = []
    for dec in decoders:
        pool = OrtPackedPool(dec, max_rows=4, budget_bytes=4 << 20)
        rows = [pool.acquire(40) for _ in prompts]
        first = [pool.prefill(r, p) for r, p in zip(rows, prompts)]
        saved = pool.save(rows[1], 4)
        pool.release(rows[1])
        again = pool.acquire(40)
        pool.load(again, saved)
        rows[1] = again
        first.append(pool.prefill(again, _embeds(np.random.default_rng(2), 3, d)))
        later = [pool.decode(rows, x).copy() for x in steps]
        results.append((np.stack(first), np.stack(later)))
    (fa, la), (fb, lb) = results
    np.testing.assert_allclose(fb, fa, atol=1e-4, rtol=0)
    np.testing.assert_allclose(lb, la, atol=1e-4, rtol=0)


def test_a_head_size_the_kernel_cannot_take_keeps_the_exported_attention(tiny_onnx):
    art = OnnxArtifacts.open(tiny_onnx)
    model = onnx.load(str(art.path("decoder_static")), load_external_data=False)
    text = replace(art.config.text, hidden_size=art.config.text.num_heads * 40)  # head size 40
    nodes = [n.SerializeToString() for n in model.graph.node]
    assert fused_attention.fuse(model, text) == 0
    assert [n.SerializeToString() for n in model.graph.node] == nodes
