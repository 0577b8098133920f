"""Open the runners a target serves: the vision encoder and the decoder, on ONNX Runtime (cpu)
or TensorRT engines (jetson), with the KV cache layout chosen for the export."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgevlm.manifest import OnnxArtifacts


class VisionEncoder:
    """pixel_values [N, 3, S, S] -> (image_embeds [N, T, D], encode ms); N = 0 costs nothing."""

    def __init__(self, onnx_dir: str | Path, runner: str = "onnxruntime", engine_dir: str | Path = ""):
        art = OnnxArtifacts.open(onnx_dir)
        self.cfg = art.config
        if runner == "onnxruntime":
            from edgevlm.runtime.onnxruntime import OrtVisionEncoder
            self.run = OrtVisionEncoder(art.path(cpu_form(art, "vision_encoder")))
        elif runner == "tensorrt":
            from edgevlm.runtime.tensorrt.vision import TrtVisionEncoder
            self.run = TrtVisionEncoder(engine_dir)
        else:
            raise ValueError(f"unknown runner {runner!r} (onnxruntime or tensorrt)")

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, float]:
        if pixel_values.shape[0] == 0:
            return np.zeros((0, self.cfg.image_tokens, self.cfg.text.hidden_size), np.float32), 0.0
        t0 = time.perf_counter()
        embeds = self.run(np.ascontiguousarray(pixel_values, np.float32))
        return embeds, (time.perf_counter() - t0) * 1e3


KV_CACHES = ("auto", "concat", "static")


def kv_layout(art: OnnxArtifacts, kv_cache: str = "auto") -> str:
    """auto: the in-place static cache where the export has decoder.static.onnx (half the KV
    memory, no slower in `make bench`), concat for exports made before it existed."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"unknown kv_cache {kv_cache!r}; use one of {', '.join(KV_CACHES)}")
    if kv_cache == "auto":
        return "static" if "decoder_static" in art.manifest["files"] else "concat"
    art.path("decoder_static" if kv_cache == "static" else "decoder")  # says so if the file is missing
    return kv_cache


def cpu_form(art: OnnxArtifacts, key: str) -> str:
    """The graph ONNX Runtime runs: a quantized export's cpu twin where it has one (the
    MatMulNBits decoder of export/matmul_nbits.py, the dynamically quantized vision encoder);
    its Q/DQ graphs are TensorRT's."""
    return f"{key}_cpu" if f"{key}_cpu" in art.manifest["files"] else key


def open_decoder(onnx_dir: str | Path, runner: str = "onnxruntime", engine_dir: str | Path = "",
                 kv_cache: str = "auto"):
    """The decoder a target runs: OrtDecoder (kv_cache picks its graph) or TrtDecoder (the engine
    folder records its own layout). Either opens its own KV pool (`open_pool`)."""
    art = OnnxArtifacts.open(onnx_dir)
    if runner == "onnxruntime":
        from edgevlm.runtime.onnxruntime import OrtDecoder
        static = kv_layout(art, kv_cache) == "static"
        return OrtDecoder(art.path(cpu_form(art, "decoder_static" if static else "decoder")), art.config.text,
                          static=static, cross_length=art.config.cross_length)
    if runner == "tensorrt":
        if art.config.cross_length:
            raise ValueError("the TensorRT runner does not serve cross-attention models yet (make engines builds "
                             "their engines); use the cpu target")
        from edgevlm.runtime.tensorrt.decoder import TrtDecoder
        return TrtDecoder(engine_dir, art.config.text)
    raise ValueError(f"unknown runner {runner!r} (onnxruntime or tensorrt)")
