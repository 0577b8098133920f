"""ONNX Runtime runners for vision_encoder.onnx and decoder.onnx (the cpu target)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevlm.presets import TextConfig


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
    at position_ids[:, 0]; its sequences update one buffer per tensor in place.
    """

    def __init__(self, path: str | Path, cfg: TextConfig, threads: int | None = None, static: bool = False):
        self.cfg = cfg
        self.static = static
        self.path = Path(path)
        self.sess = session(path, threads)
        n = cfg.num_layers
        self.past_names = [f"past_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        # FP16 KV in the FP16 export and the static FP16 copies of quantized ones, FP32 elsewhere
        kv_type = next(i.type for i in self.sess.get_inputs() if i.name == self.past_names[0])
        self.kv_dtype = np.dtype(np.float16 if kv_type == "tensor(float16)" else np.float32)

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        c = self.cfg
        z = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), self.kv_dtype)
        return [z] * (2 * c.num_layers)

    def new_sequence(self, capacity: int) -> OrtSequence | OrtStaticSequence:
        """State for one batch-1 sequence of up to `capacity` positions."""
        return OrtStaticSequence(self, capacity) if self.static else OrtSequence(self, capacity)

    def __call__(self, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                 past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"inputs_embeds": inputs_embeds, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past))
        logits, *present = self.sess.run(self.output_names, feeds)
        return logits, present


class _Sequence:
    """What both sequence kinds share: a capacity, the positions held, an IO binding."""
    capacity: int
    length: int
    binding: ort.IOBinding

    def _bind_step(self, inputs_embeds: np.ndarray) -> tuple[int, int]:
        """Bind this step's embeddings and positions; returns (positions held, new positions)."""
        s, p = inputs_embeds.shape[1], self.length
        if p + s > self.capacity:
            raise ValueError(f"sequence capacity {self.capacity} exceeded")
        self.binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32))
        self.binding.bind_cpu_input("position_ids", np.arange(p, p + s, dtype=np.int64)[None])
        return p, s


class OrtSequence(_Sequence):
    """A batch-1 sequence whose KV cache lives in two preallocated buffers per tensor.

    decoder.onnx concatenates past and new KV into `present`. With IO binding, ONNX Runtime
    reads `past` from one buffer and writes `present` straight into the other, both bound as
    contiguous views at the front of a flat allocation sized for the whole sequence; the two
    swap roles each step. Nothing is allocated or copied by the host per token; the only
    per-token copy of the cache is the one the graph's Concat does (TensorRT 10.3 behaves the
    same with concat-KV; in-place KV update needs TensorRT >= 10.15).
    """

    def __init__(self, decoder: OrtDecoder, capacity: int):
        c = decoder.cfg
        self.d = decoder
        self.capacity = capacity
        self.row = c.num_kv_heads * c.head_dim  # floats per position per tensor
        n = 2 * c.num_layers
        self.buffers = [np.empty((n, capacity * self.row), decoder.kv_dtype) for _ in range(2)]
        self.logits = np.empty((1, c.vocab_size), np.float32)
        self.length = 0  # positions held in the cache
        self.current = 0  # which buffer holds the cache
        self.binding = decoder.sess.io_binding()

    def _view(self, buf: np.ndarray, i: int, length: int) -> np.ndarray:
        c = self.d.cfg
        return buf[i, : length * self.row].reshape(1, c.num_kv_heads, length, c.head_dim)

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append inputs_embeds [1, S, D]; returns the last position's logits [vocab]."""
        p, s = self._bind_step(inputs_embeds)
        b = self.binding
        src, dst = self.buffers[self.current], self.buffers[1 - self.current]
        for i, (past, present) in enumerate(zip(self.d.past_names, self.d.output_names[1:])):
            b.bind_cpu_input(past, self._view(src, i, p))
            b.bind_output(present, "cpu", 0, self.d.kv_dtype, [1, *self._view(dst, i, p + s).shape[1:]],
                          self._view(dst, i, p + s).ctypes.data)
        b.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        self.d.sess.run_with_iobinding(b)
        self.length, self.current = p + s, 1 - self.current
        return self.logits[0]

    def save(self, n: int) -> list[np.ndarray]:
        """The first n positions of the cache, [kv_heads, n, head_dim] per tensor (PrefixCache)."""
        buf = self.buffers[self.current]
        return [self._view(buf, i, self.length)[0, :, :n].copy() for i in range(len(buf))]

    def load(self, kv: list[np.ndarray]) -> None:
        """Start this (new) sequence from saved KV."""
        n = kv[0].shape[1]
        if n > self.capacity:
            raise ValueError(f"sequence capacity {self.capacity} exceeded")
        buf = self.buffers[self.current]
        for i, a in enumerate(kv):
            self._view(buf, i, n)[0] = a
        self.length = n


class OrtStaticSequence(_Sequence):
    """A batch-1 sequence on decoder.static.onnx: one [1, kv_heads, capacity, head_dim] buffer
    per cache tensor, bound as both the past input and the present output. TensorScatter
    sees the same buffer on both sides and writes only the new positions, so a step moves no
    cache bytes at all; attention reads all `capacity` slots (the unfilled ones masked), which
    is why the capacity is the sequence's own need, not the model's maximum context.
    """

    def __init__(self, decoder: OrtDecoder, capacity: int):
        c = decoder.cfg
        self.d = decoder
        self.capacity = capacity
        shape = (1, c.num_kv_heads, capacity, c.head_dim)
        self.cache = [np.zeros(shape, decoder.kv_dtype) for _ in range(2 * c.num_layers)]
        self.logits = np.empty((1, c.vocab_size), np.float32)
        self.length = 0
        b = self.binding = decoder.sess.io_binding()
        for past, present, buf in zip(decoder.past_names, decoder.output_names[1:], self.cache):
            b.bind_cpu_input(past, buf)
            b.bind_output(present, "cpu", 0, decoder.kv_dtype, list(shape), buf.ctypes.data)
        b.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append inputs_embeds [1, S, D]; returns the last position's logits [vocab]."""
        p, s = self._bind_step(inputs_embeds)
        b = self.binding
        self.d.sess.run_with_iobinding(b)
        self.length = p + s
        return self.logits[0]

    def save(self, n: int) -> list[np.ndarray]:
        return [buf[0, :, :n].copy() for buf in self.cache]

    def load(self, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        if n > self.capacity:
            raise ValueError(f"sequence capacity {self.capacity} exceeded")
        for buf, a in zip(self.cache, kv):
            buf[0, :, :n] = a
        self.length = n
