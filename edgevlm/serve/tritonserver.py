"""Start and stop a real tritonserver on a rendered model repository.

The server is the system `tritonserver` where one is installed (Jetson containers), else the
binary bundled in the nvidia-pytriton wheel, run with a backend directory of our own that
holds the python backend and the stub built for this interpreter.

    python -m edgevlm.serve --repository artifacts/tiny/repository     (supervised; make serve)
"""

from __future__ import annotations

import importlib.util
import os
import secrets
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


# What model clients need: health, metadata, model-config (Client.metadata()) and inference.
# The rest changes or reveals server state; it answers only requests carrying the admin
# header (value in `admin_key`, and in <work dir>/admin-key for the operator).
ADMIN_APIS = "model-repository,shared-memory,statistics,trace,logging"
ADMIN_HEADER = "edgevlm-admin-key"


def proc_status_kib(pid: int, field: str) -> int:
    """A kB figure of /proc/<pid>/status ("VmRSS:", "VmHWM:"); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TritonServer:
    """A tritonserver process bound to `host` (loopback by default) on free or given ports.

    Shipped configuration: no model control (the repository is fixed at start), admin APIs
    restricted to the admin key, Prometheus metrics read-only on `metrics_port`.
    """

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", grpc_port: int = 0,
                 http_port: int = 0, log_path: str | Path | None = None, verbose: bool = False,
                 tls: GrpcTLS | None = None, metrics_port: int = 0):
        self.repository = Path(repository).resolve()
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.admin_key = secrets.token_urlsafe(24)
        self.work = Path(tempfile.mkdtemp(prefix="edgevlm-triton-"))
        self.log_path = Path(log_path) if log_path else self.work / "tritonserver.log"
        self.verbose = verbose
        self.tls = tls
        self._located: tuple[Path, Path, dict] | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> tuple[list[str], dict]:
        if self._located is None:  # once: a restart must not rewrite a stub binary still exiting
            self._located = locate(self.work)
        exe, backends, env = self._located
        argv = [str(exe), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}",
                f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}",
                "--model-control-mode=none", "--strict-readiness=true",
                "--exit-timeout-secs=10", "--disable-auto-complete-config",
                # Image embeddings (1.2 MB at 1.7B) cross to the stubs in one region.
                "--backend-config=python,shm-default-byte-size=8388608",
                f"--log-verbose={1 if self.verbose else 0}"] + (self.tls.args() if self.tls else [])
        # The python stub runs the first `python` on PATH: ours, with edgevlm installed.
        env = {**os.environ, **env,
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        return argv, env

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted APIs (Triton prefixes the gRPC one)."""
        name = f"triton-grpc-protocol-{ADMIN_HEADER}" if protocol == "grpc" else ADMIN_HEADER
        return {name: self.admin_key}

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by name with labels, e.g. 'edgevlm_active_sequences{model="mobilevlm"}'."""
        with urllib.request.urlopen(self.metrics_url, timeout=5.0) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def pids(self) -> list[int]:
        """The server and its python stubs (one process group)."""
        if self.proc is None:
            return []
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getpgid(int(d.name)) == self.proc.pid:
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def rss_mb(self) -> float:
        """Resident memory of the server and its stubs together, MiB."""
        return self._status_kib("VmRSS:") / 1024

    def _status_kib(self, field: str) -> int:
        return sum(proc_status_kib(pid, field) for pid in self.pids())

    def peak_rss_mb(self) -> float:
        """The server's and its stubs' peak resident memory (each one's high-water mark), MiB."""
        return self._status_kib("VmHWM:") / 1024

    def unleaked_rss_mb(self) -> float:
        """rss_mb() less what mobilevlm's prefix and image caches hold by design (their
        gauges): a leak check compares this before and after, so a cache filling up to its
        budget is not taken for a leak."""
        m = self.metrics()
        cached = sum(m.get(f'{name}{{model="mobilevlm"}}', 0.0)
                     for name in ("edgevlm_prefix_cache_bytes", "edgevlm_image_cache_bytes"))
        return self.rss_mb() - cached / 2**20

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        argv, env = self.command()
        (self.work / "admin-key").write_text(self.admin_key + "\n")
        (self.work / "admin-key").chmod(0o600)
        log = open(self.log_path, "ab")  # appended: a restarted server keeps the earlier log
        self._log_start = log.tell()  # where this run's lines begin (keep_log copies them)
        # Own session: stop() can take down the stubs with the server.
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}:\n{self.log_tail()}")
            # tritonserver binds its metrics port after HTTP reports ready: wait for both, so
            # whoever reads metrics right after start() finds them
            if self.ready() and self._metrics_up():
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

    def _metrics_up(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2.0) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stub_pid(self, model: str) -> int | None:
        """The pid of `model`'s python stub process, or None when it is not running."""
        for pid in self.pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"triton_python_backend_stub") and any(f"/{model}/".encode() in a for a in argv):
                return pid
        return None

    def stub_alive(self, model: str) -> bool:
        return self.stub_pid(model) is not None

    def keep_log(self, why: str) -> Path:
        """Copy this run's part of the log (from its start to now) beside the log, headed by
        `why`, and return where: the record of a server that died survives any restart, any
        rotation of the main log and stop() (which may remove the working directory)."""
        kept_dir = self.log_path.parent if self.log_path.parent != self.work else self.work.parent
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = kept_dir / f"{self.log_path.stem}.died-{stamp}-{os.getpid()}-{self.grpc_port}.log"
        n = 1
        while kept.exists():
            n += 1
            kept = kept.with_name(f"{self.log_path.stem}.died-{stamp}-{os.getpid()}-{self.grpc_port}-{n}.log")
        with open(self.log_path, "rb") as src, open(kept, "wb") as dst:
            src.seek(getattr(self, "_log_start", 0))
            dst.write(f"# edgevlm: {why}\n".encode())
            shutil.copyfileobj(src, dst)
        return kept

    def restart(self, timeout_s: float = 180.0) -> TritonServer:
        """Kill at once (a server needing a restart cannot finish its requests) and start again
        on the same ports."""
        self._terminate(graceful_s=0)
        return self.start(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        self._terminate(graceful_s=timeout_s)
        if self.log_path.parent != self.work:
            shutil.rmtree(self.work, ignore_errors=True)

    def _terminate(self, graceful_s: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and graceful_s > 0:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(graceful_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the session (server or orphaned stubs)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
