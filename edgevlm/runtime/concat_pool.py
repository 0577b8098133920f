"""The legacy per-row pool for concat-KV graphs (ONNX Runtime KV=concat; TensorRT 8.6 / 10.3
engines, which have no in-place cache update): each row is a batch-1 sequence of the
backend's, and a decode step runs the rows one after another.

A concat graph appends to the cache by writing past + new into a second buffer, so every
row has its own length and its own pair of buffers; batching them would mean padding every
cache to one length, a copy of every cache every step. The static layout exists to avoid
exactly that: where a decoder has it, its packed pool batches instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from edgevlm.runtime.kv_pool import Row, check_cross, check_room


class ConcatSequence(Protocol):
    """A backend's batch-1 concat-KV sequence, reused across rows."""

    def reset(self, capacity: int) -> None:
        """Empty, with room for `capacity` positions."""

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append inputs_embeds [1, S, D]; the last position's logits [V]."""

    def save(self, n: int) -> list[np.ndarray]: ...

    def load(self, kv: list[np.ndarray]) -> None: ...

    def close(self) -> None: ...


class ConcatPool:
    """Rows backed by batch-1 sequences, made on demand and kept for the next row (on TensorRT
    a sequence owns execution contexts and device buffers, too dear to make per request)."""

    def __init__(self, new_sequence: Callable[[], ConcatSequence], max_rows: int, *, max_context: int,
                 bytes_per_position: int, chunked_prefill: bool, reuses_prefix: bool, where: str = ""):
        self.new_sequence = new_sequence
        self.max_rows = max_rows
        self.max_context = max_context
        self.bytes_per_position = bytes_per_position
        self.chunked_prefill = chunked_prefill
        self.reuses_prefix = reuses_prefix
        self.where = where
        self.rows: list[Row] = []
        self.idle: list[ConcatSequence] = []

    @property
    def budget_bytes(self) -> int:  # two buffers per tensor, each up to the whole context
        return 2 * self.max_rows * self.max_context * self.bytes_per_position

    def describe(self) -> str:
        return (f"KV per sequence{self.where}, up to {self.max_rows} sequences of at most {self.max_context} "
                "positions, one decoder call per sequence per step (concat layout)")

    def fits(self, capacity: int) -> bool:
        return len(self.rows) < self.max_rows

    def never_fits(self, capacity: int) -> bool:
        return capacity > self.max_context

    cross_attention = False

    def acquire(self, capacity: int, cross=None) -> Row:
        check_cross(self, cross)
        seq = self.idle.pop() if self.idle else self.new_sequence()
        seq.reset(capacity)
        row = Row(capacity, state=seq)
        self.rows.append(row)
        return row

    def release(self, row: Row) -> None:
        self.rows.remove(row)
        self.idle.append(row.state)
        row.state = None

    def close(self) -> None:
        for seq in self.idle + [r.state for r in self.rows]:
            seq.close()
        self.idle, self.rows = [], []

    def save(self, row: Row, n: int) -> list[np.ndarray]:
        return row.state.save(n)

    def load(self, row: Row, kv: list[np.ndarray]) -> None:
        check_room(row, kv[0].shape[1] - row.length)
        row.state.load(kv)
        row.length = kv[0].shape[1]

    def prefill(self, row: Row, embeds: np.ndarray) -> np.ndarray:
        check_room(row, embeds.shape[1])
        if not self.chunked_prefill and row.length:
            raise ValueError("this decoder prefills once, on an empty cache")
        logits = np.array(row.state.forward(embeds), np.float32)
        row.length += embeds.shape[1]
        return logits

    def decode(self, rows: list[Row], embeds: np.ndarray) -> np.ndarray:
        out = []
        for i, r in enumerate(rows):
            check_room(r, 1)
            out.append(r.state.forward(embeds[i:i + 1]))
            r.length += 1
        return np.stack(out)
