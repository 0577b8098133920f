"""The batched KV pool of the cpu target: decoder.static.onnx on ONNX Runtime.

Every row's cache lives in one budget-sized buffer per cache tensor, the rows packed at the
front as a [rows, kv_heads, C, head_dim] tensor. A decode step is ONE decoder call over all
rows, each at its own position (TensorScatter writes per row, the mask is per row).

Why a shared, bucketed width C: attention reads all C positions of each row (the unfilled
ones masked), so C follows the longest live row, rounded up to GRANULE, instead of the
model's full context: a 300-token row of the 1.7B shape (FP32 KV, 0.39 MB per position)
reads 0.13 GB per step at C = 320 instead of 0.8 GB at the full 2048. Changing C moves the
rows within their buffers (once per GRANULE tokens of growth). Memory is the budget, taken
once at start; admission keeps rows x C within it, so a row, once admitted, never runs out
of cache.

A cross-attention decoder (Llama-3.2-Vision) also reads each row's image K/V: one more
buffer per cross tensor, [max_rows, kv_heads, L, head_dim], packed like the caches, filled
once when a row is admitted (the image's K/V is computed once, not per step); a text-only
row's slot is left as it is and switched off by has_image 0.
"""

from __future__ import annotations

import numpy as np

from edgevlm.runtime.kv_pool import Row, check_room
from edgevlm.runtime.packed_rows import GRANULE, PackedRows, round_up


