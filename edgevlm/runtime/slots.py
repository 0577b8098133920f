"""KV slots: where the scheduler's sequences keep their caches, and how one step runs them.

Two pools behind one interface (`acquire`, `release`, `prefill`, `decode`):

  PackedPool     decoder.static.onnx on ONNX Runtime: every sequence's cache lives in one
                 budget-sized buffer per cache tensor, the rows packed at the front as a
                 [rows, kv_heads, C, head_dim] tensor. A decode step is ONE decoder call over
                 all rows, each at its own position (TensorScatter writes per row, the mask is
                 per row), so the weights are read once per step, not once per stream.
  SequencePool   any decoder with batch-1 sequences (the concat layout; TensorRT engines
                 built for one row): a decode step runs each row's sequence in turn. Concat
                 caches have a different length per row, and padding them to a common
                 length would copy every cache every step, which is what the static layout
                 exists to avoid.

TrtPackedPool (tensorrt.py) is PackedPool's TensorRT twin, on the GPU, with one CUDA graph per
batch-size bucket.

Why packed rows with a shared, bucketed capacity C: attention reads all C positions of each
row (the unfilled ones masked), so C follows the longest live row, rounded up to GRANULE,
instead of the model's full context: a 300-token row of the 1.7B shape (FP32 KV, 0.39 MB per
position) reads 0.13 GB per step at C = 320 instead of 0.8 GB at the full 2048. Changing C moves the rows within their
buffers (once per GRANULE tokens of growth); a row that leaves is replaced by the last row, so
the rows stay contiguous and a step binds one view per tensor. Memory is the budget, taken
once at start; admission keeps rows x C within it, so a sequence, once admitted, never runs
out of cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

GRANULE = 64  # positions: C is a multiple of this


def _round_up(n: int, k: int = GRANULE) -> int:
    return -(-n // k) * k


@dataclass(eq=False)
class Row:
    """One sequence's place in a pool: `length` positions filled, up to `capacity`."""
    capacity: int
    length: int = 0
    index: int = -1  # PackedPool: its row in the packed tensors
    seq: object = field(default=None, repr=False)  # SequencePool: its batch-1 sequence


class PackedRows:
    """What both packed pools (PackedPool here, TrtPackedPool on TensorRT) share: live rows
    kept contiguous at the front, a leaving row replaced by the last one (`_move_row` copies
    its cache), and the inputs of a decode step over every packed row."""

    rows: list[Row]

    def acquire(self, capacity: int) -> Row:
        if not self.fits(capacity):
            raise RuntimeError("acquire without room: the scheduler checks fits() first")
        row = Row(capacity, index=len(self.rows))
        self.rows.append(row)
        return row

    def release(self, row: Row) -> None:
        """The row leaves; the last row moves into its place so the rows stay contiguous."""
        last = self.rows.pop()
        if last is not row:
            self._move_row(last, row.index)
            last.index = row.index
            self.rows[row.index] = last
        row.index = -1

    def _step_inputs(self, rows: list[Row], embeds: np.ndarray, batch: int):
        """(embeds [batch, 1, D], positions [batch, 1], where `rows` sit) for one decode step over
        every packed row. A row still being prefilled rides along with a zero input written at
        its next position, which its next chunk overwrites; rows past the live ones (padding
        to a bucket) write at position 0 of free slots, which a new sequence's prefill
        overwrites. That keeps the batch one contiguous view."""
        for r in rows:
            if r.length + 1 > r.capacity:
                raise ValueError(f"sequence capacity {r.capacity} exceeded")
        inputs = np.zeros((batch, 1, embeds.shape[2]), np.float32)
        positions = np.zeros((batch, 1), np.int64)
        positions[:len(self.rows), 0] = [r.length for r in self.rows]
        at = [r.index for r in rows]
        inputs[at] = embeds
        return inputs, positions, at


