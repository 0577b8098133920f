"""Encode images that arrive together in one call.

Requests are handed in one at a time (`put`); a thread calls `fn` on everything that
arrived while its previous call ran, concatenated along the first axis, and hands each
request its own rows. Alone, a request is encoded at once (no waiting window); under a
burst of camera frames, one call per burst instead of one per frame: the vision encoder's
weights are read once and TensorRT / ONNX Runtime run one larger batch.

A request's input is an array, or a tuple of arrays with the same first axis (an image's
tiles and their arrangement, for Llama-3.2-Vision): each is concatenated with its peers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

Done = Callable[[np.ndarray | None, float, Exception | None], None]  # (rows, call ms, error)


class Batcher:
    def __init__(self, fn: Callable[[np.ndarray], tuple[np.ndarray, float]], max_batch: int):
        self.fn, self.max_batch = fn, max_batch
        self.pending: list[tuple[np.ndarray, Done]] = []
        self.cond = threading.Condition()
        self.closing = False
        self.calls = 0  # how many times fn ran (tests read it)
        self.thread = threading.Thread(target=self._loop, name="image-batcher", daemon=True)
        self.thread.start()

    def put(self, x: np.ndarray, done: Done) -> None:
        with self.cond:
            if self.closing:
                raise RuntimeError("the image batcher is closed")
            self.pending.append((x, done))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    def _take(self) -> list[tuple[np.ndarray, Done]]:
        """Up to max_batch images' worth of requests, oldest first (at least one request)."""
        taken, rows = [], 0
        while self.pending and (not taken or rows + _rows(self.pending[0][0]) <= self.max_batch):
            x, done = self.pending.pop(0)
            taken.append((x, done))
            rows += _rows(x)
        return taken

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.closing or self.pending):
                    self.cond.wait()
                if self.closing and not self.pending:
                    return
                batch = self._take()
            try:
                out, ms = self.fn(_concat([x for x, _ in batch]))
                self.calls += 1
            except Exception as e:
                for _, done in batch:
                    self._deliver(done, None, 0.0, e)
                continue
            start = 0
            for x, done in batch:
                n = _rows(x)
                self._deliver(done, _slice(out, start, start + n), ms, None)
                start += n

    @staticmethod
    def _deliver(done: Done, rows, ms, error) -> None:
        try:
            done(rows, ms, error)
        except Exception:  # one request's callback must not stop the others'
            log.exception("image batcher: a request's callback failed")


def _rows(x) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[0]


def _concat(xs: list):
    if isinstance(xs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*xs))
    return np.concatenate(xs)


def _slice(out, start: int, end: int):
    """A request's rows of fn's output (an array, or a list of arrays)."""
    return [a[start:end] for a in out] if isinstance(out, list) else out[start:end]
