"""The KV pool of a static-cache decoder engine: every row decoded in one engine call.

One device buffer per cache tensor holds every row's [kv_heads, C, head_dim] cache (C: the
engine's whole context, pinned at build), the live rows packed at the front (a leaving row
is replaced by the last one, one device copy per tensor), so a decode step binds each
tensor once at the buffer's base with batch B. Prefill runs one row through the prefill
context, bound at that row's offset. The decode step for each batch-size bucket (1, 2, 4,
... max) has its own execution context, its addresses and shape fixed, captured as a CUDA
graph after its first run; a step of B rows runs the smallest bucket >= B, the extra rows
fed zeros at position 0 of free slots (whatever they write there is overwritten by the next
sequence's prefill). All contexts share one activation buffer: they run one after another
on one stream.

The cache is zeroed once at allocation: masked positions contribute 0 x their value, which
is 0 only if the value is finite (fresh device memory may hold NaN bit patterns). Stale
values from an earlier row are finite, so a reused row needs no clearing.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from edgevlm.runtime.kv_pool import Row, check_room
from edgevlm.runtime.packed_rows import PackedRows
from edgevlm.runtime.tensorrt.cuda import CapturedStep, DeviceBuffer, Stream, check, cudart
from edgevlm.runtime.tensorrt.engine import DECODE, PREFILL, shared_contexts

if TYPE_CHECKING:  # annotations only
    import tensorrt as trt


class TrtPackedPool(PackedRows):
    def __init__(self, d, max_rows: int, budget_bytes: int):
        """d: the decoder.TrtDecoder that opens this pool. budget_bytes caps the rows (each holds
        the engine's whole context in every cache tensor); on a Jetson this memory is the
        board's RAM, shared with everything else."""
        c = d.cfg
        self.d = d
        self.bytes_per_position = c.kv_bytes_per_position(d.kv_dtype.itemsize)
        self.row_bytes = d.tensor_position_bytes * d.max_context  # one row of one cache tensor
        fit = budget_bytes // (self.row_bytes * len(d.past_names))
        if fit < 1:
            raise ValueError(f"KV budget {budget_bytes >> 20} MiB holds no sequence of {d.max_context} positions "
                             f"({self.row_bytes * len(d.past_names) >> 20} MiB each; make engines MAX_CONTEXT= "
                             "for shorter ones)")
        self.max_rows = min(max_rows, d.max_batch, fit)
        self.rows: list[Row] = []
        self.stream = Stream()
        self.kv = [DeviceBuffer(self.max_rows * self.row_bytes) for _ in d.past_names]
        for b in self.kv:
            b.zero(self.stream)
        self.buckets = sorted({min(1 << i, self.max_rows) for i in range(self.max_rows.bit_length() + 1)})
        contexts, self.activations = shared_contexts(d.trt, d.engine, d.features,
                                                     [PREFILL] + [DECODE] * len(self.buckets), self.stream)
        self.prefill_ctx: trt.IExecutionContext = contexts[0]
        rows = max(d.max_prefill, self.max_rows)
        self.embeds = DeviceBuffer(rows * c.hidden_size * d.embed_dtype.itemsize)
        self.positions = DeviceBuffer(rows * d.pos_dtype.itemsize)
        self.logits_dev = DeviceBuffer(self.max_rows * c.vocab_size * d.logits_dtype.itemsize)
        self.steps = {b: self._decode_step(ctx, b) for b, ctx in zip(self.buckets, contexts[1:])}
        self.stream.sync()

    def _decode_step(self, ctx: trt.IExecutionContext, batch: int) -> CapturedStep:
        """The decode step of `batch` rows: its shapes and addresses fixed, so capturable."""
        ctx.set_input_shape("inputs_embeds", (batch, 1, self.d.cfg.hidden_size))
        ctx.set_input_shape("position_ids", (batch, 1))
        self._bind(ctx, batch, 0)
        return CapturedStep(self.stream, partial(ctx.execute_async_v3, self.stream.handle),
                            f"decode step of {batch} rows")

    def _bind(self, ctx: trt.IExecutionContext, batch: int, row: int) -> None:
        """Cache tensors at `row`'s offset with `batch` rows, and the step's inputs and logits."""
        c, d = self.d.cfg, self.d
        for past, present, buf in zip(d.past_names, d.present_names, self.kv):
            ctx.set_input_shape(past, (batch, c.num_kv_heads, d.max_context, c.head_dim))
            ctx.set_tensor_address(past, buf.ptr + row * self.row_bytes)
            ctx.set_tensor_address(present, buf.ptr + row * self.row_bytes)
        ctx.set_tensor_address("inputs_embeds", self.embeds.ptr)
        ctx.set_tensor_address("position_ids", self.positions.ptr)
        ctx.set_tensor_address("logits", self.logits_dev.ptr)

    @property
    def budget_bytes(self) -> int:
        return len(self.kv) * self.max_rows * self.row_bytes

    def close(self) -> None:
        """Free the graphs, the contexts' memory, the caches and the stream."""
        for step in self.steps.values():
            step.free()
        for b in [*self.kv, self.embeds, self.positions, self.logits_dev, self.activations]:
            b.free()
        self.stream.free()

    def describe(self) -> str:
        return (f"KV pool {self.budget_bytes / 2**20:.0f} MiB on the GPU: {self.max_rows} sequences of "
                f"{self.d.max_context} positions, decode buckets {self.buckets} (a CUDA graph each)")

    # -- admission (each row holds the engine's whole context) ----------------------------------
    def never_fits(self, capacity: int) -> bool:
        return capacity > self.d.max_context

    def _move_row(self, src: Row, dst_index: int) -> None:
        for buf in self.kv:
            check(cudart.cudaMemcpyAsync(buf.ptr + dst_index * self.row_bytes, buf.ptr + src.index * self.row_bytes,
                                         self.row_bytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                         self.stream.handle))

    # -- the prefix cache's copies: one strided copy per tensor (a row is [kv_heads, C, head_dim]) -
    def _copy_positions(self, buf: DeviceBuffer, host: np.ndarray, row: Row, to_device: bool) -> None:
        """host [kv_heads, n, head_dim] (rows may be strided: a slice of a longer entry) to or
        from the first n positions of `row` in the device buffer `buf`."""
        heads, n, dim = host.shape
        width = n * dim * host.itemsize
        device_pitch = self.d.max_context * dim * host.itemsize
        base = buf.ptr + row.index * self.row_bytes
        kind = cudart.cudaMemcpyKind
        if to_device:
            args = (base, device_pitch, host.ctypes.data, host.strides[0], width, heads, kind.cudaMemcpyHostToDevice)
        else:
            args = (host.ctypes.data, host.strides[0], base, device_pitch, width, heads, kind.cudaMemcpyDeviceToHost)
        check(cudart.cudaMemcpy2DAsync(*args, self.stream.handle))

    def save(self, row: Row, n: int) -> list[np.ndarray]:
        c = self.d.cfg
        out = [np.empty((c.num_kv_heads, n, c.head_dim), self.d.kv_dtype) for _ in self.kv]
        for buf, host in zip(self.kv, out):
            self._copy_positions(buf, host, row, to_device=False)
        self.stream.sync()
        return out

    def load(self, row: Row, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        check_room(row, n - row.length)
        for buf, a in zip(self.kv, kv):
            if a.strides[1:] != (a.shape[2] * a.itemsize, a.itemsize):  # each head's positions contiguous
                a = np.ascontiguousarray(a)
            self._copy_positions(buf, a, row, to_device=True)
        self.stream.sync()
        row.length = n

    # -- steps ------------------------------------------------------------------------------------
    def _upload(self, embeds: np.ndarray, positions: np.ndarray) -> None:
        self.embeds.upload(embeds.astype(self.d.embed_dtype, copy=False), self.stream)
        self.positions.upload(positions.astype(self.d.pos_dtype, copy=False), self.stream)

    def _logits(self, rows: int) -> np.ndarray:
        host = np.empty((rows, self.d.cfg.vocab_size), self.d.logits_dtype)
        self.logits_dev.download(host, self.stream)
        self.stream.sync()
        return host.astype(np.float32, copy=False)

    def prefill(self, row: Row, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[1]
        check_room(row, s)
        if s > self.d.max_prefill:
            raise ValueError(f"{s} positions in one pass; the prefill profile takes up to {self.d.max_prefill}")
        ctx: trt.IExecutionContext = self.prefill_ctx
        self._upload(embeds, np.arange(row.length, row.length + s)[None])
        ctx.set_input_shape("inputs_embeds", (1, s, self.d.cfg.hidden_size))
        ctx.set_input_shape("position_ids", (1, s))
        self._bind(ctx, 1, row.index)
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT decoder: prefill enqueue failed")
        row.length += s
        return self._logits(1)[0]

    def decode(self, rows: list[Row], embeds: np.ndarray) -> np.ndarray:
        """One engine call over all packed rows, padded to the smallest captured bucket
        (PackedRows._step_inputs)."""
        b = next(k for k in self.buckets if k >= len(self.rows))
        batch, positions, at = self._step_inputs(rows, embeds, b)
        self._upload(batch, positions)
        self.steps[b]()
        logits = self._logits(b)
        for r in rows:
            r.length += 1
        return logits[at]
