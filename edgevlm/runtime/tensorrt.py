"""TensorRT runners for the jetson target, behind the interface of the ONNX Runtime ones:
TrtVisionEncoder(pixel_values) -> image_embeds, TrtDecoder.new_sequence(capacity).forward(embeds).

Name-based TensorRT API only (set_input_shape / set_tensor_address / execute_async_v3), which
8.5, 8.6 and 10.x all have. Device buffers are allocated once per runner or per sequence; the
KV cache stays on the GPU for the whole generation and only the last position's logits come
back to the host each step. An engine folder whose manifest names another device is refused.

Two decoder engine layouts (the folder's manifest says which, see tensorrt_build.py):
  concat  (every TensorRT) two KV buffers per tensor used in turn; every decode step has a
          new past length, so a captured CUDA graph would be valid for one step only: none.
          Sequence slots (contexts, stream, buffers) are pooled across requests.
  static  (TensorRT >= 10.15) one KV buffer per tensor bound as both past_* and its aliased
          present_*, updated in place; the decode step has one shape and fixed addresses, so
          it is captured once per sequence slot as a CUDA graph and replayed every token.
          Sequence slots (buffers, contexts, graphs) are pooled across requests.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edgevlm.engines.features import Features, requires
from edgevlm.manifest import ManifestError, read_manifest
from edgevlm.presets import TextConfig
from edgevlm.runtime.errors import BadRequest, Busy
from edgevlm.runtime.slots import PackedRows

if TYPE_CHECKING:  # annotations only: the module is imported where an engine is opened
    import tensorrt as trt


def open_engine(engine_dir: str | Path, name: str) -> tuple[ModuleType, trt.ICudaEngine, dict]:
    """Deserialize <engine_dir>/<name>.plan after checking the folder's manifest against this device."""
    import tensorrt as trt

    from edgevlm.jetson.device import detect
    engine_dir = Path(engine_dir)
    m = read_manifest(engine_dir)
    here = detect().require("tensorrt", "sm").tag
    if m.get("kind") != "tensorrt" or m.get("device_tag") != here:
        raise ManifestError(f"{engine_dir}: engines built for {m.get('device_tag')!r}, this device is {here!r}; "
                            "run `make engines` here")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((engine_dir / f"{name}.plan").read_bytes())
    if engine is None:
        raise ManifestError(f"{engine_dir / f'{name}.plan'}: TensorRT could not load the engine")
    return trt, engine, m


def _np_dtype(trt, engine, tensor: str):
    return np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))


