"""What device this is: L4T / JetPack, TensorRT, CUDA, module, compute capability.

Each fact has an environment override (EDGEVLM_L4T, EDGEVLM_JETPACK, EDGEVLM_TRT_VERSION,
EDGEVLM_CUDA, EDGEVLM_MODULE, EDGEVLM_SM) for tests and cross-checks; a fact that cannot be
found is None, and `require()` names the ones a caller needs but does not have.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

# L4T release -> JetPack (NVIDIA's release pairs; the newest known patch of each line last)
JETPACK = {
    "35.1": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.2": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
    "36.4.7": "6.2.1", "36.5.0": "6.2.2", "39.2.1": "7.2.1",
}
# module part number (device-tree compatible) -> name
MODULES = {
    "p3701-0000": "Jetson AGX Orin", "p3701-0004": "Jetson AGX Orin 32GB", "p3701-0005": "Jetson AGX Orin 64GB",
    "p3767-0000": "Jetson Orin NX 16GB", "p3767-0001": "Jetson Orin NX 8GB", "p3767-0003": "Jetson Orin Nano 8GB",
    "p3767-0004": "Jetson Orin Nano 4GB", "p3767-0005": "Jetson Orin Nano 8GB (devkit)",
}
SOC_SM = {"tegra234": "87", "tegra264": "110"}  # Orin, Thor
OVERRIDES = {"l4t": "EDGEVLM_L4T", "jetpack": "EDGEVLM_JETPACK", "tensorrt": "EDGEVLM_TRT_VERSION",
             "cuda": "EDGEVLM_CUDA", "module": "EDGEVLM_MODULE", "sm": "EDGEVLM_SM"}


class DeviceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Device:
    l4t: str | None = None          # "36.4.3"
    jetpack: str | None = None      # "6.2"
    tensorrt: str | None = None     # "10.3.0.30"
    cuda: str | None = None         # "12.6"
    module: str | None = None       # "Jetson AGX Orin 64GB"
    part: str | None = None         # "p3701-0005"
    sm: str | None = None           # "87"
    super_mode: bool = False        # a "-super" device tree (JetPack 6.2+ Super modes)

    @property
    def tag(self) -> str:
        """Engine folder name: `<TensorRT>-sm<cc>`."""
        return f"{self.tensorrt}-sm{self.sm}"

    def require(self, *facts: str) -> Device:
        missing = [f for f in facts if getattr(self, f) in (None, "")]
        if missing:
            raise DeviceError(f"cannot tell this device's {', '.join(missing)}: not a Jetson with TensorRT? "
                              f"({'/'.join(OVERRIDES[m] for m in missing)} override)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def parse_nv_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' -> '36.4.3' (first line; R35 and R36/R39 layouts)."""
    m = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text.strip())
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for(l4t: str | None) -> str | None:
    if not l4t:
        return None
    if l4t in JETPACK:
        return JETPACK[l4t]
    same_line = [k for k in JETPACK if k.rsplit(".", 1)[0] == l4t.rsplit(".", 1)[0]]
    return JETPACK[max(same_line, key=lambda k: [int(x) for x in k.split(".")])] if same_line else None


def parse_compatible(raw: bytes) -> tuple[str | None, str | None, bool]:
    """/proc/device-tree/compatible -> (part number, SoC, super)."""
    entries = [e.decode(errors="replace") for e in raw.split(b"\0") if e]
    part = soc = None
    for e in entries:
        m = re.search(r"(p37\d\d-\d{4})(-super)?$", e.split("+")[-1])
        if m and part is None:
            part = m.group(1)
        if e.startswith("nvidia,tegra"):
            soc = e.split(",", 1)[1]
    return part, soc, any(e.endswith("-super") for e in entries)


def _read(path: str, binary: bool = False):
    try:
        return Path(path).read_bytes() if binary else Path(path).read_text()
    except OSError:
        return None


def _tensorrt_version() -> str | None:
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import tensorrt
        return tensorrt.__version__
    except ImportError:
        return None


def _cuda_version() -> str | None:
    text = _read("/usr/local/cuda/version.json")
    if text:
        try:
            return json.loads(text)["cuda"]["version"].rsplit(".", 1)[0]
        except (KeyError, ValueError):
            pass
    text = _read("/usr/local/cuda/version.txt")  # CUDA 10/11 layout
    m = re.search(r"(\d+\.\d+)", text or "")
    return m.group(1) if m else None


def total_memory_gib(meminfo: str | None = None) -> float | None:
    """MemTotal of /proc/meminfo in GiB (CPU and GPU share it on an Orin)."""
    m = re.search(r"^MemTotal:\s+(\d+) kB", meminfo if meminfo is not None else _read("/proc/meminfo") or "", re.M)
    return int(m.group(1)) / (1 << 20) if m else None


def available_memory_gib(meminfo: str | None = None) -> float | None:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo if meminfo is not None else _read("/proc/meminfo") or "", re.M)
    return int(m.group(1)) / (1 << 20) if m else None


def cudart():
    """cuda-python's runtime module under either of its names (cuda.bindings.runtime from 12.x
    on; cuda.cudart before it, and removed in 13.x); None without cuda-python."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime
        return runtime
    except ImportError:
        return None


def cuda_compute_capability() -> str | None:
    """"87" from the GPU itself: inside a container, where neither /etc/nv_tegra_release nor
    the device tree may be visible, the CUDA device is (the NVIDIA runtime maps it in)."""
    rt = cudart()
    if rt is None:
        return None
    attr = rt.cudaDeviceAttr
    err, major = rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0)
    err2, minor = rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0)
    return None if int(err) or int(err2) else f"{major}{minor}"


def detect(root: str = "/") -> Device:
    """This machine's facts (None where absent), with EDGEVLM_* overrides applied.

    Compute capability, in order: EDGEVLM_SM, the device tree's SoC, the CUDA device."""
    env = os.environ.get
    l4t = env("EDGEVLM_L4T") or parse_nv_tegra_release(_read(os.path.join(root, "etc/nv_tegra_release")) or "")
    part, soc, super_mode = parse_compatible(_read(os.path.join(root, "proc/device-tree/compatible"), True) or b"")
    model = (_read(os.path.join(root, "proc/device-tree/model"), True) or b"").rstrip(b"\0").decode(errors="replace")
    module = env("EDGEVLM_MODULE") or MODULES.get(part or "") or (model or None)
    return Device(l4t=l4t, jetpack=env("EDGEVLM_JETPACK") or jetpack_for(l4t),
                  tensorrt=env("EDGEVLM_TRT_VERSION") or _tensorrt_version(),
                  cuda=env("EDGEVLM_CUDA") or _cuda_version(), module=module, part=part,
                  sm=env("EDGEVLM_SM") or SOC_SM.get(soc or "") or cuda_compute_capability(),
                  super_mode=super_mode)
