"""The KV pool: where the scheduler's sequences keep their caches, and how one step runs them.

The scheduler decides (which rows decode, which prompt prefills, when a row leaves); a pool
executes. Every decoder builds its own pool (`OrtDecoder.open_pool`, `TrtDecoder.open_pool`)
and nothing outside a pool asks what kind it is: what differs between pools is declared in
the attributes of the `KVPool` protocol.

The pools:

  OrtPackedPool  (ort_packed_pool.py) decoder.static.onnx on ONNX Runtime: all rows' caches
                 packed in one budget-sized buffer per tensor; a decode step is ONE decoder
                 call over every row, so the weights are read once per step, not once per row.
  TrtPackedPool  (tensorrt/packed_pool.py) the same on a static-cache TensorRT engine, on the
                 GPU, a CUDA graph per batch-size bucket.
  ConcatPool     (concat_pool.py) concat-KV graphs (ONNX Runtime KV=concat, TensorRT 8.6 /
                 10.3): each row is a batch-1 sequence and a decode step runs them in turn.
                 Concat caches differ in length per row; padding them to one length would
                 copy every cache every step, which is what the static layout exists to avoid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(eq=False)
class Row:
    """One sequence's place in a pool: `length` positions filled, up to `capacity`."""
    capacity: int
    length: int = 0
    index: int = -1  # packed pools: its row in the packed tensors
    state: object = field(default=None, repr=False)  # per-row pools: the backend's batch-1 sequence
    cross: object = field(default=None, repr=False)  # cross_attention.CrossRow: its image's K/V and mask


@runtime_checkable
class KVPool(Protocol):
    """What the scheduler (and every in-process user) drives.

    Capabilities, declared, never guessed:
      chunked_prefill  a prompt may go in over several `prefill` calls, at any offset (else:
                       one call, on an empty row)
      reuses_prefix    `save` / `load` copy a row's leading KV out and in (the prefix cache)
      cross_attention  rows carry per-row model state beyond their KV: an image's cross-attention
                       K/V and mask (Llama-3.2-Vision), given at `acquire`
    """

    max_rows: int
    chunked_prefill: bool
    reuses_prefix: bool
    cross_attention: bool
    bytes_per_position: int  # KV bytes one position of one row takes (every layer's key and value)
    rows: list[Row]  # the acquired rows

    @property
    def budget_bytes(self) -> int:
        """KV memory the pool holds or may allocate for its rows."""

    def describe(self) -> str:
        """One line for the server log: memory, rows, how a step runs."""

    def fits(self, capacity: int) -> bool:
        """Room now for one more row of `capacity` positions (every live row able to grow to its own)."""

    def never_fits(self, capacity: int) -> bool:
        """A row of `capacity` positions could not be held even by an empty pool."""

    def acquire(self, capacity: int, cross=None) -> Row:
        """A new, empty row; only after fits(capacity). cross: its CrossRow (cross_attention pools)."""

    def release(self, row: Row) -> None:
        """The row leaves; its memory serves the next one."""

    def prefill(self, row: Row, embeds: np.ndarray) -> np.ndarray:
        """Append embeds [1, S, D] to one row; the last position's logits [V]."""

    def decode(self, rows: list[Row], embeds: np.ndarray) -> np.ndarray:
        """One position for each of `rows` (embeds [len(rows), 1, D]); their logits [len(rows), V]."""

    def save(self, row: Row, n: int) -> list[np.ndarray]:
        """A copy of the row's first n positions: [kv_heads, n, head_dim] per cache tensor."""

    def load(self, row: Row, kv: list[np.ndarray]) -> None:
        """Fill a new row's first positions from saved KV; the row continues from there."""

    def close(self) -> None:
        """Free what the pool allocated (device memory; a pool made for a measurement)."""


def check_cross(pool: KVPool, cross) -> None:
    """A row with an image's cross-attention state needs a pool that feeds it to the decoder."""
    if cross is not None and not pool.cross_attention:
        raise ValueError("this KV pool has no cross-attention inputs (the decoder is not a cross-attention model)")


def check_room(row: Row, positions: int) -> None:
    """Every pool's one capacity rule: a row never holds more than it was admitted for."""
    if row.length + positions > row.capacity:
        raise ValueError(f"sequence capacity {row.capacity} exceeded")


def default_budget(max_rows: int, positions: int, bytes_per_position: int) -> int:
    """KV bytes for `max_rows` rows of `positions`, but at most a quarter of this machine's
    memory (on a Jetson that memory is the GPU's too, shared with everything else)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(max_rows * positions * bytes_per_position, ram // 4)
