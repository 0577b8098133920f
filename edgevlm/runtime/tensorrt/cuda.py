"""The few CUDA runtime calls the TensorRT runners need, through cuda-python (what NVIDIA's
TensorRT samples use). Every call returns (error, *values); `check` turns errors into
exceptions. Imported only on a machine with a GPU."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edgevlm.jetson.device import cudart as _cudart

cudart = _cudart()  # cuda.bindings.runtime (12.x, 13.x) or cuda.cudart (11.x)
if cudart is None:
    raise ImportError("cuda-python is not installed (the TensorRT runners need it)", name="cuda")


class CudaError(RuntimeError):
    pass


def check(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"CUDA error {err}: {cudart.cudaGetErrorString(err)[1]}")
    return values[0] if len(values) == 1 else (values or None)


class Stream:
    def __init__(self):
        self.handle = check(cudart.cudaStreamCreate())

    def sync(self) -> None:
        check(cudart.cudaStreamSynchronize(self.handle))

    def free(self) -> None:
        if self.handle is not None:
            check(cudart.cudaStreamDestroy(self.handle))
            self.handle = None


class DeviceBuffer:
    """nbytes of device memory, allocated once and reused."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes)))

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        host = np.ascontiguousarray(host)
        if host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        check(cudart.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))

    def zero(self, stream: Stream) -> None:
        check(cudart.cudaMemsetAsync(self.ptr, 0, self.nbytes, stream.handle))

    def download(self, host: np.ndarray, stream: Stream) -> np.ndarray:
        check(cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))
        return host

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFree(self.ptr))
            self.ptr = 0


class Graph:
    """One captured sequence of stream work, replayed by `launch`. Capture records kernel
    launches, not data: the buffers it read and wrote must stay where they were."""

    def __init__(self, stream: Stream, enqueue) -> None:
        """Capture what enqueue() puts on the stream; enqueue returns False on failure."""
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(stream.handle, mode))
        try:
            ok = enqueue()
        finally:  # always end the capture, or the stream stays unusable
            graph = check(cudart.cudaStreamEndCapture(stream.handle))
        if not ok:
            check(cudart.cudaGraphDestroy(graph))
            raise CudaError("the enqueue failed while capturing a CUDA graph")
        self.graph = graph
        # the WithFlags form has the same signature in cuda-python 11.x (JetPack 5) and 12+
        self.exec = check(cudart.cudaGraphInstantiateWithFlags(graph, 0))

    def launch(self, stream: Stream) -> None:
        check(cudart.cudaGraphLaunch(self.exec, stream.handle))

    def free(self) -> None:
        if getattr(self, "exec", None) is not None:
            check(cudart.cudaGraphExecDestroy(self.exec))
            check(cudart.cudaGraphDestroy(self.graph))
            self.exec = None


class CapturedStep:
    """A step of fixed shapes and addresses, run ordinarily once (which does the execution
    context's lazy setup, as trtexec does), then captured as a CUDA graph and replayed. Where
    capture fails the step keeps running ordinarily (said once in the log)."""

    def __init__(self, stream: Stream, enqueue: Callable[[], bool], what: str):
        self.stream, self.enqueue, self.what = stream, enqueue, what
        self.graph: Graph | None = None
        self.failed = False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.launch(self.stream)
            return
        if not self.enqueue():
            raise RuntimeError(f"TensorRT: {self.what}: enqueue failed")
        if self.failed:
            return
        self.stream.sync()
        try:
            self.graph = Graph(self.stream, self.enqueue)
        except CudaError as e:
            cudart.cudaGetLastError()  # capture errors are not sticky; clear the last one
            self.failed = True
            logging.getLogger(__name__).warning("%s not captured as a CUDA graph (%s); running it without",
                                                self.what, e)

    def free(self) -> None:
        if self.graph is not None:
            self.graph.free()
            self.graph = None
