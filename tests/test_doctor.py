"""make jetson-doctor on recorded device outputs. The L4T release files, device-tree strings,
nvpmodel output and mode tables are the public captures in shared/reference/jetson-samples.md;
`docker info` / `docker compose version` lines, /proc/meminfo figures and the cuda-python
result are written here in those commands' formats for each case (no capture of them was
available)."""

from __future__ import annotations

from edgevlm.jetson import power
from edgevlm.jetson.doctor import Probe, diagnose

R36_4_3 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8 01:49:37 UTC 2025\n"
R39_2_1 = ("# R39 (release), REVISION: 2.1, GCID: 46758480, BOARD: generic, EABI: aarch64, DATE: Fri Aug  7 05:54:22 AM "
           "UTC 2026\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")
DOCKER_NVIDIA = "Client: Docker Engine - Community\n Runtimes: io.containerd.runc.v2 nvidia runc\n Default Runtime: runc\n"
DOCKER_PLAIN = "Client: Docker Engine - Community\n Runtimes: io.containerd.runc.v2 runc\n Default Runtime: runc\n"


def conf(part: str) -> str:
    """/etc/nvpmodel.conf's POWER_MODEL lines for a module (its ids and names, per the samples)."""
    return "".join(f"< POWER_MODEL ID={i} NAME={n} >\n" for i, n in power.MODES[part].items())


def meminfo(total_kb: int, available_kb: int) -> str:
    return f"MemTotal:       {total_kb} kB\nMemFree:        1000 kB\nMemAvailable:   {available_kb} kB\n"


def lines(report):
    return {c.name: c for c in report.checks}


def test_agx_orin_64gb_jetpack_6_2_is_ready_but_not_in_its_fastest_mode():
    p = Probe(nv_tegra_release=R36_4_3, compatible=b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0",
              docker_info=DOCKER_NVIDIA, compose_version="Docker Compose version v2.27.1\n", tensorrt="10.3.0.30",
              cuda_check="ok", meminfo=meminfo(64_302_080, 60_000_000), nvpmodel_q="NV Power Mode: MODE_30W\n2\n",
              nvpmodel_conf=conf("p3701-0005"), euid=0, engines={"device_tag": "10.3.0.30-sm87"})
    r = diagnose(p, "mobilevlm-v2-1.7b", "fp16")
    c = lines(r)
    assert [x.name for x in r.checks] == ["JetPack", "container runtime", "import tensorrt", "cuda-python", "memory",
                                          "power mode", "root for jetson_clocks"]
    assert c["JetPack"].ok and "24.08-py3-igpu" in c["JetPack"].detail and "cuda-python==12.6.*" in c["JetPack"].detail
    assert all(c[n].ok for n in ("container runtime", "import tensorrt", "cuda-python", "memory"))
    assert not c["power mode"].ok and c["power mode"].warn and "sudo nvpmodel -m 0" in c["power mode"].fix
    assert r.ok  # a warning does not stop it


def test_orin_nano_super_jetpack_6_2_names_maxn_super_by_its_own_id_and_the_missing_runtime():
    p = Probe(nv_tegra_release=R36_4_3, compatible=b"nvidia,p3768-0000+p3767-0005-super\0nvidia,tegra234\0",
              docker_info=DOCKER_PLAIN, compose_version=None, tensorrt="10.3.0.30", cuda_check="ok",
              meminfo=meminfo(7_790_000, 5_600_000), nvpmodel_q="NV Power Mode: 25W\n1\n",
              nvpmodel_conf=conf("p3767-0005-super"), euid=1000)
    c = lines(diagnose(p, "mobilevlm-v2-1.7b", "fp16"))
    assert "nvidia-ctk runtime configure --runtime=docker" in c["container runtime"].fix
    # mode 0 is 15W on this module: the fastest is MAXN_SUPER, id 2
    assert "sudo nvpmodel -m 2" in c["power mode"].fix and "MAXN_SUPER" in c["power mode"].fix
    assert not c["memory"].ok and "orin-nx-16gb" in c["memory"].fix  # FP16 1.7B does not fit 8 GB
    assert lines(diagnose(p, "mobilevlm-v2-1.7b", "int4"))["memory"].ok
    assert not c["root for jetson_clocks"].ok and c["root for jetson_clocks"].warn


