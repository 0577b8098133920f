"""The cpu target's static-KV decoder with each layer's attention as one ONNX Runtime
`com.microsoft.GroupQueryAttention` node.

The exported attention is some thirty small nodes per layer (reshapes and transposes, RoPE as
split / negate / concat / multiply, the in-place TensorScatter cache writes, a mask built from
position_ids, scores, softmax, the value mix), and its scores read every one of the cache's
`capacity` slots, filled or not. GroupQueryAttention does the same arithmetic in one kernel:
RoPE from cos/sin tables, the new keys and values written into the cache buffer it is given
(past and present bound to the same memory, as decoder.static.onnx's runners already do), and
attention over each row's filled positions only (`seqlens_k`). The cache holds the same values
as before (keys after RoPE), so saved prefixes and the batching scheduler's rows carry over.

Only the cpu twins get it (TensorRT builds from the Q/DQ graphs); a model whose head size is
not a multiple of 16 (ONNX Runtime's CPU kernel requires it) keeps the exported attention.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgevlm.presets import TextConfig

MS_DOMAIN = "com.microsoft"
HEAD_MULTIPLE = 16
_PROJECTIONS = ("MatMulNBits", "MatMul")
_SHAPE_OPS = ("Unsqueeze", "Expand", "Reshape", "Transpose", "Squeeze")


def rope_tables(text: TextConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_position, head_dim / 2]: the reference's own RoPE (model/llama.rope), whose
    two halves are the same table."""
    import torch
    from edgevlm.model.llama import rope
    cos, sin = rope(torch.arange(text.max_position)[None], text)
    half = text.head_dim // 2
    return cos[0, 0, :, :half].numpy().copy(), sin[0, 0, :, :half].numpy().copy()


class _Graph:
    def __init__(self, g: onnx.GraphProto):
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.inits = {t.name for t in g.initializer}

    def only(self, name: str, op: str):
        found = [n for n in self.consumers[name] if n.op_type == op]
        if len(found) != 1:
            raise ValueError(f"{name}: expected one {op} reading it, found {len(found)}")
        return found[0]

    def reader(self, cache: str):
        """The one matmul a cache output feeds as its right operand, through the reshapes,
        transposes and GQA head repeats (Unsqueeze -> Expand -> Reshape) between them."""
        todo, found = [cache], []
        while todo:
            t = todo.pop()
            for c in self.consumers[t]:
                if c.op_type in ("MatMul", "FusedMatMul") and c.input[1] == t:
                    found.append(c)
                elif c.op_type in _SHAPE_OPS and c.input[0] == t:
                    todo.append(c.output[0])
        if len(found) != 1:
            raise ValueError(f"{cache}: expected one matmul reading it, found {len(found)}")
        return found[0]

    def projection(self, name: str) -> str:
        """The one weight matmul output `name` derives from (through reshapes and RoPE)."""
        seen, todo, found = set(), [name], set()
        while todo:
            t = todo.pop()
            n = self.producer.get(t)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type in _PROJECTIONS and len(n.input) > 1 and n.input[1] in self.inits:
                found.add(n.output[0])
                continue
            todo.extend(n.input)
        if len(found) != 1:
            raise ValueError(f"{name}: expected one projection behind it, found {len(found)}")
        return found.pop()


def fuse(model: onnx.ModelProto, text: TextConfig) -> int:
    """In place on a static-KV decoder (decoder.static*.onnx); returns the layers fused (0 when the
    head size rules the kernel out)."""
    if text.head_dim % HEAD_MULTIPLE:
        return 0
    g = model.graph
    G = _Graph(g)
    cos, sin = rope_tables(text)
    # per row: positions held after this step, minus one; and the longest row's total. The RoPE
    # tables are Constant nodes, kept in the graph file: its weights point into the concat
    # twin's data file, which has no such tensors.
    shared = [
        helper.make_node("Constant", [], ["gqa_cos_cache"], value=numpy_helper.from_array(cos)),
        helper.make_node("Constant", [], ["gqa_sin_cache"], value=numpy_helper.from_array(sin)),
        helper.make_node("Constant", [], ["gqa_last"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Gather", ["position_ids", "gqa_last"], ["gqa_last_pos"], axis=1),   # [B, 1]
        helper.make_node("Squeeze", ["gqa_last_pos", "gqa_axis1"], ["gqa_last_pos_b"]),        # [B]
        helper.make_node("Cast", ["gqa_last_pos_b"], ["gqa_seqlens_k"], to=TensorProto.INT32),
        helper.make_node("ReduceMax", ["gqa_last_pos_b"], ["gqa_max_pos"], keepdims=0),
        helper.make_node("Add", ["gqa_max_pos", "gqa_one"], ["gqa_total64"]),
        helper.make_node("Cast", ["gqa_total64"], ["gqa_total_sequence_length"], to=TensorProto.INT32),
    ]
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa_axis1"),
                          numpy_helper.from_array(np.array(1, np.int64), "gqa_one")])
    replaced: dict[int, onnx.NodeProto] = {}  # id(node the GQA node goes before) -> GQA node
    for i in range(text.num_layers):
        write_k = G.only(f"past_key_{i}", "TensorScatter")
        write_v = G.only(f"past_value_{i}", "TensorScatter")
        mix = G.reader(write_v.output[0])                               # probs @ V
        merged = G.only(G.only(mix.output[0], "Transpose").output[0], "Reshape")  # [B, S, D]
        q_rot = G.reader(write_k.output[0]).input[0]                   # q @ K^T
        node = helper.make_node(
            "GroupQueryAttention",
            [G.projection(q_rot), G.projection(write_k.input[1]), G.projection(write_v.input[1]),
             f"past_key_{i}", f"past_value_{i}", "gqa_seqlens_k", "gqa_total_sequence_length",
             "gqa_cos_cache", "gqa_sin_cache"],
            [merged.output[0], write_k.output[0], write_v.output[0]],
            name=f"layer{i}_GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=text.num_heads, kv_num_heads=text.num_kv_heads, do_rotary=1, rotary_interleaved=0)
        replaced[id(merged)] = node
        for old in (merged, write_k, write_v):
            old.ClearField("output")  # their outputs now come from the GQA node
    nodes = shared + [replaced.get(id(n), n) for n in g.node]
    _prune(g, nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    del g.value_info[:]
    return text.num_layers


def _prune(g: onnx.GraphProto, nodes: list) -> None:
    """Keep the nodes the graph outputs depend on, in order, and the initializers they read."""
    producer = {o: n for n in nodes for o in n.output}
    live, todo = set(), [o.name for o in g.output]
    while todo:
        n = producer.get(todo.pop())
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        todo.extend(i for i in n.input if i)
    kept = [n for n in nodes if id(n) in live]
    read = {i for n in kept for i in n.input}
    inits = [t for t in g.initializer if t.name in read]
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(inits)
