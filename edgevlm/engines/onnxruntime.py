"""ONNX Runtime runners for vision_encoder.onnx and decoder.onnx (the cpu target)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevlm.presets import TextConfig


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtVisionEncoder:
    """pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, N, D]."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.sess = session(path, threads)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sess.run(["image_embeds"], {"pixel_values": pixel_values})[0]


class OrtDecoder:
    """One decoder step: (inputs_embeds, position_ids, past KV) -> (last logits, present KV)."""

    def __init__(self, path: str | Path, cfg: TextConfig, threads: int | None = None):
        self.cfg = cfg
        self.sess = session(path, threads)
        n = cfg.num_layers
        self.past_names = [f"past_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present_{kv}_{i}" for i in range(n) for kv in ("key", "value")]

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        c = self.cfg
        z = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), np.float32)
        return [z] * (2 * c.num_layers)

    def __call__(self, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                 past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"inputs_embeds": inputs_embeds, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past))
        logits, *present = self.sess.run(self.output_names, feeds)
        return logits, present
