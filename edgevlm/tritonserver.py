"""Start and stop a real tritonserver on a rendered model repository.

The server is the system `tritonserver` where one is installed (Jetson containers), else the
binary bundled in the nvidia-pytriton wheel, run with a backend directory of our own that
holds the python backend and the stub built for this interpreter.

    python -m edgevlm.tritonserver --repository artifacts/tiny/repository
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SYSTEM_BACKENDS = Path("/opt/tritonserver/backends")


class ServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def locate(work_dir: Path) -> tuple[Path, Path, dict]:
    """(tritonserver binary, backend directory, extra environment)."""
    system = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
    if system and SYSTEM_BACKENDS.is_dir():
        return Path(system), SYSTEM_BACKENDS, {}
    # Find the wheel without importing it: only its binaries are installed, not its deps.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("no tritonserver: install Triton, or `pip install --no-deps "
                          "nvidia-pytriton` for the bundled binary (make setup does)")
    package = Path(list(spec.submodule_search_locations)[0])
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled tritonserver has no python backend stub for Python {version}")
    backend = work_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, backend / f.name)
    shutil.copy2(stub, backend / stub.name)
    libs = package.parent / "nvidia_pytriton.libs"
    env = {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
    return root / "bin" / "tritonserver", work_dir / "backends", env


@dataclass(frozen=True)
class GrpcTLS:
    """gRPC over TLS: the server's PEM certificate and key; with `client_ca`, mutual TLS
    (clients must present a certificate that CA signed)."""
    cert: Path
    key: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        out = [f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca:
            return out + [f"--grpc-root-cert={self.client_ca}", "--grpc-use-ssl-mutual=true"]
        return out + ["--grpc-use-ssl=true"]


class TritonServer:
    """A tritonserver process bound to `host` (loopback by default) on free or given ports."""

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", grpc_port: int = 0,
                 http_port: int = 0, log_path: str | Path | None = None, verbose: bool = False,
                 tls: GrpcTLS | None = None):
        self.repository = Path(repository).resolve()
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.work = Path(tempfile.mkdtemp(prefix="edgevlm-triton-"))
        self.log_path = Path(log_path) if log_path else self.work / "tritonserver.log"
        self.verbose = verbose
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> tuple[list[str], dict]:
        exe, backends, env = locate(self.work)
        argv = [str(exe), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                "--allow-metrics=false", "--model-control-mode=none", "--strict-readiness=true",
                "--exit-timeout-secs=10", "--disable-auto-complete-config",
                # Image embeddings (1.2 MB at 1.7B) cross to the stubs in one region.
                "--backend-config=python,shm-default-byte-size=8388608",
                f"--log-verbose={1 if self.verbose else 0}"] + (self.tls.args() if self.tls else [])
        # The python stub runs the first `python` on PATH: ours, with edgevlm installed.
        env = {**os.environ, **env,
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        return argv, env

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        argv, env = self.command()
        log = open(self.log_path, "wb")
        # Own session: stop() can take down the stubs with the server.
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Over HTTP on loopback: independent of how gRPC is secured."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/v2/health/ready", timeout=2.0) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the session (server or orphaned stubs)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        if self.log_path.parent != self.work:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serve a rendered model repository with tritonserver.")
    ap.add_argument("--repository", required=True)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--tls-cert", help="PEM server certificate: serve gRPC over TLS")
    ap.add_argument("--tls-key", help="PEM key of --tls-cert")
    ap.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    tls = GrpcTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None) \
        if args.tls_cert else None
    server = TritonServer(args.repository, host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, verbose=args.verbose, tls=tls)
    print(f"serve: starting tritonserver on {args.repository} (log: {server.log_path})", flush=True)
    try:
        server.start()
    except ServerError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    print(f"serve: ready, gRPC at {server.grpc_url} (Ctrl-C stops)", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        while not stop and server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    code = server.proc.returncode if server.proc.poll() is not None else 0
    print("serve: stopping", flush=True)
    server.stop()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