class TrtVisionEncoder:
    """pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, N, D]."""

    def __init__(self, engine_dir: str | Path):
        from edgevlm.runtime.cuda import DeviceBuffer, Stream
        self.trt, self.engine, m = open_engine(engine_dir, "vision_encoder")
        self.context = self.engine.create_execution_context()
        self.stream = Stream()
        self.lock = threading.Lock()  # one context: one call at a time
        lo, _opt, hi = self.engine.get_tensor_profile_shape("pixel_values", 0)
        self.max_batch = hi[0]
        out_shape = self.engine.get_tensor_shape("image_embeds")  # [-1, N, D]
        self.out_dtype = _np_dtype(self.trt, self.engine, "image_embeds")
        self.in_dtype = _np_dtype(self.trt, self.engine, "pixel_values")
        self.tokens, self.dim = out_shape[1], out_shape[2]
        self.inp = DeviceBuffer(int(np.prod(hi)) * self.in_dtype.itemsize)
        self.out = DeviceBuffer(self.max_batch * self.tokens * self.dim * self.out_dtype.itemsize)
        self.context.set_tensor_address("pixel_values", self.inp.ptr)
        self.context.set_tensor_address("image_embeds", self.out.ptr)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        results = []
        for i in range(0, pixel_values.shape[0], self.max_batch):  # batches over the profile's maximum
            results.append(self._run(pixel_values[i:i + self.max_batch]))
        return np.concatenate(results)

    def _run(self, px: np.ndarray) -> np.ndarray:
        b = px.shape[0]
        host = np.empty((b, self.tokens, self.dim), self.out_dtype)
        with self.lock:
            self.context.set_input_shape("pixel_values", tuple(px.shape))
            self.inp.upload(px.astype(self.in_dtype, copy=False), self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT vision encoder: enqueue failed")
            self.out.download(host, self.stream)
            self.stream.sync()
        return host.astype(np.float32, copy=False)


class TrtDecoder:
    """Decoder engine with two profiles: 0 = prefill, 1 = decode (see engines/profiles.py)."""

    def __init__(self, engine_dir: str | Path, cfg: TextConfig):
        self.cfg = cfg
        self.trt, self.engine, self.manifest = open_engine(engine_dir, "decoder")
        self.features = Features.of(self.trt)
        n = cfg.num_layers
        self.past_names = [f"past_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.kv_dtype = _np_dtype(self.trt, self.engine, "past_key_0")
        self.pos_dtype = _np_dtype(self.trt, self.engine, "position_ids")  # int64 on 10.x, int32 on 8.x
        self.embed_dtype = _np_dtype(self.trt, self.engine, "inputs_embeds")
        self.max_prefill = self.engine.get_tensor_profile_shape("inputs_embeds", 0)[2][1]
        self.static = self.manifest.get("kv_cache", "concat") == "static"
        self.chunked_prefill = self.static  # the concat prefill profile has past 0: one pass
        # rows of the batched decode step (static engines built with MAX_SEQUENCES; else 1)
        self.max_batch = int(self.manifest.get("max_sequences", 1)) if self.static else 1
        if self.static:
            self.max_context = self.engine.get_tensor_shape("past_key_0")[2]  # pinned at build
            self._check_aliased(engine_dir)
        else:
            self.max_context = self.engine.get_tensor_profile_shape("past_key_0", 1)[2][2] + 1
        # Sequence slots (contexts, stream, buffers; on static engines the captured decode
        # step) are made once and reused by later requests.
        self.pool: list[TrtSequence | TrtStaticSequence] = []
        self.pool_lock = threading.Lock()
        self.slots = 0  # made so far; on TensorRT 8.5 contexts cannot share a profile: one slot
        self.max_slots = None if self.features.shared_profiles else 1

    @requires("inplace_kv")
    def _check_aliased(self, engine_dir) -> None:
        for past, present in zip(self.past_names, self.present_names):
            if self.engine.get_aliased_input_tensor(present) != past:
                raise ManifestError(f"{engine_dir}: {present} does not alias {past}; rebuild with KV=concat")

    def new_sequence(self, capacity: int) -> TrtSequence | TrtStaticSequence:
        if capacity > self.max_context:
            raise BadRequest(f"the decoder engine holds {self.max_context} positions, asked for {capacity}")
        with self.pool_lock:
            seq = self.pool.pop() if self.pool else None
            if seq is None:
                if self.max_slots is not None and self.slots >= self.max_slots:
                    raise Busy(f"busy: TensorRT {self.trt.__version__} decodes {self.max_slots} sequence at a "
                               "time (its contexts cannot share an optimization profile)")
                self.slots += 1
        seq = seq or (TrtStaticSequence(self) if self.static else TrtSequence(self))
        seq.reset(capacity)
        return seq

    def release(self, seq: TrtSequence | TrtStaticSequence) -> None:
        with self.pool_lock:
            self.pool.append(seq)


class _Slot:
    """What every decoder sequence owns: a stream, one execution context per profile (so no
    profile switch per step), device buffers for the step's inputs and logits, allocated once."""

    def __init__(self, d: TrtDecoder):
        from edgevlm.runtime.cuda import DeviceBuffer, Stream
        c = d.cfg
        self.d = d
        self.stream = Stream()
        # The two contexts run one after the other on this slot's stream, so they share one
        # activation buffer instead of TensorRT reserving one per context.
        if d.features.user_managed_memory:
            user_managed = d.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.prefill = d.engine.create_execution_context(strategy=user_managed)
            self.decode = d.engine.create_execution_context(strategy=user_managed)
            self.activations = DeviceBuffer(d.engine.device_memory_size_v2)
            for ctx in (self.prefill, self.decode):
                ctx.set_device_memory(self.activations.ptr, self.activations.nbytes)
        else:
            self.prefill = d.engine.create_execution_context_without_device_memory()
            self.decode = d.engine.create_execution_context_without_device_memory()
            self.activations = DeviceBuffer(d.engine.device_memory_size)
            for ctx in (self.prefill, self.decode):
                ctx.device_memory = self.activations.ptr
        for ctx, profile in ((self.prefill, 0), (self.decode, 1)):
            # refused, e.g. where a profile may serve one context only: say so now, not as a
            # failed enqueue later
            if not ctx.set_optimization_profile_async(profile, self.stream.handle):
                raise RuntimeError(f"TensorRT would not give optimization profile {profile} to another "
                                   "execution context; serve fewer sequences at once (max_sequences)")
        self.embeds = DeviceBuffer(max(d.max_prefill, 1) * c.hidden_size * d.embed_dtype.itemsize)
        self.positions = DeviceBuffer(max(d.max_prefill, 1) * d.pos_dtype.itemsize)
        logits_dtype = _np_dtype(d.trt, d.engine, "logits")
        self.logits_dev = DeviceBuffer(c.vocab_size * logits_dtype.itemsize)
        self.logits = np.empty((1, c.vocab_size), logits_dtype)
        self.kv = []  # the subclass's cache buffers

    def release(self) -> None:
        """Back to the decoder's pool (the Generator calls this when a request ends)."""
        self.d.release(self)

    def _upload(self, inputs_embeds: np.ndarray, p: int) -> None:
        s = inputs_embeds.shape[1]
        self.embeds.upload(inputs_embeds.astype(self.d.embed_dtype, copy=False), self.stream)
        self.positions.upload(np.arange(p, p + s, dtype=self.d.pos_dtype)[None], self.stream)

    def _logits(self) -> np.ndarray:
        self.logits_dev.download(self.logits, self.stream)
        self.stream.sync()
        return self.logits[0].astype(np.float32, copy=False)

    def __del__(self):
        if getattr(self, "graph", None) is not None:
            self.graph.free()
        for b in getattr(self, "kv", []):
            b.free()
        for name in ("embeds", "positions", "logits_dev", "activations"):
            if hasattr(self, name):
                getattr(self, name).free()
        if hasattr(self, "stream"):
            self.stream.free()


class TrtSequence(_Slot):
    """A pooled batch-1 slot on a concat-KV engine, with two device KV buffers per tensor used
    in turn: each step reads `past` from one and the engine writes `present` (past + new) into
    the other. The buffers grow to the longest request the slot has served and stay."""

    def __init__(self, d: TrtDecoder):
        super().__init__(d)
        self.allocated = 0  # positions the KV buffers hold

    def reset(self, capacity: int) -> None:
        from edgevlm.runtime.cuda import DeviceBuffer
        if capacity > self.allocated:
            for b in self.kv:
                b.free()
            c, d = self.d.cfg, self.d
            row = c.num_kv_heads * c.head_dim * d.kv_dtype.itemsize
            self.kv = [DeviceBuffer(capacity * row) for _ in range(2 * len(d.past_names))]  # [first n | second n]
            self.allocated = capacity
        self.capacity, self.length, self.current = capacity, 0, 0

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append inputs_embeds [1, S, D]; returns the last position's logits [vocab]."""
        d, c = self.d, self.d.cfg
        s, p = inputs_embeds.shape[1], self.length
        if p + s > self.capacity:
            raise ValueError(f"sequence capacity {self.capacity} exceeded")
        if s > 1 and p > 0:
            raise ValueError("prefill runs once, on an empty cache (the prefill profile has past 0)")
        ctx = self.prefill if s > 1 or p == 0 else self.decode
        self._upload(inputs_embeds, p)
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
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT decoder: enqueue failed")
        self.length, self.current = p + s, 1 - self.current
        return self._logits()


class TrtStaticSequence(_Slot):
    """A pooled batch-1 slot for a static-cache engine: one device buffer per cache tensor
    (bound as past_* and present_*), input/output buffers at fixed addresses, a context per
    profile and, after the first decode step, that step captured as a CUDA graph.

    The cache is zeroed once at allocation: slots beyond a sequence's length are masked in
    attention, and a masked slot contributes 0 x its value, which is 0 only if the value is
    finite (fresh device memory may hold NaN bit patterns). Stale values from an earlier
    request are finite, so a reused slot needs no clearing.
    """

    def __init__(self, d: TrtDecoder):
        from edgevlm.runtime.cuda import DeviceBuffer
        super().__init__(d)
        c = d.cfg
        nbytes = d.max_context * c.num_kv_heads * c.head_dim * d.kv_dtype.itemsize
        self.kv = [DeviceBuffer(nbytes) for _ in d.past_names]
        for b in self.kv:
            b.zero(self.stream)
        for ctx in (self.prefill, self.decode):  # addresses never change: set them once
            ctx.set_tensor_address("inputs_embeds", self.embeds.ptr)
            ctx.set_tensor_address("position_ids", self.positions.ptr)
            ctx.set_tensor_address("logits", self.logits_dev.ptr)
            for past, present, buf in zip(d.past_names, d.present_names, self.kv):
                ctx.set_tensor_address(past, buf.ptr)
                ctx.set_tensor_address(present, buf.ptr)
        self.decode.set_input_shape("inputs_embeds", (1, 1, c.hidden_size))
        self.decode.set_input_shape("position_ids", (1, 1))
        self.graph = None  # the captured decode step
        self.graph_failed = False
        self.decode_runs = 0
        self.stream.sync()

    def reset(self, capacity: int) -> None:
        self.capacity, self.length = capacity, 0

    def _enqueue_decode(self) -> bool:
        return self.decode.execute_async_v3(self.stream.handle)

    def _decode_step(self) -> None:
        from edgevlm.runtime.cuda import CudaError, Graph, cudart
        if self.graph is not None:
            self.graph.launch(self.stream)
            return
        if not self._enqueue_decode():
            raise RuntimeError("TensorRT decoder: enqueue failed")
        self.decode_runs += 1
        # Capture after one ordinary run (which does the context's lazy setup), as trtexec does.
        if self.decode_runs == 1 and not self.graph_failed:
            self.stream.sync()
            try:
                self.graph = Graph(self.stream, self._enqueue_decode)
            except CudaError as e:
                cudart.cudaGetLastError()  # capture errors are not sticky; clear the last one
                self.graph_failed = True
                logging.getLogger(__name__).warning("decode step not captured as a CUDA graph (%s); "
                                                    "running it without", e)

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append inputs_embeds [1, S, D]; returns the last position's logits [vocab]."""
        d, c = self.d, self.d.cfg
        s, p = inputs_embeds.shape[1], self.length
        if p + s > self.capacity:
            raise ValueError(f"sequence capacity {self.capacity} exceeded")
        if s > d.max_prefill:
            raise ValueError(f"{s} positions in one pass; the prefill profile takes up to {d.max_prefill}")
        self._upload(inputs_embeds, p)
        if s == 1 and p > 0:
            self._decode_step()
        else:  # any chunk at any offset: the cache shape does not depend on p
            self.prefill.set_input_shape("inputs_embeds", (1, s, c.hidden_size))
            self.prefill.set_input_shape("position_ids", (1, s))
            if not self.prefill.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT decoder: enqueue failed")
        self.length = p + s
        return self._logits()


class TrtPackedPool(PackedRows):
    """The scheduler's KV pool on a static-cache engine built for batched decode (its decode
    profile takes 1..max_sequences rows; `make engines` records max_sequences).

    One device buffer per cache tensor holds every row's [kv_heads, C, head_dim] cache, the
    live rows packed at the front (a leaving row is replaced by the last one, one device copy
    per tensor), so a decode step binds each tensor once at the buffer's base with batch B.
    Prefill runs one row through the prefill context, bound at that row's offset. The
    decode step for each batch-size bucket (1, 2, 4, ... max) has its own execution context,
    its addresses and shape fixed, captured as a CUDA graph after its first run; a step of B
    rows runs the smallest bucket >= B, the extra rows fed zeros at position 0 of free slots
    (whatever they write there is overwritten by the next sequence's prefill). All contexts
    share one activation buffer: they run one after another on one stream.
    """

    chunked_prefill = True
    reuses_prefix = True  # save/load copy rows' KV between the device and PrefixCache

    def __init__(self, d: TrtDecoder, max_rows: int, budget_bytes: int | None = None):
        """budget_bytes caps the rows (each holds the engine's whole context in every cache
        tensor); on a Jetson this memory is the board's RAM, shared with everything else."""
        from edgevlm.runtime.cuda import DeviceBuffer, Stream
        c = d.cfg
        self.d = d
        self.row_bytes = c.num_kv_heads * d.max_context * c.head_dim * d.kv_dtype.itemsize
        self.max_rows = min(max_rows, d.max_batch)
        if budget_bytes is not None:
            fit = budget_bytes // (self.row_bytes * len(d.past_names))
            if fit < 1:
                raise ValueError(f"KV budget {budget_bytes >> 20} MiB holds no sequence of {d.max_context} positions "
                                 f"({self.row_bytes * len(d.past_names) >> 20} MiB each; make engines MAX_CONTEXT= "
                                 "for shorter ones)")
            self.max_rows = min(self.max_rows, fit)
        self.rows: list = []
        self.stream = Stream()
        self.kv = [DeviceBuffer(self.max_rows * self.row_bytes) for _ in d.past_names]
        for b in self.kv:  # finite values in masked positions (0 x NaN is NaN in attention)
            b.zero(self.stream)
        self.buckets = sorted({min(1 << i, self.max_rows) for i in range(self.max_rows.bit_length() + 1)})
        if d.features.user_managed_memory:
            strategy = d.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            make = lambda: d.engine.create_execution_context(strategy=strategy)  # noqa: E731
            self.activations = DeviceBuffer(d.engine.device_memory_size_v2)
        else:
            make = d.engine.create_execution_context_without_device_memory
            self.activations = DeviceBuffer(d.engine.device_memory_size)
        self.prefill_ctx = self._context(make(), 0)
        self.decode_ctx = {b: self._context(make(), 1) for b in self.buckets}
        self.graphs: dict[int, object] = {}
        self.graph_failed: set[int] = set()
        rows = max(d.max_prefill, self.max_rows)
        self.embeds = DeviceBuffer(rows * c.hidden_size * d.embed_dtype.itemsize)
        self.positions = DeviceBuffer(rows * d.pos_dtype.itemsize)
        self.logits_dtype = _np_dtype(d.trt, d.engine, "logits")
        self.logits_dev = DeviceBuffer(self.max_rows * c.vocab_size * self.logits_dtype.itemsize)
        for b, ctx in self.decode_ctx.items():  # fixed shapes and addresses: capturable
            ctx.set_input_shape("inputs_embeds", (b, 1, c.hidden_size))
            ctx.set_input_shape("position_ids", (b, 1))
            self._bind(ctx, b, 0)
        self.stream.sync()

    def _context(self, ctx, profile: int):
        if self.d.features.user_managed_memory:
            ctx.set_device_memory(self.activations.ptr, self.activations.nbytes)
        else:
            ctx.device_memory = self.activations.ptr
        if not ctx.set_optimization_profile_async(profile, self.stream.handle):
            raise RuntimeError(f"TensorRT would not give optimization profile {profile} to another "
                               "execution context")
        return ctx

    def _bind(self, ctx, batch: int, row: int) -> None:
        """Cache tensors at `row`'s offset with `batch` rows, and the step's inputs and logits."""
        c, d = self.d.cfg, self.d
        for past, present, buf in zip(d.past_names, d.present_names, self.kv):
            ctx.set_input_shape(past, (batch, c.num_kv_heads, d.max_context, c.head_dim))
            ctx.set_tensor_address(past, buf.ptr + row * self.row_bytes)
            ctx.set_tensor_address(present, buf.ptr + row * self.row_bytes)
        ctx.set_tensor_address("inputs_embeds", self.embeds.ptr)
        ctx.set_tensor_address("position_ids", self.positions.ptr)
        ctx.set_tensor_address("logits", self.logits_dev.ptr)

    def close(self) -> None:
        """Free the graphs, contexts' memory, caches and stream (a pool made for a measurement)."""
        for g in self.graphs.values():
            g.free()
        self.graphs.clear()
        for b in [*self.kv, self.embeds, self.positions, self.logits_dev, self.activations]:
            b.free()
        self.stream.free()

    def describe(self) -> str:
        total = len(self.kv) * self.max_rows * self.row_bytes
        return (f"KV pool {total / 2**20:.0f} MiB on the GPU: {self.max_rows} sequences of {self.d.max_context} "
                f"positions, decode buckets {self.buckets} (a CUDA graph each)")

    # -- admission (each row holds the engine's whole context) ----------------------------------
    def fits(self, capacity: int) -> bool:
        return len(self.rows) < self.max_rows

    def never_fits(self, capacity: int) -> bool:
        return capacity > self.d.max_context

    def _move_row(self, src, dst_index: int) -> None:
        from edgevlm.runtime.cuda import check, cudart
        for buf in self.kv:
            check(cudart.cudaMemcpyAsync(buf.ptr + dst_index * self.row_bytes, buf.ptr + src.index * self.row_bytes,
                                         self.row_bytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                         self.stream.handle))

    # -- the prefix cache's copies: one strided copy per tensor (a row is [kv_heads, C, head_dim]) -
    def _copy_positions(self, buf, host: np.ndarray, row, to_device: bool) -> None:
        """host [kv_heads, n, head_dim] (rows may be strided: a slice of a longer entry) to or
        from the first n positions of `row` in the device buffer `buf`."""
        from edgevlm.runtime.cuda import check, cudart
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

    def save(self, row, n: int) -> list[np.ndarray]:
        c = self.d.cfg
        out = [np.empty((c.num_kv_heads, n, c.head_dim), self.d.kv_dtype) for _ in self.kv]
        for buf, host in zip(self.kv, out):
            self._copy_positions(buf, host, row, to_device=False)
        self.stream.sync()
        return out

    def load(self, row, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        if n > row.capacity:
            raise ValueError(f"sequence capacity {row.capacity} exceeded")
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
        host = np.empty((rows, self.d.cfg.vocab_size), self.logits_dtype)
        self.logits_dev.download(host, self.stream)
        self.stream.sync()
        return host.astype(np.float32, copy=False)

    def prefill(self, row, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[1]
        if row.length + s > row.capacity:
            raise ValueError(f"sequence capacity {row.capacity} exceeded")
        if s > self.d.max_prefill:
            raise ValueError(f"{s} positions in one pass; the prefill profile takes up to {self.d.max_prefill}")
        ctx = self.prefill_ctx
        self._upload(embeds, np.arange(row.length, row.length + s)[None])
        ctx.set_input_shape("inputs_embeds", (1, s, self.d.cfg.hidden_size))
        ctx.set_input_shape("position_ids", (1, s))
        self._bind(ctx, 1, row.index)
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT decoder: prefill enqueue failed")
        row.length += s
        return self._logits(1)[0]

    def decode(self, rows: list, embeds: np.ndarray) -> np.ndarray:
        """One token for each of `rows` (embeds [len(rows), 1, D]): one engine call over all
        packed rows, padded to the smallest captured bucket (slots.PackedRows._step_inputs)."""
        b = next(k for k in self.buckets if k >= len(self.rows))
        batch, positions, at = self._step_inputs(rows, embeds, b)
        self._upload(batch, positions)
        self._step(b)
        logits = self._logits(b)
        for r in rows:
            r.length += 1
        return logits[at]

    def _step(self, b: int) -> None:
        from edgevlm.runtime.cuda import CudaError, Graph, cudart
        graph = self.graphs.get(b)
        if graph is not None:
            graph.launch(self.stream)
            return
        ctx = self.decode_ctx[b]
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT decoder: decode enqueue failed")
        if b in self.graph_failed:
            return
        # Capture after one ordinary run (which does the context's lazy setup), as trtexec does.
        self.stream.sync()
        try:
            self.graphs[b] = Graph(self.stream, lambda: ctx.execute_async_v3(self.stream.handle))
        except CudaError as e:
            cudart.cudaGetLastError()  # capture errors are not sticky; clear the last one
            self.graph_failed.add(b)
            logging.getLogger(__name__).warning("decode step of %d rows not captured as a CUDA graph (%s); "
                                                "running it without", b, e)
