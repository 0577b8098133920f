"""Shared fixtures: tiny random-weight checkpoints in the upstream layout, their ONNX export,
and one real tritonserver serving it, each made once per test session."""

from __future__ import annotations

import pytest
from edgevlm_client import Client

from edgevlm.presets import PRESETS
from edgevlm.repository import render_repository
from edgevlm.synthetic import write_random_checkpoint
from edgevlm.tritonserver import TritonServer


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


@pytest.fixture(scope="session")
def server(tiny_onnx, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    repo = render_repository(tiny_onnx, tmp / "repository", max_sequences=4, default_max_tokens=32)
    srv = TritonServer(repo, log_path=tmp / "tritonserver.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return Client(server.grpc_url, timeout_s=60)
