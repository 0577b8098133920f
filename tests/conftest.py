"""Shared fixtures: tiny random-weight checkpoints in the upstream layout, their ONNX export,
and real tritonservers serving them (`start_server`, the one way a test starts one), each
made once per test session where it can be.

Tiers (pytest -m): `integration` tests run a real tritonserver (or a gateway in front of
one), `orin` tests need TensorRT on the device, `unit` is everything else (make test-fast).
A test that uses a server fixture is integration without saying so.

Servers run under the supervisor, as `make serve` runs them: a tritonserver crash (2.51 has
known races) becomes a restart the tests ride out with the client's typed, retried errors,
and the session's summary lists every restart with the dead server's log.
"""

from __future__ import annotations

import pytest
from edgevlm_client import Client

from edgevlm.presets import PRESETS
from edgevlm.model.random_weights import write_random_checkpoint
from edgevlm.serve.repository import render_repository
from edgevlm.serve.supervisor import Supervisor
from edgevlm.serve.tritonserver import TritonServer


SERVER_FIXTURES = {"server", "client", "own_server", "gateway", "sdk", "start_gateway", "start_server"}


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


class Served:
    """A tritonserver a test asked for, under its supervisor unless the test's subject is the
    server dying; everything else is the TritonServer's (grpc_url, metrics(), rss_mb() ...)."""

    def __init__(self, server: TritonServer, supervised: bool):
        self.server = server
        self.messages: list[str] = []  # what the supervisor said
        self.expected_restarts = 0  # a test that kills the server on purpose says how often
        self.supervisor = Supervisor(server, interval_s=0.5, log=self.messages.append) if supervised else None

    def start(self) -> Served:
        self.server.start()
        if self.supervisor is not None:
            self.supervisor.start()
        return self

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        self.server.stop()

    def __getattr__(self, name):
        return getattr(self.server, name)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


STARTED: list[Served] = []  # every server of the session, for the summary


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start_server(onnx_dir, supervised=True, tls=None, ports=None, **repository
    options) renders a repository and starts a tritonserver on free loopback ports (or the
    given ones); stopped when the test's `with` ends, or at the end of the session."""
    mine: list[Served] = []

    def start(onnx_dir, *, supervised: bool = True, tls=None, ports: dict | None = None, **options) -> Served:
        tmp = tmp_path_factory.mktemp("serve")
        repo = render_repository(onnx_dir, tmp / "repository", **options)
        served = Served(TritonServer(repo, log_path=tmp / "tritonserver.log", tls=tls, **(ports or {})), supervised)
        mine.append(served)
        STARTED.append(served)
        return served.start()

    yield start
    for served in mine:
        served.stop()


def pytest_terminal_summary(terminalreporter):
    """Every restart a supervisor made during the session, with the dead server's log: a crash
    is reported even when the tests rode it out."""
    restarted = [s for s in STARTED if s.supervisor is not None and len(s.supervisor.restarts) > s.expected_restarts]
    if not restarted:
        return
    terminalreporter.section("tritonserver restarts (supervised)")
    for s in restarted:
        terminalreporter.write_line(f"{s.server.repository}: {len(s.supervisor.restarts)} restart(s)")
        for message in s.messages:
            terminalreporter.write_line(f"  {message}")
        for kept in s.supervisor.kept_logs:
            lines = kept.read_text(errors="replace").splitlines()
            terminalreporter.write_line(f"  last lines of {kept}:")
            for line in lines[-15:]:
                terminalreporter.write_line(f"    {line}")


@pytest.fixture(scope="session")
def server(start_server, tiny_onnx):
    return start_server(tiny_onnx, max_sequences=4, default_max_tokens=32)


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
