"""Run one stage of a quantization check in a process of its own.

A check loads an FP32 export and then each quantized form, one after the other. Releasing a
session inside one process does not give its memory back: the allocator keeps its arenas (at
7B a process still held 9.9 GB after the FP32 graphs were freed, and the next form's 15 GB did
not fit beside it on a 24 GiB machine). A process that exits returns all of it. Children are
forked from a server process that imported the export modules once and never opened a session
(forking a process that runs ONNX Runtime's thread pools is not safe), so each costs
milliseconds, not an interpreter start.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

_PRELOAD = ["numpy", "onnxruntime", "edgevlm.export.quantize", "edgevlm.export.quant_check",
            "edgevlm.export.mllama_quantize"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def run_isolated(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a fresh child process; its result comes back pickled, its exception is
    raised here. fn must be a module-level function (the child finds it by name)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_forkserver()) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RuntimeError(f"{fn.__name__} was killed before it answered (out of memory? "
                               "`dmesg` names the OOM killer)") from None
