"""The cpu target's form of a quantized decoder: ONNX Runtime's MatMulNBits kernels.

The Q/DQ decoders `make quantize` writes are what TensorRT builds from, and their lm_head stays
FP32. `com.microsoft.MatMulNBits`, ONNX Runtime's weight-only kernel, keeps the weights packed
and multiplies them directly (MLAS; with accuracy_level 4 the activations are quantized to int8
per block and the products run on integer dot-product instructions: VNNI, or AVX2 where there is
none). Decode on a CPU reads every weight once per token, so bytes per token set its pace.

This pass rewrites each weight-only DQ -> MatMul pair into one MatMulNBits node holding the
*same* integers and scales:
    INT4, blocks of 128 along K (axis 0)   -> bits 4, block_size 128, uint4 = q + 8
    INT8 per output channel (axis 1)       -> bits 8, block_size 256, uint8 = q + 128, every
                                              block of a column given that column's scale
and quantizes the one matmul the Q/DQ graph keeps FP32, the lm_head (a Gemm on the last
position; at the 1.7B shape 262 MB of FP32, a third of the INT4 decoder), symmetric
round-to-nearest in blocks along K (LM_HEAD: 8 bits for an INT8 decoder; 4 bits for an INT4
one, where the 8-bit head was 10 % of the bytes a token reads and measured 5 % of its step
time, in blocks of 32, finer than the body's 128, since its errors land on the logits
directly). Its cost shows in the parity gate (the cpu form is checked against FP32 like the
Q/DQ one).

MatMulNBits layout (onnxruntime/core/graph/contrib_ops/contrib_defs.cc): B is uint8
[N, n_blocks, block_size * bits / 8], each column's K values in order, two 4-bit values per
byte low nibble first; scales [N * n_blocks]; no zero_points input means the midpoint (8 or 128).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgevlm.export import fused_attention
from edgevlm.presets import TextConfig

INT8_BLOCK = 256      # divides the 1.7B shape's K (2048, 5632); per-channel scales repeat per block
LM_HEAD = {8: (8, 128), 4: (4, 32)}  # the decoder's bits -> the lm_head's (bits, block)
ACCURACY_LEVEL = 4    # int8 activations: the compute path MLAS has fast kernels for (see make bench)
MS_DOMAIN = "com.microsoft"


def pack(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed integers q[K, N] (already the weight's values) -> MatMulNBits' B [N, n_blocks, blob]."""
    k, n = q.shape
    n_blocks = -(-k // block)
    u = np.full((n, n_blocks * block), 1 << (bits - 1), np.uint8)  # padding dequantizes to 0
    u[:, :k] = (q.T.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    u = u.reshape(n, n_blocks, block)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(u)


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest per block along K of w[K, N] -> (q[K, N], scales[N, n_blocks])."""
    k, n = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n_blocks * block, n), np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, n_blocks, block)
    qmax = (1 << (bits - 1)) - 1
    scales = np.maximum(np.abs(blocks).max(-1), 1e-12) / qmax
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int8)
    return q.reshape(n, -1)[:, :k].T, scales.astype(np.float32)


def _node(a: str, out: str, name: str, q: np.ndarray, scales: np.ndarray, bits: int, block: int,
          inits: list) -> onnx.NodeProto:
    k, n = q.shape
    b = numpy_helper.from_array(pack(q, bits, block), f"{name}_B{bits}")
    s = numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{name}_scales")
    inits.extend([b, s])
    return helper.make_node("MatMulNBits", [a, b.name, s.name], [out], name=f"{name}_MatMulNBits",
                            domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=ACCURACY_LEVEL)


def _signed(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.int8)  # INT4 arrives as ml_dtypes.int4


def rewrite(model: onnx.ModelProto, lm_head: tuple[int, int] = LM_HEAD[8]) -> dict[str, int]:
    """In place: DQ -> MatMul pairs and the lm_head Gemm (lm_head = its bits, block) become
    MatMulNBits. Returns counts."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_nodes = list(g.node)  # one set of Python objects: `dropped` holds their ids
    producers = {o: n for n in graph_nodes for o in n.output}
    uses: dict[str, int] = {}
    for n in graph_nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_inits: list = []
    dead: set[str] = set()     # initializers no longer read
    dropped: set[int] = set()  # the rewritten pairs' DequantizeLinear nodes (they come first)
    counts = {"int4": 0, "int8": 0, "lm_head": 0}
    nodes = []
    for node in graph_nodes:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if dq is not None and dq.op_type == "DequantizeLinear" and uses[dq.output[0]] == 1 \
                and dq.input[0] in inits and dq.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
            w, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
            if w.data_type == onnx.TensorProto.INT4 and attrs.get("axis") == 0 and attrs.get("block_size"):
                block = int(attrs["block_size"])
                nodes.append(_node(node.input[0], node.output[0], dq.input[0], _signed(w), scale.T, 4, block,
                                   new_inits))
                counts["int4"] += 1
            elif w.data_type == onnx.TensorProto.INT8 and attrs.get("axis") == 1 and scale.ndim == 1:
                q = _signed(w)
                block = min(INT8_BLOCK, max(16, 1 << (q.shape[0] - 1).bit_length()))  # no padding past K
                n_blocks = -(-q.shape[0] // block)
                nodes.append(_node(node.input[0], node.output[0], dq.input[0], q,
                                   np.repeat(scale[:, None], n_blocks, axis=1), 8, block, new_inits))
                counts["int8"] += 1
            else:
                nodes.append(node)
                continue
            dead.update(dq.input)
            dropped.add(id(dq))
            continue
        if node.op_type == "Gemm" and node.input[1] in inits and len(node.input) == 2:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0:
                w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32).T  # [K, N]
                q, scales = quantize_blocks(w, *lm_head)
                nodes.append(_node(node.input[0], node.output[0], "lm_head", q, scales, *lm_head, new_inits))
                dead.add(node.input[1])
                counts["lm_head"] += 1
                continue
        nodes.append(node)
    nodes = [n for n in nodes if id(n) not in dropped]
    still_used = {i for n in nodes for i in n.input}
    keep = [t for t in g.initializer if t.name not in dead or t.name in still_used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def write_cpu_decoder(src: Path, dst: Path, bits: int, static_text: TextConfig | None = None) -> dict[str, int]:
    """src: a Q/DQ decoder from quantize.py with `bits`-bit weights; dst: its MatMulNBits twin
    (own data file). static_text: src is the static-KV decoder of that text model, whose
    attention becomes one GroupQueryAttention node per layer (fused_attention.py)."""
    model = onnx.load(str(src))
    counts = rewrite(model, LM_HEAD[bits])
    if not counts["int4"] + counts["int8"]:
        raise ValueError(f"{src.name}: no weight-only DequantizeLinear -> MatMul pairs to rewrite")
    if static_text is not None:
        counts["attention_fused"] = fused_attention.fuse(model, static_text)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)
    return counts
