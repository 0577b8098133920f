"""ONNX graph cleanup with onnx-graphsurgeon: fold, prune, sort, pin the opset, save.

torch's exporter emits opset 18. TensorRT 8.5 (JetPack 5) parses up to opset 17, and the onnx
version converter has no Split adapter for 18 -> 17, so the few constructs that changed in
opset 18 are rewritten here by hand. Anything else from opset 18 fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

TARGET_OPSET = 17
TARGET_IR_VERSION = 8  # the IR that goes with opset 17 (onnx 1.12), as TensorRT 8.5 expects
EXPORT_OPSET = 18  # what torch's dynamo exporter emits natively
FOLD_MAX_BYTES = 64 << 20  # never materialise a folded constant larger than this
# Ops whose opset-18 form moved `axes` from an attribute to an input.
_REDUCE_AXES_MOVED = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                      "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"}
# Ops new in opset 18: no opset-17 form at all.
_NEW_IN_18 = {"CenterCropPad", "Col2Im", "GroupNormalization", "BitwiseAnd", "BitwiseOr",
              "BitwiseXor", "BitwiseNot"}


def _uses_opset18_features(node: gs.Node) -> bool:
    """Opset-18 versions of older ops that use what opset 17 cannot express."""
    if node.op == "Pad":
        return len(node.inputs) > 3  # the new `axes` input
    if node.op == "Resize":
        return bool({"antialias", "axes", "keep_aspect_ratio_policy"} & set(node.attrs))
    if node.op in ("ScatterElements", "ScatterND"):
        return node.attrs.get("reduction") in ("max", "min")
    if node.op == "LpPool":
        return "ceil_mode" in node.attrs
    return node.op in _NEW_IN_18


class GraphError(RuntimeError):
    pass


def clean(src: Path, dst: Path, input_names: list[str], output_names: list[str],
          allow_domains: tuple[str, ...] = (), finish=None, unfoldable: tuple[str, str] | None = None) -> None:
    """src ONNX (+ its external data) -> cleaned opset-17 ONNX at dst (+ `<dst>.data`).

    The weights are never loaded: graphsurgeon keeps each external initializer's TensorProto
    (a file reference) as is, so rewriting a 1.7B decoder costs megabytes, not three copies of
    its 5.6 GB. The exporter's data file moves beside dst unchanged. finish(model), if given,
    edits the cleaned graph in place before it is saved (placeholders becoming standard ops).
    unfoldable (domain, op): nodes of that op keep their constant inputs out of folding (a
    placeholder op fed by weights, which cannot be evaluated: one such node in the foldable set
    stops all folding, and folding it would materialise what it computes).
    """
    model = onnx.load(str(src), load_external_data=False)
    with _cwd(src.parent):  # a weight that folding does need is read relative to src
        graph = gs.import_onnx(model)
        held = _hold_constants(graph, unfoldable) if unfoldable else {}
        graph.fold_constants(size_threshold=FOLD_MAX_BYTES).cleanup(
            remove_unused_graph_inputs=False).toposort()
        for node, i, constant in held.values():
            node.inputs[i] = constant
        downgrade_to_opset17(graph, allow_domains)
        graph.cleanup().toposort()
        got_in, got_out = [t.name for t in graph.inputs], [t.name for t in graph.outputs]
        if got_in != input_names or got_out != output_names:
            raise GraphError(f"{dst.name}: IO names changed in export: inputs {got_in}, "
                             f"outputs {got_out}; expected {input_names} -> {output_names}")
        model = gs.export_onnx(graph)
    set_opset(model)  # the exporter's import list still says 18
    if finish is not None:
        finish(model)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    files = {e.value for t in external for e in t.external_data if e.key == "location"}
    if len(files) > 1:
        raise GraphError(f"{src.name}: weights spread over several files: {sorted(files)}")
    if files:
        data = dst.with_name(dst.name + ".data")
        shutil.move(str(src.parent / files.pop()), data)
        for t in external:
            for e in t.external_data:
                if e.key == "location":
                    e.value = data.name
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))  # the path form also checks the data file's extents


def _hold_constants(graph: gs.Graph, op: tuple[str, str]) -> dict:
    """Swap the constant inputs of `op` nodes for stand-in variables (undone after folding)."""
    held = {}
    for node in graph.nodes:
        if (node.domain, node.op) != op:
            continue
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant):
                node.inputs[i] = gs.Variable(t.name + "_held", shape=t.shape)
                held[t.name] = (node, i, t)
    return held


def opset_of(model: onnx.ModelProto) -> int:
    return next(e.version for e in model.opset_import if e.domain in ("", "ai.onnx"))


def set_opset(model: onnx.ModelProto, version: int = TARGET_OPSET, ir_version: int = TARGET_IR_VERSION) -> None:
    """Label the default domain's opset (the graph must already be valid at it)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    model.ir_version = ir_version


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def downgrade_to_opset17(graph: gs.Graph, allow_domains: tuple[str, ...] = ()) -> None:
    for node in graph.nodes:
        if node.domain in allow_domains:
            continue
        if node.domain not in (None, "", "ai.onnx"):
            raise GraphError(f"node {node.name}: custom domain {node.domain!r} in an exported graph")
        if _uses_opset18_features(node):
            raise GraphError(f"node {node.name}: this {node.op} has no opset-17 form; "
                             "extend graph.downgrade_to_opset17")
        if node.op in _REDUCE_AXES_MOVED:
            if node.attrs.pop("noop_with_empty_axes", 0) and len(node.inputs) < 2:
                raise GraphError(f"node {node.name}: {node.op} with noop_with_empty_axes")
            if len(node.inputs) > 1:
                node.attrs["axes"] = [int(a) for a in _constant(node, node.inputs[1], "axes")]
                node.inputs = node.inputs[:1]
        elif node.op == "Split" and "num_outputs" in node.attrs:
            n = node.attrs.pop("num_outputs")
            shape = node.inputs[0].shape
            axis = node.attrs.get("axis", 0)
            dim = shape[axis] if shape is not None else None
            if not isinstance(dim, int):
                raise GraphError(f"node {node.name}: Split over a dynamic axis")
            # opset 18 gives the last chunk the remainder (ceil-sized chunks first)
            step = -(-dim // n)
            sizes = [min(step, dim - i * step) for i in range(n)]
            node.inputs.append(gs.Constant(f"{node.name}_split", np.array(sizes, np.int64)))


def _constant(node: gs.Node, t: gs.Tensor, what: str) -> np.ndarray:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        return np.asarray(t.inputs[0].attrs["value"].values)
    raise GraphError(f"node {node.name}: {what} is computed at run time; cannot downgrade")


def toposort_nodes(model: onnx.ModelProto) -> None:
    """Order the main graph's nodes so each comes after its inputs' producers (in place; the
    float16 converter appends its Casts at the end). Weights are not touched."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise GraphError(f"graph has a cycle or a missing input near node {pending[0].name}")
        for n in ready:
            known.update(n.output)
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        ordered += ready
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def pin_dims(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """Replace named symbolic dims of the graph's inputs and outputs by fixed sizes (in place)."""
    for v in [*model.graph.input, *model.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = dims[d.dim_param]  # clears dim_param (a oneof)
    return model


def io_specs(path: Path) -> dict:
    """{"inputs": [...], "outputs": [...]} with name, dtype and shape (ints or axis names)."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": dims}

    return {"inputs": [spec(v) for v in model.graph.input],
            "outputs": [spec(v) for v in model.graph.output]}
