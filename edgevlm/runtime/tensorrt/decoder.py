"""The decoder engine: its facts (layout, dtypes, context) and its KV pool.

Two engine layouts (the folder's manifest says which, see engines/build.py):
  static  (TensorRT >= 10.15) one KV buffer per tensor bound as both past_* and its aliased
          present_*, updated in place: TrtPackedPool (packed_pool.py) batches every row in
          one call per step, a CUDA graph per batch-size bucket.
  concat  (every TensorRT) two KV buffers per row and tensor used in turn; every decode step
          has a new past length, so a captured graph would be valid for one step only: none.
          ConcatPool runs TrtConcatSequence rows one after another.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edgevlm.engines.features import Features, requires
from edgevlm.manifest import ManifestError
from edgevlm.presets import TextConfig
from edgevlm.runtime.concat_pool import ConcatPool
from edgevlm.runtime.kv_pool import KVPool, default_budget
from edgevlm.runtime.tensorrt.cuda import DeviceBuffer, Stream
from edgevlm.runtime.tensorrt.engine import DECODE, PREFILL, np_dtype, open_engine, shared_contexts
from edgevlm.runtime.tensorrt.packed_pool import TrtPackedPool

if TYPE_CHECKING:  # annotations only
    import tensorrt as trt


class TrtDecoder:
    def __init__(self, engine_dir: str | Path, cfg: TextConfig):
        self.cfg = cfg
        module, engine, self.manifest = open_engine(engine_dir, "decoder")
        self.trt: ModuleType = module
        self.engine: trt.ICudaEngine = engine
        self.features = Features.of(self.trt)
        n = cfg.kv_layers
        self.past_names = [f"past_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.kv_dtype = np_dtype(self.trt, self.engine, "past_key_0")
        self.pos_dtype = np_dtype(self.trt, self.engine, "position_ids")  # int64 on 10.x, int32 on 8.x
        self.embed_dtype = np_dtype(self.trt, self.engine, "inputs_embeds")
        self.logits_dtype = np_dtype(self.trt, self.engine, "logits")
        self.tensor_position_bytes = cfg.num_kv_heads * cfg.head_dim * self.kv_dtype.itemsize  # one cache tensor
        self.max_prefill = self.engine.get_tensor_profile_shape("inputs_embeds", PREFILL)[2][1]
        self.static = self.manifest.get("kv_cache", "concat") == "static"
        if self.static:
            self.max_context = self.engine.get_tensor_shape("past_key_0")[2]  # pinned at build
            self.max_batch = int(self.manifest.get("max_sequences", 1))  # the decode profile's rows
            self._check_aliased(engine_dir)
        else:
            self.max_context = self.engine.get_tensor_profile_shape("past_key_0", DECODE)[2][2] + 1
            self.max_batch = 1

    @requires("inplace_kv")
    def _check_aliased(self, engine_dir) -> None:
        for past, present in zip(self.past_names, self.present_names):
            if self.engine.get_aliased_input_tensor(present) != past:
                raise ManifestError(f"{engine_dir}: {present} does not alias {past}; rebuild with KV=concat")

    def open_pool(self, max_rows: int, budget_bytes: int = 0, max_context: int | None = None) -> KVPool:
        """This engine's KV pool. Its rows hold the engine's whole context (pinned at build;
        max_context cannot change it). budget_bytes 0: `max_rows` such rows, at most a
        quarter of the board's memory (shared by the CPU and the GPU)."""
        per_position = self.cfg.kv_bytes_per_position(self.kv_dtype.itemsize)
        if self.static:
            return TrtPackedPool(self, max_rows, budget_bytes or default_budget(max_rows, self.max_context,
                                                                                 per_position))
        # TensorRT 8.5: contexts cannot share an optimization profile, so one row at a time
        rows = max_rows if self.features.shared_profiles else 1
        return ConcatPool(lambda: TrtConcatSequence(self), rows, max_context=self.max_context,
                          bytes_per_position=per_position, where=" on the GPU",
                          chunked_prefill=False,  # the prefill profile has past 0: one pass
                          reuses_prefix=False)  # rows' KV stays on the GPU (the static pool copies it)


