"""Shared fixtures: random-weight tiny checkpoints in the upstream layout, written once."""

from __future__ import annotations

import pytest

from edgevlm.presets import PRESETS
from edgevlm.synthetic import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """MobileVLM V2 (LDPv2) at toy size."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", PRESETS["tiny"])


@pytest.fixture(scope="session")
def tiny_v1_ckpt(tmp_path_factory):
    """MobileVLM V1 (LDP) at toy size, saved as sharded safetensors."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-v1", PRESETS["tiny-v1"],
                                   fmt="safetensors", shard_bytes=1 << 20, seed=1)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    """The tiny V2 checkpoint exported to ONNX."""
    from edgevlm.onnx_export import export_onnx
    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny", log=lambda m: None)
