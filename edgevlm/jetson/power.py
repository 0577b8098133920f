"""Power modes by name: `nvpmodel` query / set / verify, and `jetson_clocks`.

Mode ids differ per module (and per "Super" configuration), so callers name the mode
("MAXN", "MODE_30W", "25W") and the id comes from the device's own mode list.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

# part number (+ "-super") -> {id: name}, from NVIDIA's nvpmodel_*.conf files
MODES = {
    "p3701-0000": {0: "MAXN", 1: "MODE_15W", 2: "MODE_30W", 3: "MODE_50W"},
    "p3701-0005": {0: "MAXN", 1: "MODE_15W", 2: "MODE_30W", 3: "MODE_50W"},
    "p3701-0004": {0: "MAXN", 1: "MODE_15W", 2: "MODE_30W", 3: "MODE_40W"},
    "p3767-0000": {0: "MAXN", 1: "10W", 2: "15W", 3: "25W"},
    "p3767-0000-super": {0: "MAXN_SUPER", 1: "10W", 2: "15W", 3: "25W", 4: "40W"},
    "p3767-0001": {0: "MAXN", 1: "10W", 2: "15W", 3: "20W"},
    "p3767-0001-super": {0: "MAXN_SUPER", 1: "10W", 2: "15W", 3: "20W", 4: "40W"},
    "p3767-0003": {0: "15W", 1: "7W"},
    "p3767-0003-super": {0: "15W", 1: "25W", 2: "MAXN_SUPER"},
    "p3767-0004": {0: "10W", 1: "7W_AI", 2: "7W_CPU"},
    "p3767-0004-super": {0: "10W", 1: "25W", 2: "MAXN_SUPER"},
    "p3767-0005": {0: "15W", 1: "7W"},
    "p3767-0005-super": {0: "15W", 1: "25W", 2: "MAXN_SUPER"},
}


class PowerError(RuntimeError):
    pass


@dataclass(frozen=True)
class PowerMode:
    name: str
    id: int


def parse_nvpmodel_query(text: str) -> PowerMode:
    """`nvpmodel -q [--verbose]` -> the current mode (warning and VERB lines tolerated)."""
    m = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", text)
    if not m:
        raise PowerError(f"cannot read the power mode from nvpmodel output: {text.strip()[:200]!r}")
    return PowerMode(m.group(1), int(m.group(2)))


def parse_nvpmodel_conf(text: str) -> dict[int, str]:
    """/etc/nvpmodel.conf -> {id: name} of its POWER_MODEL blocks (the device's own list)."""
    return {int(i): n for i, n in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>", text)}


def mode_id(name: str, modes: dict[int, str]) -> int:
    for i, n in modes.items():
        if n.upper() == name.upper():
            return i
    raise PowerError(f"no power mode {name!r} on this module; it has {', '.join(modes.values())}")


def _run(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise PowerError(f"{argv[0]} not found: not a Jetson?") from None
    if r.returncode != 0:
        raise PowerError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:300]}")
    return r.stdout


def query() -> PowerMode:
    return parse_nvpmodel_query(_run(["nvpmodel", "-q"]))


def device_modes(conf: str = "/etc/nvpmodel.conf") -> dict[int, str]:
    try:
        with open(conf) as f:
            return parse_nvpmodel_conf(f.read())
    except OSError as e:
        raise PowerError(f"cannot read {conf}: {e.strerror}") from None


def set_mode(name: str) -> PowerMode:
    """Switch by name and verify (needs root). Some switches ask for a reboot: then the
    verify fails with the mode still pending, which is said."""
    target = mode_id(name, device_modes())
    _run(["nvpmodel", "-m", str(target)])
    now = query()
    if now.id != target:
        raise PowerError(f"asked for {name} (id {target}) but nvpmodel reports {now.name} (id {now.id}); "
                         "some mode changes take effect only after a reboot")
    return now


@dataclass
class Clocks:
    machine: str = ""
    power_mode: str = ""
    cpu_max_khz: dict[str, int] = field(default_factory=dict)
    cpu_current_khz: dict[str, int] = field(default_factory=dict)
    gpu_hz: dict[str, int] = field(default_factory=dict)   # MinFreq, MaxFreq, CurrentFreq
    emc_hz: dict[str, int] = field(default_factory=dict)

    @property
    def locked(self) -> bool:
        """jetson_clocks pins minimum to maximum for the GPU and memory clocks."""
        return (bool(self.gpu_hz) and self.gpu_hz.get("MinFreq") == self.gpu_hz.get("MaxFreq")
                and self.emc_hz.get("MinFreq") == self.emc_hz.get("MaxFreq"))


def parse_jetson_clocks(text: str) -> Clocks:
    """`jetson_clocks --show` (JetPack 5, 6 and 7 layouts)."""
    c = Clocks()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("SOC family:"):
            c.machine = line.split("Machine:", 1)[-1].strip()
        elif line.startswith("NV Power Mode:"):
            c.power_mode = line.split(":", 1)[1].strip()
        elif re.match(r"cpu\d+:", line):
            cpu = line.split(":", 1)[0]
            f = dict(re.findall(r"(\w+Freq)=(\d+)", line))
            if "MaxFreq" in f:
                c.cpu_max_khz[cpu] = int(f["MaxFreq"])
                c.cpu_current_khz[cpu] = int(f.get("CurrentFreq", 0))
        elif line.startswith("GPU "):
            c.gpu_hz = {k: int(v) for k, v in re.findall(r"(\w+Freq)=(\d+)", line)}
        elif line.startswith("EMC "):
            c.emc_hz = {k: int(v) for k, v in re.findall(r"(\w+Freq)=(\d+)", line)}
    return c


def jetson_clocks(lock: bool = True) -> Clocks:
    """Pin clocks to their maximum (`jetson_clocks`) for repeatable benchmarks; report them."""
    if lock:
        _run(["jetson_clocks"])
    return parse_jetson_clocks(_run(["jetson_clocks", "--show"]))


def main(argv=None) -> int:
    """`python3 -m edgevlm.jetson.power [--set NAME]`: show the power mode, or switch to one by
    its name (MAXN, MAXN_SUPER, 25W, ...; the id differs per module, so never by number)."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--set", metavar="NAME", help="switch to this mode (root; some switches need a reboot)")
    args = ap.parse_args(argv)
    try:
        mode = set_mode(args.set) if args.set else query()
        modes = device_modes()
    except PowerError as e:
        print(f"power: {e}", file=sys.stderr)
        return 2
    print(f"power mode: {mode.name} (id {mode.id}); this module has {', '.join(modes.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
