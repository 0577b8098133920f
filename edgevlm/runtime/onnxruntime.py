"""ONNX Runtime runners for vision_encoder.onnx and decoder.onnx (the cpu target); the
decoder opens its own KV pool (ort_packed_pool.py for the static layout, concat_pool.py for
concat)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevlm.presets import TextConfig
from edgevlm.runtime.concat_pool import ConcatPool
from edgevlm.runtime.kv_pool import KVPool, default_budget
from edgevlm.runtime.ort_packed_pool import OrtPackedPool
from edgevlm.runtime.packed_rows import round_up


def session(path: str | Path, threads: int | None = None, arena: bool = True) -> ort.InferenceSession:
    """arena False: each run's buffers go back to the system when it ends, for a graph whose
    activations dwarf its weights and that runs seldom (Llama-3.2-Vision's image encoder: 6 GB
    at 11B, which an arena would keep beside the decoder for good)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = arena
    # An export with 16-bit weights (export/half_weights.py) widens them per call: folding those
    # Casts at load would rebuild the FP32 weights the export was made to avoid.
    disabled = ["ConstantFolding"] if half_stored(path) else None
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def half_stored(path: str | Path) -> bool:
    """Does the export this graph belongs to store its weights 16-bit (its manifest says)?"""
    manifest = Path(path).parent / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("weights", {}).get("storage") == "half"
    except (OSError, ValueError):
        return False


class OrtVisionEncoder:
    """pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, N, D]."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.sess = session(path, threads)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sess.run(["image_embeds"], {"pixel_values": pixel_values})[0]


class OrtDecoder:
    """One decoder step: (inputs_embeds, position_ids, past KV) -> (last logits, present KV).

    static=True for decoder.static.onnx, whose past/present are fixed-capacity caches updated
    at position_ids[:, 0] (served by OrtPackedPool); concat otherwise (served by ConcatPool).
    """

    def __init__(self, path: str | Path, cfg: TextConfig, threads: int | None = None, static: bool = False,
                 cross_length: int = 0):
        """cross_length: a cross-attention decoder's image positions per row (its
        cross_key_<j> / cross_value_<j> inputs, mllama_graphs.py); 0 for the others."""
        self.cfg = cfg
        self.cross_length = cross_length
        self.static = static
        self.path = Path(path)
        self.sess = session(path, threads)
        n = cfg.kv_layers
        self.past_names = [f"past_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        # FP16 KV in the FP16 export and the static FP16 copies of quantized ones, FP32 elsewhere
        kv_type = next(i.type for i in self.sess.get_inputs() if i.name == self.past_names[0])
        self.kv_dtype = np.dtype(np.float16 if kv_type == "tensor(float16)" else np.float32)
        self.max_context = cfg.max_position
        cross = [i for i in self.sess.get_inputs() if i.name.startswith(("cross_key_", "cross_value_"))]
        self.cross_names = [i.name for i in cross]
        # the image's K/V: FP16 in FP16 exports (half a row's cross memory), FP32 elsewhere
        self.cross_dtype = np.dtype(np.float16 if cross and cross[0].type == "tensor(float16)" else np.float32)
        if bool(self.cross_names) != bool(cross_length):
            raise ValueError(f"{self.path.name}: cross-attention inputs {self.cross_names or 'none'} "
                             f"do not match the model's ({cross_length} image positions per row)")

    def open_pool(self, max_rows: int, budget_bytes: int = 0, max_context: int | None = None) -> KVPool:
        """This decoder's KV pool, for rows of up to `max_context` positions (default: the
        model's). budget_bytes 0: `max_rows` such rows, at most a quarter of this machine's
        memory (the static pool takes it at once; concat rows allocate their own at admission)."""
        context = min(max_context or self.max_context, self.max_context)
        per_position = self.cfg.kv_bytes_per_position(self.kv_dtype.itemsize)
        if not self.static:
            if self.cross_length:
                raise ValueError("KV=concat is not built for cross-attention models; use KV=static (the default)")
            return ConcatPool(lambda: OrtConcatSequence(self), max_rows, max_context=context,
                              bytes_per_position=per_position, chunked_prefill=True, reuses_prefix=True)
        budget = budget_bytes or default_budget(max_rows, round_up(context), per_position)
        return OrtPackedPool(self, max_rows, budget)

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        c = self.cfg
        z = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), self.kv_dtype)
        return [z] * (2 * c.kv_layers)

    def __call__(self, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                 past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The graph as exported, nothing bound (the parity checks' plain path)."""
        feeds = {"inputs_embeds": inputs_embeds, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past))
        logits, *present = self.sess.run(["logits", *self.present_names], feeds)
        return logits, present


class OrtConcatSequence:
    """A batch-1 sequence on decoder.onnx whose KV cache lives in two preallocated buffers per
    tensor (ConcatPool's rows).

    decoder.onnx concatenates past and new KV into `present`. With IO binding, ONNX Runtime
    reads `past` from one buffer and writes `present` straight into the other, both bound as
    contiguous views at the front of a flat allocation sized for the whole sequence; the two
    swap roles each step. Nothing is allocated or copied by the host per token; the only
    per-token copy of the cache is the one the graph's Concat does (TensorRT 10.3 behaves the
    same with concat-KV; in-place KV update needs TensorRT >= 10.15).
    """

    def __init__(self, decoder: OrtDecoder):
        c = decoder.cfg
        self.d = decoder
        self.row = c.num_kv_heads * c.head_dim  # floats per position per tensor
        self.buffers: list[np.ndarray] = []
        self.logits = np.empty((1, c.vocab_size), np.float32)
        self.binding = decoder.sess.io_binding()
        self.capacity = self.length = self.current = 0

    def reset(self, capacity: int) -> None:
        if capacity > self.capacity:  # the buffers grow to the longest row served and stay
            n = 2 * self.d.cfg.kv_layers
            self.buffers = [np.empty((n, capacity * self.row), self.d.kv_dtype) for _ in range(2)]
            self.capacity = capacity
        self.length = self.current = 0  # positions held; which buffer holds them

    def close(self) -> None:
        self.buffers = []

    def _view(self, buf: np.ndarray, i: int, length: int) -> np.ndarray:
        c = self.d.cfg
        return buf[i, : length * self.row].reshape(1, c.num_kv_heads, length, c.head_dim)

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        s, p = inputs_embeds.shape[1], self.length
        b = self.binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32))
        b.bind_cpu_input("position_ids", np.arange(p, p + s, dtype=np.int64)[None])
        src, dst = self.buffers[self.current], self.buffers[1 - self.current]
        for i, (past, present) in enumerate(zip(self.d.past_names, self.d.present_names)):
            out = self._view(dst, i, p + s)
            b.bind_cpu_input(past, self._view(src, i, p))
            b.bind_output(present, "cpu", 0, self.d.kv_dtype, list(out.shape), out.ctypes.data)
        b.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        self.d.sess.run_with_iobinding(b)
        self.length, self.current = p + s, 1 - self.current
        return self.logits[0]

    def save(self, n: int) -> list[np.ndarray]:
        buf = self.buffers[self.current]
        return [self._view(buf, i, self.length)[0, :, :n].copy() for i in range(len(buf))]

    def load(self, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        buf = self.buffers[self.current]
        for i, a in enumerate(kv):
            self._view(buf, i, n)[0] = a
        self.length = n
