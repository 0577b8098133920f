"""`make jetson-doctor`: is this Orin ready to build engines and serve? One line per check, in
the order a new owner hits them, each failure with its fix.

    python -m edgevlm.jetson.doctor [--preset mobilevlm-v2-1.7b] [--precision int4] [--engines DIR]

The checks read a `Probe`: on the device (or inside the container) `Probe.read()` collects the
real files and commands; the tests hand it recorded outputs. Every "ok" names the evidence it
read, and a check whose evidence is missing does not say ok.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm.jetson import device, memory, power, stack

FASTEST = ("MAXN_SUPER", "MAXN")  # the uncapped modes, by name (ids differ per module)

# The GPU's device nodes, which the NVIDIA container runtime maps into a container (--runtime
# nvidia; on Jetson its CSV mode, from the l4t lists under /etc/nvidia-container-runtime/
# host-files-for-container.d/). Orin's nvgpu driver (JetPack 6.x, and 7.2 on Orin): /dev/nvmap
# for memory and the GPU's control node, /dev/nvgpu/igpu0/ctrl (older releases' name:
# /dev/nvhost-ctrl-gpu). The OpenRM driver of newer modules: /dev/nvidiactl and /dev/nvidia0.
GPU_NODES = ("/dev/nvmap", "/dev/nvgpu/igpu0/ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvidiactl", "/dev/nvidia0")


def gpu_nodes_mapped(present: set[str]) -> bool:
    """The nodes CUDA opens on this GPU are all there (either driver's set)."""
    nvgpu = "/dev/nvmap" in present and bool({"/dev/nvgpu/igpu0/ctrl", "/dev/nvhost-ctrl-gpu"} & present)
    openrm = {"/dev/nvidiactl", "/dev/nvidia0"} <= present
    return nvgpu or openrm


@dataclass
class Probe:
    """What the doctor looks at. Every field is the raw text a file or command gave (None where
    it was absent), so a recording replays exactly."""
    nv_tegra_release: str | None = None
    compatible: bytes | None = None          # /proc/device-tree/compatible
    in_container: bool = False
    docker_info: str | None = None           # `docker info` (None: no docker CLI)
    compose_version: str | None = None       # `docker compose version` (None: no v2 plugin)
    tensorrt: str | None = None              # tensorrt.__version__, or "error: ..." if the import failed
    cuda_check: str | None = None            # "ok", or "error <n>: <name>" from cudaFree(0)
    cuda_devices: int | None = None          # cudaGetDeviceCount() (None: not asked, no cuda-python)
    device_nodes: tuple[str, ...] = ()       # which of GPU_NODES exist
    meminfo: str = ""
    nvpmodel_q: str | None = None            # `nvpmodel -q`
    nvpmodel_conf: str | None = None         # /etc/nvpmodel.conf
    euid: int = 0
    engines: dict | None = None              # the engines' manifest.json for this model, if built
    jetpack_override: str | None = None      # EDGEVLM_JETPACK (device.py's override)

    @classmethod
    def read(cls, engines_dir: Path | None = None) -> Probe:
        def run(argv):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                return r.stdout if r.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired):
                return None

        def read(path, binary=False):
            try:
                return Path(path).read_bytes() if binary else Path(path).read_text()
            except OSError:
                return None
        p = cls(nv_tegra_release=read("/etc/nv_tegra_release"), compatible=read("/proc/device-tree/compatible", True),
                in_container=Path("/.dockerenv").exists(), meminfo=read("/proc/meminfo") or "",
                device_nodes=tuple(n for n in GPU_NODES if Path(n).exists()),
                euid=os.geteuid(), nvpmodel_conf=read("/etc/nvpmodel.conf"),
                jetpack_override=os.environ.get("EDGEVLM_JETPACK"))
        if shutil.which("docker"):
            p.docker_info = run(["docker", "info"])
            p.compose_version = run(["docker", "compose", "version"])
        p.nvpmodel_q = run(["nvpmodel", "-q"]) if shutil.which("nvpmodel") else None
        try:
            import tensorrt
            p.tensorrt = tensorrt.__version__
        except Exception as e:  # ImportError, or a library that fails to load
            p.tensorrt = f"error: {type(e).__name__}: {e}"
        rt = device.cudart()
        if rt is None:
            p.cuda_check = "error: no cuda-python"
        else:
            err = rt.cudaFree(0)[0]
            p.cuda_check = "ok" if int(err) == 0 else f"error {int(err)}: {rt.cudaGetErrorName(err)[1].decode()}"
            err, count = rt.cudaGetDeviceCount()
            p.cuda_devices = int(count) if int(err) == 0 else 0
        if engines_dir and (engines_dir / "manifest.json").is_file():
            p.engines = json.loads((engines_dir / "manifest.json").read_text())
        return p


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # worth fixing, does not stop a build or a server

    def line(self) -> str:
        mark = "ok  " if self.ok else ("warn" if self.warn else "FAIL")
        return f"{mark} {self.name}: {self.detail}" + (f"\n     fix: {self.fix}" if self.fix and not self.ok else "")


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok or c.warn for c in self.checks)


