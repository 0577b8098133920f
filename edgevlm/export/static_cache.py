"""decoder.static.onnx: the decoder with a fixed-capacity KV cache updated in place.

Same inputs and outputs as decoder.onnx, except that past_* and present_* are one
[batch, kv_heads, cache, head_dim] tensor each, `cache` being the capacity the runner
allocates. Each layer writes its new keys and values with ONNX TensorScatter (opset 24) at
position_ids[:, 0]; the output is the updated cache. That is the form TensorRT >= 10.15 maps to
its KVCacheUpdate layer, whose output must alias the cache input (the cache must be a network
input and the update a network output, both true here). ONNX Runtime also skips the copy when
the output is bound to the input's buffer. Step shapes stay constant, which is what CUDA graph
capture of the decode step needs.

The graph comes from its own torch export (the reference's `kv_cache_update` custom op,
translated to an `edgevlm` domain placeholder), cleaned like every other graph, converted to
opset 24, and the placeholders become TensorScatter. Its weights are the decoder's: they are
pointed at decoder.onnx.data rather than written twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnxscript
import torch

from edgevlm.export import cleanup

OPSET = 24  # TensorScatter
IR_VERSION = 10  # the IR of opset 24 that ONNX Runtime 1.2x reads
PLACEHOLDER_DOMAIN = "edgevlm"
PLACEHOLDER_OP = "KvCacheUpdate"



def _register_placeholder() -> None:
    # onnxscript builds nodes only for ops with a schema; TensorScatter itself is newer than
    # the opsets it ships, so the export emits this stand-in and to_tensor_scatter swaps it.
    if onnx.defs.has(PLACEHOLDER_OP, PLACEHOLDER_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    onnx.defs.register_schema(onnx.defs.OpSchema(
        PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, 1,
        inputs=[param("cache", "T"), param("update", "T"), param("write_index", "tensor(int64)")],
        outputs=[param("present", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "cache element type")]))


def _kv_cache_update(cache, update, write_index):
    return onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1).KvCacheUpdate(cache, update, write_index)


def translation_table() -> dict:
    """For torch.onnx.export: the reference's custom op -> one placeholder node."""
    _register_placeholder()
    return {torch.ops.edgevlm.kv_cache_update.default: _kv_cache_update}


def to_tensor_scatter(model: onnx.ModelProto, num_layers: int) -> onnx.ModelProto:
    """Cleaned opset-17 graph with placeholders -> opset-24 graph with TensorScatter."""
    model = onnx.version_converter.convert_version(model, OPSET)
    found = 0
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == PLACEHOLDER_OP:
            node.domain, node.op_type = "", "TensorScatter"
            # axis -2 is the form TensorRT's parser accepts (4-D cache, sequence axis 2)
            node.attribute.extend([onnx.helper.make_attribute("axis", -2),
                                   onnx.helper.make_attribute("mode", "linear")])
            found += 1
        elif node.domain not in ("", "ai.onnx"):
            raise cleanup.GraphError(f"node {node.name}: unexpected domain {node.domain!r}")
    if found != 2 * num_layers:
        raise cleanup.GraphError(f"static decoder: {found} cache updates, expected {2 * num_layers}")
    kept = [e for e in model.opset_import if e.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    cleanup.set_opset(model, OPSET, IR_VERSION)
    _check_cache_io(model, num_layers)
    return model


def _check_cache_io(model: onnx.ModelProto, num_layers: int) -> None:
    """TensorRT's KVCacheUpdate needs the cache to be a graph input and the updated cache a
    graph output: check each TensorScatter reads past_<kv>_<i> and writes present_<kv>_<i>."""
    pairs = {(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "TensorScatter"}
    want = {(f"past_{kv}_{i}", f"present_{kv}_{i}") for i in range(num_layers) for kv in ("key", "value")}
    if pairs != want:
        raise cleanup.GraphError(f"static decoder: cache updates {sorted(pairs - want)} are not "
                               "graph input -> graph output")


def share_weights(model: onnx.ModelProto, own_data: Path, shared: Path) -> int:
    """Point every external initializer of `model` (stored in own_data) at the identical bytes
    in the data file of the graph `shared`; returns the bytes de-duplicated. Fails if any
    tensor has no twin, so the caller can keep own_data instead."""
    def extent(t: onnx.TensorProto) -> tuple[int, int]:
        kv = {e.key: e.value for e in t.external_data}
        return int(kv.get("offset", 0)), int(kv["length"])

    def digest(f, off: int, n: int) -> bytes:  # read in pieces: no 5 GB of mapped pages
        h = hashlib.sha256()
        f.seek(off)
        while n > 0:
            chunk = f.read(min(n, 64 << 20))
            h.update(chunk)
            n -= len(chunk)
        return h.digest()

    def external(m: onnx.ModelProto):
        return [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]

    shared_data = shared.with_name(shared.name + ".data")
    index = {}
    with shared_data.open("rb") as f:
        for t in external(onnx.load(str(shared), load_external_data=False)):
            off, n = extent(t)
            index[(t.data_type, tuple(t.dims), digest(f, off, n))] = (off, n)
    saved = 0
    with own_data.open("rb") as f:
        for t in external(model):
            off, n = extent(t)
            key = (t.data_type, tuple(t.dims), digest(f, off, n))
            if key not in index:
                raise cleanup.GraphError(f"static decoder: weight {t.name} has no twin in {shared_data.name}")
            new_off, new_n = index[key]
            del t.external_data[:]
            for k, v in (("location", shared_data.name), ("offset", str(new_off)), ("length", str(new_n))):
                t.external_data.add(key=k, value=v)
            saved += n
    return saved


def share_file_weights(path: Path, shared: Path) -> int:
    """share_weights for a graph saved at `path` with its own `<path>.data`: rewritten to
    point into `shared`'s data, its own data file removed."""
    model = onnx.load(str(path), load_external_data=False)
    own = path.with_name(path.name + ".data")
    saved = share_weights(model, own, shared)
    onnx.save_model(model, str(path))
    own.unlink()
    onnx.checker.check_model(str(path))
    return saved
