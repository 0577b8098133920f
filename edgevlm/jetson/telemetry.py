"""tegrastats: power rails, GPU load and memory, sampled while something runs; energy in
joules by integrating the board's input power over the run."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

# Rails that measure the whole module input, by module family; the AGX Orin has no VDD_IN,
# so its rails are summed (which leaves out some of the board).
INPUT_RAILS = ("VDD_IN",)
AGX_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")


@dataclass
class Sample:
    t: float = 0.0                                       # seconds (monotonic) when read
    ram_used_mb: int = 0
    ram_total_mb: int = 0
    gpu_load_pct: float | None = None
    rails_mw: dict[str, int] = field(default_factory=dict)   # instantaneous
    temps_c: dict[str, float] = field(default_factory=dict)

    @property
    def power_mw(self) -> int:
        """Module input power: VDD_IN where the module reports it, else the sum of the AGX rails."""
        for rail in INPUT_RAILS:
            if rail in self.rails_mw:
                return self.rails_mw[rail]
        return sum(self.rails_mw.get(r, 0) for r in AGX_RAILS)


_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?[\d.]+)C(?:/-?[\d.]+C)?")
_GPU = re.compile(r"GR3D_FREQ\s+(\d+)%")
_RAM = re.compile(r"RAM\s+(\d+)/(\d+)MB")
_CPU = re.compile(r"CPU \[[^\]]*\]")


def parse_line(line: str, t: float = 0.0) -> Sample:
    """One tegrastats line, any JetPack 4-7 layout (see the recorded samples in the tests)."""
    s = Sample(t=t)
    m = _RAM.search(line)
    if not m:
        raise ValueError(f"not a tegrastats line: {line[:120]!r}")
    s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    m = _GPU.search(line)
    s.gpu_load_pct = float(m.group(1)) if m else None
    rest = _CPU.sub("", line)
    for name, value in _TEMP.findall(rest):
        if float(value) > -256:  # -256C: sensor off
            s.temps_c[name.lower()] = float(value)
    for name, inst, _avg, _max in _RAIL.findall(rest):
        if name in ("RAM", "SWAP", "EMC_FREQ", "GR3D_FREQ", "NC", "MTS"):
            continue
        s.rails_mw[name] = int(inst)
    return s


@dataclass
class Recording:
    samples: list[Sample] = field(default_factory=list)

    def energy_j(self) -> float:
        """Trapezoidal integral of module input power over the samples."""
        pts = [(s.t, s.power_mw / 1e3) for s in self.samples]
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))

    def seconds(self) -> float:
        return self.samples[-1].t - self.samples[0].t if len(self.samples) > 1 else 0.0

    def summary(self) -> dict:
        if not self.samples:
            return {}
        gpu = [s.gpu_load_pct for s in self.samples if s.gpu_load_pct is not None]
        return {"samples": len(self.samples), "seconds": round(self.seconds(), 3),
                "energy_j": round(self.energy_j(), 3),
                "mean_power_w": round(self.energy_j() / self.seconds(), 3) if self.seconds() else None,
                "peak_ram_used_mb": max(s.ram_used_mb for s in self.samples),
                "mean_gpu_load_pct": round(sum(gpu) / len(gpu), 1) if gpu else None}


class Tegrastats:
    """`with Tegrastats(interval_ms=100) as rec: ...` -> rec.samples while the block ran."""

    def __init__(self, interval_ms: int = 100, command: str = "tegrastats"):
        self.interval_ms, self.command = interval_ms, command
        self.recording = Recording()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Recording:
        try:
            self._proc = subprocess.Popen([self.command, "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            raise RuntimeError(f"{self.command} not found: not a Jetson?") from None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self.recording

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.recording.samples.append(parse_line(line, time.monotonic()))
            except ValueError:
                continue

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._thread.join(5)
