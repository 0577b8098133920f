"""What both packed pools share (OrtPackedPool on ONNX Runtime, TrtPackedPool on TensorRT):
live rows kept contiguous at the front of each cache tensor, a leaving row replaced by the
last one (the backend's `_move_row` copies its cache), and the inputs of a decode step over
every packed row, so a step binds one view per tensor whatever rows are decoding.
"""

from __future__ import annotations

import numpy as np

from edgevlm.runtime.kv_pool import Row, check_cross, check_room

GRANULE = 64  # positions: the ONNX Runtime pool's row width is a multiple of this


def round_up(n: int, k: int = GRANULE) -> int:
    return -(-n // k) * k


class PackedRows:
    """Mixed into a backend's pool, which adds `_move_row(src, dst_index)` (its memory copy)."""

    rows: list[Row]
    max_rows: int
    chunked_prefill = True  # a prompt may go in pieces at any offset (the cache shape does not change)
    reuses_prefix = True  # save/load copy rows' KV out and in (PrefixCache)

    cross_attention = False  # the ONNX Runtime pool's, for a cross-attention decoder: True

    def acquire(self, capacity: int, cross=None) -> Row:
        if not self.fits(capacity):
            raise RuntimeError("acquire without room: the scheduler checks fits() first")
        check_cross(self, cross)
        row = Row(capacity, index=len(self.rows), cross=cross)
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

    def fits(self, capacity: int) -> bool:  # the backend adds its memory rule
        return len(self.rows) < self.max_rows

    def _step_inputs(self, rows: list[Row], embeds: np.ndarray, batch: int):
        """(embeds [batch, 1, D], positions [batch, 1], where `rows` sit) for one decode step over
        every packed row. A row still being prefilled rides along with a zero input written at
        its next position, which its next chunk overwrites; rows past the live ones (padding
        to a bucket) write at position 0 of free slots, which a new sequence's prefill
        overwrites. That keeps the batch one contiguous view."""
        for r in rows:
            check_room(r, 1)
        inputs = np.zeros((batch, 1, embeds.shape[2]), np.float32)
        positions = np.zeros((batch, 1), np.int64)
        positions[:len(self.rows), 0] = [r.length for r in self.rows]
        at = [r.index for r in rows]
        inputs[at] = embeds
        return inputs, positions, at