class PackedPool(PackedRows):
    """The batched pool of the cpu target (see the module's docstring)."""

    reuses_prefix = True  # save/load: the prefix cache copies rows' KV out and in

    def __init__(self, decoder, max_rows: int, budget_bytes: int):
        from edgevlm.runtime.onnxruntime import OrtDecoder
        if not (isinstance(decoder, OrtDecoder) and decoder.static):
            raise TypeError("PackedPool runs decoder.static.onnx on ONNX Runtime")
        c = decoder.cfg
        self.d = decoder
        self.heads, self.dim = c.num_kv_heads, c.head_dim
        self.per_position = 2 * c.num_layers * self.heads * self.dim * decoder.kv_dtype.itemsize
        self.positions = int(budget_bytes // self.per_position)  # in all rows together
        if self.positions < GRANULE:
            raise ValueError(f"KV budget {budget_bytes >> 20} MiB holds {self.positions} positions; "
                             f"one sequence needs at least {GRANULE}")
        self.max_rows = max_rows
        self.chunked_prefill = True  # a prompt may go in pieces at any offset
        # np.zeros: pages are mapped as rows first touch them (RSS follows use, not the budget),
        # and a masked position must hold a finite value (0 x NaN is NaN in attention).
        self.buffers = [np.zeros(self.positions * self.heads * self.dim, decoder.kv_dtype)
                        for _ in range(2 * c.num_layers)]
        self.rows: list[Row] = []
        self.width = 0  # C: positions per row in the current layout
        self.logits = np.empty((max_rows, c.vocab_size), np.float32)
        self.binding = decoder.sess.io_binding()

    @property
    def budget_bytes(self) -> int:
        return self.positions * self.per_position

    def describe(self) -> str:
        return (f"KV pool {self.budget_bytes / 2**20:.0f} MiB ({self.d.kv_dtype.name}): {self.positions} positions "
                f"shared by up to {self.max_rows} sequences, one batched decoder call per step")

    # -- admission --------------------------------------------------------------------------
    def fits(self, capacity: int) -> bool:
        """Room for one more sequence of `capacity` positions, with every live one able to grow to its own."""
        if len(self.rows) >= self.max_rows:
            return False
        widest = max([capacity] + [r.capacity for r in self.rows])
        return (len(self.rows) + 1) * _round_up(widest) <= self.positions

    def never_fits(self, capacity: int) -> bool:
        return _round_up(capacity) > self.positions

    def acquire(self, capacity: int) -> Row:
        row = super().acquire(capacity)
        self.width = self.width or GRANULE
        return row

    def release(self, row: Row) -> None:
        super().release(row)
        if not self.rows:
            self.width = 0

    # -- the prefix cache's copies ------------------------------------------------------------
    def save(self, row: Row, n: int) -> list[np.ndarray]:
        """A copy of the first n positions of row's cache: [kv_heads, n, head_dim] per tensor."""
        return [self._view(buf, row.index, 1)[0, :, :n].copy() for buf in self.buffers]

    def load(self, row: Row, kv: list[np.ndarray]) -> None:
        """Fill a new row's first positions from saved KV (PrefixCache); the row continues from there."""
        n = kv[0].shape[1]
        if n > row.capacity:
            raise ValueError(f"sequence capacity {row.capacity} exceeded")
        self._fit_width(max([n] + [r.length + 1 for r in self.rows]))
        for buf, a in zip(self.buffers, kv):
            self._view(buf, row.index, 1)[0, :, :n] = a
        row.length = n

    # -- layout -------------------------------------------------------------------------------
    def _view(self, buf: np.ndarray, start: int, count: int, width: int | None = None) -> np.ndarray:
        w = width or self.width
        block = self.heads * w * self.dim
        return buf[start * block:(start + count) * block].reshape(count, self.heads, w, self.dim)

    def _move_row(self, src: Row, dst_index: int) -> None:
        n = src.length
        for buf in self.buffers:
            self._view(buf, dst_index, 1)[:, :, :n] = self._view(buf, src.index, 1)[:, :, :n]

    def _fit_width(self, need: int) -> None:
        """Make C hold `need` positions per row: grow to the next granule (plus one, so growth
        is not paid every granule), shrink when two granules are idle."""
        target = _round_up(need)
        if self.width >= target and self.width - target < 2 * GRANULE:
            return
        n = len(self.rows)
        if target > self.width and n * (target + GRANULE) <= self.positions:
            target += GRANULE
        filled = max(r.length for r in self.rows)
        for buf in self.buffers:
            kept = self._view(buf, 0, n)[:, :, :filled].copy()
            self._view(buf, 0, n, target)[:, :, :filled] = kept
        self.width = target

    # -- steps ---------------------------------------------------------------------------------
    def _run(self, start: int, count: int, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b, d = self.binding, self.d
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        b.bind_cpu_input("position_ids", positions)
        for past, present, buf in zip(d.past_names, d.output_names[1:], self.buffers):
            view = self._view(buf, start, count)
            b.bind_cpu_input(past, view)
            b.bind_output(present, "cpu", 0, d.kv_dtype, list(view.shape), view.ctypes.data)
        logits = self.logits[:count]
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        d.sess.run_with_iobinding(b)
        return logits

    def prefill(self, row: Row, embeds: np.ndarray) -> np.ndarray:
        """Append embeds [1, S, D] to one row (a whole prompt or a chunk of it); its last logits."""
        s = embeds.shape[1]
        if row.length + s > row.capacity:
            raise ValueError(f"sequence capacity {row.capacity} exceeded")
        self._fit_width(max([row.length + s] + [r.length + 1 for r in self.rows]))
        positions = np.arange(row.length, row.length + s, dtype=np.int64)[None]
        logits = self._run(row.index, 1, embeds, positions)[0].copy()
        row.length += s
        return logits

    def decode(self, rows: list[Row], embeds: np.ndarray) -> np.ndarray:
        """One token for each of `rows` (embeds [len(rows), 1, D]); their logits [len(rows), V],
        from one decoder call over every packed row (see PackedRows._step_inputs)."""
        n = len(self.rows)
        inputs, positions, at = self._step_inputs(rows, embeds, n)
        self._fit_width(max(r.length + 1 for r in self.rows))
        logits = self._run(0, n, inputs, positions)
        for r in rows:
            r.length += 1
        return logits[at]


class SequencePool:
    """Rows backed by the decoder's own batch-1 sequences, stepped one after another."""

    def __init__(self, decoder, max_rows: int):
        self.d = decoder
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.max_context = getattr(decoder, "max_context", None)
        # a concat-KV TensorRT engine prefills once, on an empty cache
        self.chunked_prefill = getattr(decoder, "chunked_prefill", True)
        # ONNX Runtime's sequences copy their KV out and in (save/load); TensorRT's batch-1
        # sequences do not (the batched TrtPackedPool does)
        from edgevlm.runtime.onnxruntime import OrtDecoder
        self.reuses_prefix = isinstance(decoder, OrtDecoder)

    def describe(self) -> str:
        return (f"KV per sequence, allocated at admission: up to {self.max_rows} sequences, "
                "one decoder call per sequence per step")

    def fits(self, capacity: int) -> bool:
        return len(self.rows) < self.max_rows

    def never_fits(self, capacity: int) -> bool:
        return self.max_context is not None and capacity > self.max_context

    def acquire(self, capacity: int) -> Row:
        row = Row(capacity, seq=self.d.new_sequence(capacity))
        self.rows.append(row)
        return row

    def release(self, row: Row) -> None:
        self.rows.remove(row)
        if hasattr(row.seq, "release"):  # pooled TensorRT slots go back for the next request
            row.seq.release()
        row.seq = None

    def save(self, row: Row, n: int) -> list[np.ndarray]:
        return row.seq.save(n)

    def load(self, row: Row, kv: list[np.ndarray]) -> None:
        row.seq.load(kv)
        row.length = kv[0].shape[1]

    def prefill(self, row: Row, embeds: np.ndarray) -> np.ndarray:
        logits = row.seq.forward(embeds)
        row.length += embeds.shape[1]
        return np.array(logits, np.float32)

    def decode(self, rows: list[Row], embeds: np.ndarray) -> np.ndarray:
        out = np.stack([r.seq.forward(embeds[i:i + 1]) for i, r in enumerate(rows)])
        for r in rows:
            r.length += 1
        return out


def open_pool(decoder, max_rows: int, budget_mib: int = 0, max_context: int | None = None):
    """The pool for a decoder: packed and batched for decoder.static.onnx on ONNX Runtime,
    sequence by sequence otherwise. budget_mib 0: room for `max_rows` sequences of the full
    context, but at most a quarter of this machine's memory."""
    from edgevlm.runtime.onnxruntime import OrtDecoder
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # a Jetson's GPU memory too
    if getattr(decoder, "max_batch", 1) > 1:  # a TensorRT static engine with a batched decode profile
        from edgevlm.runtime.tensorrt import TrtPackedPool
        return TrtPackedPool(decoder, max_rows, (budget_mib << 20) if budget_mib > 0 else ram // 4)
    if not (isinstance(decoder, OrtDecoder) and decoder.static):
        return SequencePool(decoder, max_rows)
    c = decoder.cfg
    per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * decoder.kv_dtype.itemsize
    if budget_mib > 0:
        budget = budget_mib << 20
    else:
        budget = min(max_rows * _round_up(max_context or c.max_position) * per_position, ram // 4)
    return PackedPool(decoder, max_rows, budget)