def test_agx_orin_jetpack_7_2_with_a_too_new_cuda_python():
    p = Probe(nv_tegra_release=R39_2_1, docker_info=DOCKER_NVIDIA, compose_version="Docker Compose version v2.29.0",
              tensorrt="10.16.2.10", cuda_check="error 35: cudaErrorInsufficientDriver",
              meminfo=meminfo(64_302_080, 61_000_000), nvpmodel_q="NV Power Mode: MAXN\n0\n",
              nvpmodel_conf=conf("p3701-0005"), euid=0)
    r = diagnose(p, "mobilevlm-v2-1.7b", "int4")
    c = lines(r)
    assert c["JetPack"].ok and "TensorRT 10.16" in c["JetPack"].detail and "none verified" in c["JetPack"].detail
    assert c["import tensorrt"].ok
    assert not c["cuda-python"].ok and "cuda-python==13.2.*" in c["cuda-python"].fix
    assert c["power mode"].ok and not r.ok


ORIN_NODES = ("/dev/nvmap", "/dev/nvgpu/igpu0/ctrl")  # what the NVIDIA runtime maps on an Orin


def test_in_a_container_without_the_release_file_it_says_to_mount_it():
    p = Probe(in_container=True, tensorrt="10.3.0.30", cuda_check="ok", cuda_devices=1, device_nodes=ORIN_NODES,
              meminfo=meminfo(16_000_000, 12_000_000), euid=0)
    c = lines(diagnose(p))
    assert not c["JetPack"].ok and "/etc/nv_tegra_release:/etc/nv_tegra_release:ro" in c["JetPack"].fix
    assert c["container runtime"].ok and c["power mode"].warn
    # the evidence is named
    assert "/dev/nvgpu/igpu0/ctrl" in c["container runtime"].detail and "1 device" in c["container runtime"].detail


READY = dict(nv_tegra_release=R36_4_3, docker_info=DOCKER_NVIDIA, compose_version="Docker Compose version v2.27.1\n",
             tensorrt="10.3.0.30", cuda_check="ok", cuda_devices=1, meminfo=meminfo(64_302_080, 60_000_000),
             nvpmodel_q="NV Power Mode: MAXN\n0\n", nvpmodel_conf=conf("p3701-0005"), euid=0)


def test_a_ready_board_says_ok_to_every_check_with_its_evidence():
    c = lines(diagnose(Probe(**READY)))
    assert all(x.ok for x in c.values()), [x.line() for x in c.values() if not x.ok]
    evidence = {"JetPack": "/etc/nv_tegra_release", "container runtime": "docker info", "import tensorrt": "imported",
                "cuda-python": "cudaGetDeviceCount", "memory": "/proc/meminfo", "power mode": "nvpmodel",
                "root for jetson_clocks": "uid 0"}
    for name, what in evidence.items():
        assert what in c[name].detail, (name, c[name].detail)