class OrtPackedPool(PackedRows):
    def __init__(self, decoder, max_rows: int, budget_bytes: int):
        """decoder: a static onnxruntime.OrtDecoder (it opens this pool)."""
        c = decoder.cfg
        self.d = decoder
        self.heads, self.dim = c.num_kv_heads, c.head_dim
        self.bytes_per_position = c.kv_bytes_per_position(decoder.kv_dtype.itemsize)
        self.positions = int(budget_bytes // self.bytes_per_position)  # in all rows together
        if self.positions < GRANULE:
            raise ValueError(f"KV budget {budget_bytes >> 20} MiB holds {self.positions} positions; "
                             f"one sequence needs at least {GRANULE}")
        self.max_rows = max_rows
        # np.zeros: pages are mapped as rows first touch them (RSS follows use, not the budget),
        # and a masked position must hold a finite value (0 x NaN is NaN in attention).
        self.buffers = [np.zeros(self.positions * self.heads * self.dim, decoder.kv_dtype)
                        for _ in range(2 * c.kv_layers)]
        self.rows: list[Row] = []
        self.width = 0  # C: positions per row in the current layout
        self.logits = np.empty((max_rows, c.vocab_size), np.float32)
        self.binding = decoder.sess.io_binding()
        self.cross_attention = bool(decoder.cross_length)
        self.cross = [np.zeros((max_rows, self.heads, decoder.cross_length, self.dim), decoder.cross_dtype)
                      for _ in decoder.cross_names]

    @property
    def budget_bytes(self) -> int:
        return self.positions * self.bytes_per_position

    def describe(self) -> str:
        return (f"KV pool {self.budget_bytes / 2**20:.0f} MiB ({self.d.kv_dtype.name}): {self.positions} positions "
                f"shared by up to {self.max_rows} sequences, one batched decoder call per step")

    def close(self) -> None:
        self.buffers = []

    # -- admission --------------------------------------------------------------------------
    def fits(self, capacity: int) -> bool:
        if not super().fits(capacity):
            return False
        widest = max([capacity] + [r.capacity for r in self.rows])
        return (len(self.rows) + 1) * round_up(widest) <= self.positions

    def never_fits(self, capacity: int) -> bool:
        return round_up(capacity) > self.positions

    def acquire(self, capacity: int, cross=None) -> Row:
        if self.rows and (len(self.rows) + 1) * self.width > self.positions:
            # the spare granule the rows took while they had the room leaves none for this one
            # (fits() counted the rows at their capacities, without it)
            self._relayout(round_up(max(r.length + 1 for r in self.rows)))
        row = super().acquire(capacity, cross)
        self.width = self.width or GRANULE
        if cross is not None:
            for buf, kv in zip(self.cross, cross.image.kv):
                buf[row.index] = kv
        return row

    def release(self, row: Row) -> None:
        super().release(row)
        if not self.rows:
            self.width = 0

    # -- the prefix cache's copies ------------------------------------------------------------
    def save(self, row: Row, n: int) -> list[np.ndarray]:
        return [self._view(buf, row.index, 1)[0, :, :n].copy() for buf in self.buffers]

    def load(self, row: Row, kv: list[np.ndarray]) -> None:
        n = kv[0].shape[1]
        check_room(row, n - row.length)
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
        if src.cross is not None:
            for buf in self.cross:
                buf[dst_index] = buf[src.index]

    def _fit_width(self, need: int) -> None:
        """Make C hold `need` positions per row: grow to the next granule (plus one, so growth
        is not paid every granule), shrink when two granules are idle."""
        target = round_up(need)
        if self.width >= target and self.width - target < 2 * GRANULE:
            return
        if target > self.width and len(self.rows) * (target + GRANULE) <= self.positions:
            target += GRANULE
        self._relayout(target)

    def _relayout(self, target: int) -> None:
        """Move the rows' filled positions to a row width of `target`."""
        n = len(self.rows)
        filled = max(r.length for r in self.rows)
        for buf in self.buffers:
            kept = self._view(buf, 0, n)[:, :, :filled].copy()
            self._view(buf, 0, n, target)[:, :, :filled] = kept
        self.width = target

    # -- steps ---------------------------------------------------------------------------------
    def _run(self, start: int, count: int, embeds: np.ndarray, positions: np.ndarray,
             rows: list[Row]) -> np.ndarray:
        """rows: the packed rows at start .. start + count (whose cross-attention inputs go in)."""
        b, d = self.binding, self.d
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        b.bind_cpu_input("position_ids", positions)
        if self.cross_attention:
            self._bind_cross(start, rows, positions)
        for past, present, buf in zip(d.past_names, d.present_names, self.buffers):
            view = self._view(buf, start, count)
            b.bind_cpu_input(past, view)
            b.bind_output(present, "cpu", 0, d.kv_dtype, list(view.shape), view.ctypes.data)
        logits = self.logits[:count]
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        d.sess.run_with_iobinding(b)
        return logits

    def _bind_cross(self, start: int, rows: list[Row], positions: np.ndarray) -> None:
        """Each row's image K/V (in place) and, per input position, which of its image positions
        it attends to: a prompt position's own mask row, a generated one the last prompt row's."""
        s, length = positions.shape[1], self.d.cross_length
        mask = np.zeros((len(rows), s, length), np.float32)
        has = np.zeros(len(rows), np.float32)
        for i, r in enumerate(rows):
            if r.cross is None:
                continue
            has[i] = 1
            m = r.cross.mask
            at = positions[i]
            mask[i] = np.where((at < len(m))[:, None], m[np.minimum(at, len(m) - 1)], r.cross.decode_mask)
        self.binding.bind_cpu_input("cross_mask", mask)
        self.binding.bind_cpu_input("has_image", has)
        for name, buf in zip(self.d.cross_names, self.cross):
            self.binding.bind_cpu_input(name, buf[start:start + len(rows)])

    def prefill(self, row: Row, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[1]
        check_room(row, s)
        self._fit_width(max([row.length + s] + [r.length + 1 for r in self.rows]))
        positions = np.arange(row.length, row.length + s, dtype=np.int64)[None]
        logits = self._run(row.index, 1, embeds, positions, [row])[0].copy()
        row.length += s
        return logits

    def decode(self, rows: list[Row], embeds: np.ndarray) -> np.ndarray:
        """One decoder call over every packed row (see PackedRows._step_inputs)."""
        n = len(self.rows)
        inputs, positions, at = self._step_inputs(rows, embeds, n)
        self._fit_width(max(r.length + 1 for r in self.rows))
        logits = self._run(0, n, inputs, positions, self.rows)
        for r in rows:
            r.length += 1
        return logits[at]