class TrtConcatSequence:
    """A batch-1 sequence on a concat-KV engine (ConcatPool's rows): a stream, a context per
    profile on one activation buffer, the step's input and logits buffers, and two KV buffers
    per tensor used in turn (each step reads `past` from one; the engine writes past + new into
    the other). The buffers grow to the longest row served and stay for the next."""

    def __init__(self, d: TrtDecoder):
        c = d.cfg
        self.d = d
        self.stream = Stream()
        contexts, self.activations = shared_contexts(d.trt, d.engine, d.features, [PREFILL, DECODE], self.stream)
        self.prefill_ctx: trt.IExecutionContext = contexts[0]
        self.decode_ctx: trt.IExecutionContext = contexts[1]
        self.embeds = DeviceBuffer(max(d.max_prefill, 1) * c.hidden_size * d.embed_dtype.itemsize)
        self.positions = DeviceBuffer(max(d.max_prefill, 1) * d.pos_dtype.itemsize)
        self.logits_dev = DeviceBuffer(c.vocab_size * d.logits_dtype.itemsize)
        self.logits = np.empty((1, c.vocab_size), d.logits_dtype)
        self.kv: list[DeviceBuffer] = []  # [first n | second n]
        self.allocated = 0  # positions the KV buffers hold
        self.capacity = self.length = self.current = 0

    def reset(self, capacity: int) -> None:
        if capacity > self.allocated:
            for b in self.kv:
                b.free()
            n = 2 * len(self.d.past_names)
            self.kv = [DeviceBuffer(capacity * self.d.tensor_position_bytes) for _ in range(n)]
            self.allocated = capacity
        self.capacity, self.length, self.current = capacity, 0, 0

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        d = self.d
        s, p = inputs_embeds.shape[1], self.length
        if s > d.max_prefill:
            raise ValueError(f"{s} positions in one pass; the prefill profile takes up to {d.max_prefill}")
        ctx: trt.IExecutionContext = self.prefill_ctx if s > 1 or p == 0 else self.decode_ctx
        self.embeds.upload(inputs_embeds.astype(d.embed_dtype, copy=False), self.stream)
        self.positions.upload(np.arange(p, p + s, dtype=d.pos_dtype)[None], self.stream)
        self._bind(ctx, s, p)
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT decoder: enqueue failed")
        self.length, self.current = p + s, 1 - self.current
        self.logits_dev.download(self.logits, self.stream)
        self.stream.sync()
        return self.logits[0].astype(np.float32, copy=False)

    def _bind(self, ctx: trt.IExecutionContext, s: int, p: int) -> None:
        d, c = self.d, self.d.cfg
        ctx.set_input_shape("inputs_embeds", (1, s, c.hidden_size))
        ctx.set_input_shape("position_ids", (1, s))
        ctx.set_tensor_address("inputs_embeds", self.embeds.ptr)
        ctx.set_tensor_address("position_ids", self.positions.ptr)
        n = len(d.past_names)
        src = self.kv[n:] if self.current else self.kv[:n]
        dst = self.kv[:n] if self.current else self.kv[n:]
        for i, (past, present) in enumerate(zip(d.past_names, d.present_names)):
            ctx.set_input_shape(past, (1, c.num_kv_heads, p, c.head_dim))
            ctx.set_tensor_address(past, src[i].ptr)
            ctx.set_tensor_address(present, dst[i].ptr)
        ctx.set_tensor_address("logits", self.logits_dev.ptr)

    def save(self, n: int) -> list[np.ndarray]:
        raise ValueError("a concat TensorRT row keeps its KV on the GPU (its pool does not reuse prefixes)")

    def load(self, kv: list[np.ndarray]) -> None:
        self.save(0)

    def close(self) -> None:
        for b in [*self.kv, self.embeds, self.positions, self.logits_dev, self.activations]:
            b.free()
        self.kv = []
        self.stream.free()
