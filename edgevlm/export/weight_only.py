"""Weight-only Q/DQ passes over a decoder graph: every MatMul whose B is a weight gets that
weight as integers plus a DequantizeLinear feeding it (the form TensorRT builds from).

    INT8  per output channel, symmetric: W[K, N] -> int8 + scale[N], DQ axis 1 (opset 13+)
    INT4  blocks of 128 along K, symmetric: int4 + scale[K/128, N], DQ axis 0 block_size 128
          (opset 21); the integers and scales are ONNX Runtime's weight-only quantizer's
          (quantize_int4), which tests/test_quantize.py checks against it

A weight is an FP32 initializer, or a 16-bit one behind a Cast (export/half_weights.py). These
passes are ours rather than ONNX Runtime's because its quantizer wants FP32 initializers in
memory (a 7B: 27 GB) and writes 8-bit weights only as its own MatMulNBits op. Each weight is
read from the export's data file as it is converted (base_dir: where that file is), so the
peak is the quantized weights so far plus one FP32 weight, not the 16-bit model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT4_BLOCK = 128
_HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _weights(model: onnx.ModelProto):
    """(MatMul node, weight initializer, the Cast between them or None) for each weight MatMul."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    found = []
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        b = node.input[1]
        if b in inits and inits[b].data_type == onnx.TensorProto.FLOAT and len(inits[b].dims) == 2:
            found.append((node, inits[b], None))
            continue
        cast = producers.get(b)
        if (cast is not None and cast.op_type == "Cast" and uses[b] == 1 and cast.input[0] in inits
                and inits[cast.input[0]].data_type in _HALF and len(inits[cast.input[0]].dims) == 2):
            found.append((node, inits[cast.input[0]], cast))
    return found


def _replace(model: onnx.ModelProto, node, weight, cast, new_inits: list, dq: onnx.NodeProto) -> None:
    g = model.graph
    g.initializer.remove(weight)
    if cast is not None:
        g.node.remove(cast)
    g.initializer.extend(new_inits)
    g.node.insert(list(g.node).index(node), dq)
    node.input[1] = dq.output[0]


def _read(t: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """A weight as FP32, from its data file where it is stored outside the graph."""
    return numpy_helper.to_array(t, base_dir).astype(np.float32)


def int8(model: onnx.ModelProto, base_dir: str = "") -> int:
    """In place; returns how many weights were quantized."""
    count = 0
    for node, t, cast in _weights(model):
        w = _read(t, base_dir)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        qt = numpy_helper.from_array(q, t.name + "_int8")
        st = numpy_helper.from_array(scale.astype(np.float32), t.name + "_scale")
        dq = helper.make_node("DequantizeLinear", [qt.name, st.name], [t.name + "_dequantized"],
                              name=t.name + "_DequantizeLinear", axis=1)
        _replace(model, node, t, cast, [qt, st], dq)
        count += 1
    return count


def quantize_int4(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w[K, N] -> (int4 values q[K, N] as int8, scales[ceil(K/block), N]), as ONNX Runtime's
    blockwise quantizer computes them: the block's larger-magnitude extreme (the minimum on a
    tie) over -8 as the scale, then w times the FP32 reciprocal, rounded half away from zero
    (16-bit weights land on exact halves often)."""
    k, n = w.shape
    nb = -(-k // block)
    padded = np.zeros((nb * block, n), np.float32)
    padded[:k] = w
    blocks = padded.reshape(nb, block, n)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    scales = (np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-8)).astype(np.float32)
    recip = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)
    t = (blocks * recip[:, None, :]).astype(np.float64)
    q = np.clip(np.sign(t) * np.floor(np.abs(t) + 0.5), -8, 7).astype(np.int8)
    return q.reshape(nb * block, n)[:k], scales


def _int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """ONNX INT4: two values per byte, the first in the low nibble, row-major."""
    flat = (q.reshape(-1).astype(np.uint8) & 0x0F)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, onnx.TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True)


def int4(model: onnx.ModelProto, block: int = INT4_BLOCK, base_dir: str = "") -> int:
    """In place (the graph must be at opset 21+); zero points explicit (all 0): TensorRT's ONNX
    importer takes the INT4 type from the zero point. Returns how many weights were quantized."""
    count = 0
    for node, t, cast in _weights(model):
        q, scales = quantize_int4(_read(t, base_dir), block)
        qt = _int4_tensor(t.name + "_DQ_Q4", q)
        st = numpy_helper.from_array(scales, t.name + "_DQ_scales")
        zp = _int4_tensor(t.name + "_DQ_Q4_zero_point", np.zeros(scales.shape, np.int8))
        dq = helper.make_node("DequantizeLinear", [qt.name, st.name, zp.name], [t.name + "_DQ_Q4_output"],
                              name=t.name + "_DQ_Q4", axis=0, block_size=block)
        _replace(model, node, t, cast, [qt, st, zp], dq)
        count += 1
    return count
