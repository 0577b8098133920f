"""The vision encoder engine: pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, N, D]."""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edgevlm.runtime.tensorrt.cuda import DeviceBuffer, Stream
from edgevlm.runtime.tensorrt.engine import np_dtype, open_engine

if TYPE_CHECKING:  # annotations only
    import tensorrt as trt


class TrtVisionEncoder:
    def __init__(self, engine_dir: str | Path):
        module, engine, _ = open_engine(engine_dir, "vision_encoder")
        self.trt: ModuleType = module
        self.engine: trt.ICudaEngine = engine
        self.context = self.engine.create_execution_context()
        self.stream = Stream()
        self.lock = threading.Lock()  # one context: one call at a time
        lo, _opt, hi = self.engine.get_tensor_profile_shape("pixel_values", 0)
        self.max_batch = hi[0]
        out_shape = self.engine.get_tensor_shape("image_embeds")  # [-1, N, D]
        self.out_dtype = np_dtype(self.trt, self.engine, "image_embeds")
        self.in_dtype = np_dtype(self.trt, self.engine, "pixel_values")
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
