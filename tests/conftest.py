"""Shared fixtures: tiny random-weight checkpoints in the upstream layout, their ONNX export,
and one real tritonserver serving it, each made once per test session.

Tiers (pytest -m): `integration` tests run a real tritonserver (or a gateway in front of
one), `orin` tests need TensorRT on the device, `unit` is everything else (make test-fast).
A test that uses a server fixture is integration without saying so; one that starts its own
server carries the mark.
"""

from __future__ import annotations

import pytest
from edgevlm_client import Client

from edgevlm.presets import PRESETS
from edgevlm.serve.repository import render_repository
from edgevlm.model.random_weights import write_random_checkpoint
from edgevlm.serve.tritonserver import TritonServer


SERVER_FIXTURES = {"server", "client", "own_server", "gateway", "sdk", "start_gateway"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if not any(item.get_closest_marker(m) for m in ("integration", "orin")):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_server(request, monkeypatch):
    """Keeps the tiers honest: a unit test that starts tritonserver fails, naming the mark."""
    if request.node.get_closest_marker("unit"):
        def refuse(self, *a, **k):
            raise AssertionError("this test starts tritonserver: mark it @pytest.mark.integration")
        monkeypatch.setattr(TritonServer, "start", refuse)


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
    from edgevlm.export.graphs import export_onnx
    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny", log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_family(tiny_onnx, tmp_path_factory):
    """The tiny export and what `make quantize` makes of it, laid out as under artifacts/<name>/:
    onnx/ (the FP32 export), onnx-fp16/, onnx-int8/, onnx-int4/."""
    from edgevlm.export.fp16 import fp16_export
    from edgevlm.export.quantize import quantize_export
    root = tmp_path_factory.mktemp("family") / "tiny"
    root.mkdir()
    (root / "onnx").symlink_to(tiny_onnx, target_is_directory=True)
    fp16_export(tiny_onnx, root / "onnx-fp16", log=lambda m: None)
    for precision in ("int8", "int4"):
        quantize_export(tiny_onnx, root / f"onnx-{precision}", precision, log=lambda m: None)
    return root


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


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all made
    now with the openssl CLI (PEM paths by name)."""
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make test certificates")
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=edgevlm test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=edgevlm test {name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-out", f"{name}.pem", *ext)
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="session")
def start_gateway():
    """Factory: an OpenAI-compatible gateway process on a free loopback port; stopped at the end."""
    import subprocess
    import sys
    import time
    import urllib.request

    from edgevlm.serve.tritonserver import free_port
    procs = []

    def start(grpc_url: str, *args: str, ready_status=(503,)) -> str:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "edgevlm_client.cli", "--url", grpc_url, "gateway",
                                 "--port", str(port), "--log-level", "warning", *args])
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the gateway exited"
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                return base
            except urllib.error.HTTPError as e:  # answering: up, whatever the model server's state
                if e.code in ready_status:
                    return base
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("gateway did not start")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