def diagnose(p: Probe, preset: str = "mobilevlm-v2-1.7b", precision: str = "fp16") -> Report:
    r = Report()
    add = r.checks.append
    l4t = device.parse_nv_tegra_release(p.nv_tegra_release or "")
    jetpack = p.jetpack_override or device.jetpack_for(l4t)
    source = "EDGEVLM_JETPACK" if p.jetpack_override else f"/etc/nv_tegra_release: L4T {l4t}"
    try:
        s = stack.stack_for(jetpack)
        add(Check("JetPack", True, f"{s.jetpack} ({source}): TensorRT {s.tensorrt}, CUDA {s.cuda}; image "
                                   f"{s.triton_image or 'none verified'}, {s.cuda_python}"))
    except stack.StackError as e:
        s = None
        fix = ("mount it: `-v /etc/nv_tegra_release:/etc/nv_tegra_release:ro` (jetson/compose.yaml does)"
               if p.in_container and not l4t else "flash JetPack 6.1 or newer (SDK Manager or the SD-card image)")
        add(Check("JetPack", False, str(e), fix))
    if p.in_container:
        add(_container_gpu(p))
    elif p.docker_info is None:
        add(Check("container runtime", False, "no docker CLI answering (`docker info` failed)",
                  "install Docker (JetPack's `nvidia-container` package) and add yourself to the docker group", warn=True))
    elif "nvidia" not in _runtimes(p.docker_info):
        add(Check("container runtime", False, "Docker has no `nvidia` runtime",
                  "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"))
    elif p.compose_version is None:
        add(Check("container runtime", False, "Docker has the nvidia runtime but no `docker compose` (v2 plugin)",
                  "sudo apt-get install docker-compose-plugin (Docker's apt repository), then `docker compose version`"))
    else:
        add(Check("container runtime", True, "`docker info` lists the nvidia runtime; "
                                             f"{p.compose_version.strip().splitlines()[0]}"))
    version = p.tensorrt or "error: not imported"
    if version.startswith("error"):
        add(Check("import tensorrt", False, version, "in the device venv: `make setup` (it sees JetPack's system "
                                                 "tensorrt); in a container: the igpu Triton image has it"))
    else:
        want = s.tensorrt if s else None
        built = (p.engines or {}).get("device_tag", "").split("-sm")[0] or None
        if want and not version.startswith(want + "."):
            add(Check("import tensorrt", False, f"{version}, but JetPack {s.jetpack} pairs with {want}",
                      "use the TRITON_IMAGE `make jetson-doctor` names for this JetPack"))
        elif built and built != version:
            add(Check("import tensorrt", False, f"{version}, but the engines were built with {built}",
                      "rebuild them here: `make engines` (or `docker compose run --rm engines`)"))
        else:
            add(Check("import tensorrt", True, f"imported {version}" + (" (engines built with it)" if built
                                                                       else " (no engines yet)")))
    cuda = p.cuda_check or "error: not checked"
    if cuda == "ok" and p.cuda_devices == 0:
        add(Check("cuda-python", False, "cudaFree(0) answered, but cudaGetDeviceCount() found no GPU",
                  "run where the GPU is visible: on the host, or in a container started with the NVIDIA runtime"))
    elif cuda == "ok":
        devices = "" if p.cuda_devices is None else f", cudaGetDeviceCount() {p.cuda_devices}"
        add(Check("cuda-python", True, f"cudaFree(0) round trip ok{devices}"))
    else:
        fix = f"pip install '{s.cuda_python}' (the cuda-python of JetPack {s.jetpack}'s CUDA)" if s else \
            "install the cuda-python of this JetPack's CUDA"
        add(Check("cuda-python", False, cuda, fix))
    total, free = device.total_memory_gib(p.meminfo), device.available_memory_gib(p.meminfo)
    if total:
        n = memory.need(preset, precision, total_gib=total)
        detail = (f"{free:.1f} of {total:.1f} GiB free; {preset} {precision} needs about {n.build_gib:.1f} GiB "
                  f"to build, {n.serve_gib:.1f} to serve (estimate)")
        short = max(n.build_gib, n.serve_gib) > (free or total)
        smallest = memory.smallest_module(preset, precision)
        add(Check("memory", not short, f"/proc/meminfo: {detail}",
                  f"stop other services, or a lighter precision (int4), MAX_CONTEXT=1024, fewer sequences; "
                  f"smallest module for this: {smallest or 'none'}"))
    else:
        add(Check("memory", False, "cannot read /proc/meminfo", "run on the device", warn=True))
    if p.nvpmodel_q is None:
        add(Check("power mode", False, "no nvpmodel here (inside a container it is not mounted)",
                  "check and set it on the host: `make jetson-doctor` there", warn=True))
    else:
        mode = power.parse_nvpmodel_query(p.nvpmodel_q)
        modes = power.parse_nvpmodel_conf(p.nvpmodel_conf) if p.nvpmodel_conf else {}
        fastest = next((n for n in FASTEST if n in modes.values()), None)
        if fastest is None:
            add(Check("power mode", False, f"{mode.name} (`nvpmodel -q`), but /etc/nvpmodel.conf names no "
                                           f"{' or '.join(FASTEST)} mode to compare it with",
                      "read the module's modes with `nvpmodel -p --verbose` and pick its fastest", warn=True))
        elif mode.name != fastest:
            add(Check("power mode", False, f"{mode.name} (id {mode.id}); this module's fastest is {fastest}",
                      f"sudo nvpmodel -m {power.mode_id(fastest, modes)}   # {fastest}, by this module's own "
                      "mode list; some modes need a reboot", warn=True))
        else:
            add(Check("power mode", True, f"{mode.name} (`nvpmodel -q`), the fastest in /etc/nvpmodel.conf"))
    add(Check("root for jetson_clocks", p.euid == 0, "effective uid 0" if p.euid == 0 else f"uid {p.euid}",
              "run `make jetson-bench` with sudo so it can read and pin the clocks", warn=True))
    return r