BROKEN = {  # check -> the evidence absent or wrong (over READY), and what it must say
    "JetPack": [(dict(nv_tegra_release=None), "flash JetPack"),
                (dict(nv_tegra_release="# R35 (release), REVISION: 4.1, GCID: 1, BOARD: t186ref, EABI: aarch64, "
                                       "DATE: x\n"), "JetPack 5")],
    "container runtime": [(dict(in_container=True, device_nodes=()), "--runtime nvidia"),
                          (dict(in_container=True, device_nodes=("/dev/nvmap",)), "/dev/nvgpu/igpu0/ctrl"),
                          (dict(in_container=True, device_nodes=ORIN_NODES, cuda_devices=0), "CUDA sees no device"),
                          (dict(docker_info=None), "install Docker"),
                          (dict(docker_info=DOCKER_PLAIN), "nvidia-ctk runtime configure"),
                          (dict(compose_version=None), "docker-compose-plugin")],
    "import tensorrt": [(dict(tensorrt="error: ModuleNotFoundError: No module named 'tensorrt'"), "make setup"),
                        (dict(tensorrt="10.16.2.10"), "TRITON_IMAGE"),
                        (dict(engines={"device_tag": "10.3.0.20-sm87"}), "rebuild them here")],
    "cuda-python": [(dict(cuda_check="error 35: cudaErrorInsufficientDriver"), "cuda-python==12.6"),
                    (dict(cuda_check="error: no cuda-python"), "cuda-python==12.6"),
                    (dict(cuda_devices=0), "GPU is visible")],
    "memory": [(dict(meminfo=meminfo(7_790_000, 5_600_000)), "smallest module"),
               (dict(meminfo=""), "run on the device")],
    "power mode": [(dict(nvpmodel_q=None), "on the host"),
                   (dict(nvpmodel_q="NV Power Mode: MODE_30W\n2\n"), "nvpmodel -m 0"),
                   (dict(nvpmodel_conf=None), "nvpmodel -p --verbose")],
    "root for jetson_clocks": [(dict(euid=1000), "with sudo")],
}


def test_each_check_says_not_ok_when_its_evidence_is_absent_or_wrong():
    for name, cases in BROKEN.items():
        for change, says in cases:
            check = lines(diagnose(Probe(**{**READY, **change})))[name]
            assert not check.ok, (name, change, check.line())
            assert says in check.line(), (name, change, check.line())


def test_jetpack_5_is_refused_with_the_reason():
    p = Probe(nv_tegra_release="# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
                               "DATE: Tue Aug  1 19:57:35 UTC 2023\n", tensorrt="8.5.2.2", cuda_check="ok",
              meminfo=meminfo(16_000_000, 12_000_000))
    c = lines(diagnose(p))
    assert not c["JetPack"].ok and "LayerNormalization" in c["JetPack"].detail


def test_here_a_container_without_a_gpu_fails_the_runtime_check_with_its_reason():
    """The doctor run for real where these tests run: a container with no GPU must not say ok."""
    import subprocess
    import sys

    import pytest

    from edgevlm.jetson.doctor import gpu_nodes_mapped
    p = Probe.read()
    if not p.in_container or gpu_nodes_mapped(set(p.device_nodes)):
        pytest.skip("not a container without a GPU")
    r = subprocess.run([sys.executable, "-m", "edgevlm.jetson.doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "FAIL container runtime: no GPU in this container: /dev/nvmap" in r.stdout
    assert "--runtime nvidia" in r.stdout


def test_the_orin_memory_table_is_what_the_estimate_says():
    """docs/ORIN.md's smallest-module table, row by row, from edgevlm/jetson/memory.py."""
    from pathlib import Path

    from edgevlm.jetson import memory
    names = {"orin-nano-8gb": "Orin Nano 8GB", "orin-nx-16gb": "Orin NX 16GB", "agx-orin-32gb": "AGX Orin 32GB",
             "agx-orin-64gb": "AGX Orin 64GB", None: "none"}
    text = (Path(__file__).resolve().parents[1] / "docs" / "ORIN.md").read_text()
    rows = [line.strip("|").split("|") for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 5 and "preset" not in line and "---" not in line]
    table = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}
    assert {"llama-3.2-11b-vision", "mobilevlm-v2-7b", "llava-v1.6-34b"} <= set(table)
    for preset, cells in table.items():
        assert cells == [names[memory.smallest_module(preset, p)] for p in ("fp16", "int8", "int4")], preset