def _container_gpu(p: Probe) -> Check:
    """Inside a container nothing says the NVIDIA runtime mapped the GPU in but the GPU's device
    nodes themselves (and CUDA seeing a device)."""
    present = set(p.device_nodes)
    fix = "start it with the NVIDIA runtime (compose: `runtime: nvidia`; docker run: `--runtime nvidia`)"
    if not gpu_nodes_mapped(present):
        missing = [n for n in ("/dev/nvmap", "/dev/nvgpu/igpu0/ctrl") if n not in present]
        return Check("container runtime", False, f"no GPU in this container: {', '.join(missing)} missing", fix)
    if p.cuda_devices == 0:
        return Check("container runtime", False, f"inside a container with {', '.join(sorted(present))}, but "
                     "CUDA sees no device", fix)
    seen = "" if p.cuda_devices is None else f"; CUDA sees {p.cuda_devices} device(s)"
    return Check("container runtime", True, f"inside a container; the NVIDIA runtime mapped {', '.join(sorted(present))}"
                 + seen)


def _runtimes(docker_info: str) -> str:
    line = next((ln for ln in docker_info.splitlines() if ln.strip().startswith("Runtimes:")), "")
    return line.split(":", 1)[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mobilevlm-v2-1.7b")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "int8", "int4"))
    ap.add_argument("--engines", type=Path, help="an engine folder, to compare its TensorRT with this one")
    args = ap.parse_args(argv)
    report = diagnose(Probe.read(args.engines), args.preset, args.precision)
    for c in report.checks:
        print(c.line(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
