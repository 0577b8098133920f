"""The Jetson kit off-device: parsers on recorded tegrastats / nvpmodel / jetson_clocks /
nv_tegra_release output, device facts with overrides, the roofline."""

from __future__ import annotations

import pytest

from edgevlm.jetson import device, power, telemetry
from edgevlm.jetson.roofline import roofline

# Recorded output (see the project's Jetson sample notes for provenance).
TEGRASTATS = {
    "agx-orin-64gb-jp5": "04-24-2023 00:01:24 RAM 1282/62795MB (lfb 15152x4MB) SWAP 0/31398MB (cached 0MB) CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@0 GR3D2_FREQ 0%@0 VIC_FREQ 729 APE 174 CV0@-256C CPU@42.593C Tboard@32C SOC2@39.343C Tdiode@33.25C SOC0@39.375C CV1@-256C GPU@-256C tj@42.593C SOC1@40.468C CV2@-256C VDD_GPU_SOC 2399mW/2399mW VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 4032mW/4032mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW",  # noqa: E501
    "agx-orin-64gb-load": "11-21-2025 08:49:48 RAM 13983/62780MB (lfb 424x4MB) SWAP 126/31390MB (cached 0MB) CPU [90%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201] EMC_FREQ 1%@2133 GR3D_FREQ 14%@[407,407] VIC_FREQ 115 NVDLA0_FREQ @1600 APE 174 CV0@73.625C CPU@77.281C Tboard@62C SOC2@70C Tdiode@62.25C SOC0@69.531C CV1@72.5C GPU@69.125C tj@77.281C SOC1@68.968C CV2@67.25C VDD_GPU_SOC 3150mW/2971mW VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW VDDQ_VDD2_1V8AO 1091mW/1091mW",  # noqa: E501
    "orin-nx-jp6": "05-15-2025 18:30:28 RAM 6982/7620MB (lfb 5x1MB) SWAP 2640/16384MB (cached 202MB) CPU [97%@1984,95%@1984,95%@1984,91%@1984,88%@1984,93%@247] EMC_FREQ 18%@3199 GR3D_FREQ 84%@[713] NVENC 1%@115 NVDEC 40%@115 NVJPG off NVJPG1 off VIC 31%@115 OFA off NVDLA0 off PVA0_FREQ off APE 174 cv0@63.031C cpu@65.562C soc2@64.156C soc0@63.031C cv1@62.937C gpu@63.5C tj@65.562C soc1@64.718C cv2@60.875C VDD_IN 17946mW/15710mW VDD_CPU_GPU_CV 8896mW/7585mW VDD_SOC 3923mW/3515mW",  # noqa: E501
    "orin-nano-bare-gr3d": "06-18-2025 11:25:24 RAM 3452/7620MB (lfb 25x4MB) SWAP 1518/16384MB (cached 174MB) CPU [1%@1420,2%@1420,0%@1420,2%@1420,2%@729,1%@729] GR3D_FREQ 0% cpu@50.031C soc2@49.031C soc0@50C gpu@49.031C tj@50.25C soc1@50.25C VDD_IN 4824mW/4824mW VDD_CPU_GPU_CV 518mW/518mW VDD_SOC 1475mW/1475mW",  # noqa: E501
    "orin-nano-super-jp7": "09-19-2026 13:33:03 RAM 2845/7486MB (lfb 33x4MB) CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 3%@665 GR3D_FREQ 0%@[305] NVDEC0 off NVJPG0 off NVJPG1 off VIC off OFA off APE 200 cpu@45.375C/45.812C soc2@44.687C/44.843C soc0@46.25C/46.25C gpu@46.562C/46.843C tj@46.562C/46.843C soc1@46.281C/46.281C VDD_IN 3462mW/3522mW/3582mW VDD_CPU_GPU_CV 442mW/483mW/523mW VDD_SOC 1127mW/1127mW/1127mW",  # noqa: E501
    "nano-jp4-no-unit": "RAM 3276/7859MB (lfb 5x4MB) SWAP 1626/12122MB (cached 181MB) CPU [44%@1421,49%@2031,67%@2034,17%@1420,25%@1419,8%@1420] EMC_FREQ 1%@1866 GR3D_FREQ 0%@114 APE 150 MTS fg 1% bg 1% PLL@42.5C MCPU@42.5C PMIC@50C Tboard@38C GPU@39.5C BCPU@42.5C thermal@41.3C Tdiode@39.25C VDD_SYS_GPU 182/182 VDD_SYS_SOC 730/730 VDD_4V0_WIFI 0/0 VDD_IN 5297/5297 VDD_SYS_CPU 1917/1917 VDD_SYS_DDR 1241/1241",  # noqa: E501
}
EXPECTED = {  # ram used, gpu %, module input mW, a temperature
    "agx-orin-64gb-jp5": (1282, 0, 2399 + 400 + 4032 + 301, ("tj", 42.593)),
    "agx-orin-64gb-load": (13983, 14, 3150 + 14312 + 4968 + 1091, ("gpu", 69.125)),
    "orin-nx-jp6": (6982, 84, 17946, ("gpu", 63.5)),
    "orin-nano-bare-gr3d": (3452, 0, 4824, ("cpu", 50.031)),
    "orin-nano-super-jp7": (2845, 0, 3462, ("tj", 46.562)),
    "nano-jp4-no-unit": (3276, 0, 5297, ("gpu", 39.5)),
}


@pytest.mark.parametrize("name", list(TEGRASTATS))
def test_tegrastats_lines_of_every_layout(name):
    s = telemetry.parse_line(TEGRASTATS[name])
    ram, gpu, mw, (sensor, temp) = EXPECTED[name]
    assert (s.ram_used_mb, s.gpu_load_pct, s.power_mw) == (ram, gpu, mw)
    assert s.temps_c[sensor] == temp
    assert "cv0" not in s.temps_c or s.temps_c["cv0"] > -256  # -256C: sensor off, dropped
    assert "NC" not in s.rails_mw and "EMC_FREQ" not in s.rails_mw


def test_energy_integrates_input_power_over_time():
    lines = [TEGRASTATS["orin-nx-jp6"], TEGRASTATS["orin-nx-jp6"].replace("VDD_IN 17946mW", "VDD_IN 12054mW")]
    rec = telemetry.Recording([telemetry.parse_line(lines[0], 10.0), telemetry.parse_line(lines[1], 10.5)])
    assert rec.energy_j() == pytest.approx(0.5 * (17.946 + 12.054) / 2)
    assert rec.summary()["peak_ram_used_mb"] == 6982 and rec.summary()["mean_gpu_load_pct"] == 84.0
    with pytest.raises(ValueError, match="not a tegrastats line"):
        telemetry.parse_line("garbage")


@pytest.mark.parametrize("text,mode", [
    ("NV Power Mode: 25W\n1\n", power.PowerMode("25W", 1)),
    ("NV Power Mode: MODE_30W\n2\n", power.PowerMode("MODE_30W", 2)),
    ("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n0\n", power.PowerMode("MAXN", 0)),
    ("NVPM VERB: Config file: /etc/nvpmodel.conf\nNVPM VERB: parsing done for /etc/nvpmodel.conf\n"
     "NVPM VERB: Current mode: NV Power Mode: 40W\n4\nNVPM VERB: PARAM CPU_ONLINE: ARG CORE_0: PATH "
     "/sys/devices/system/cpu/cpu0/online: REAL_VAL: 1 CONF_VAL: 1\n", power.PowerMode("40W", 4)),
])
def test_nvpmodel_query(text, mode):
    assert power.parse_nvpmodel_query(text) == mode


def test_power_modes_by_name():
    conf = "< POWER_MODEL ID=0 NAME=15W >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=25W >\n" \
           "< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n< PM_CONFIG DEFAULT=1 >\n"
    modes = power.parse_nvpmodel_conf(conf)
    assert modes == power.MODES["p3767-0005-super"]
    assert power.mode_id("maxn_super", modes) == 2
    with pytest.raises(power.PowerError, match="no power mode 'MAXN' on this module; it has 15W, 25W, MAXN_SUPER"):
        power.mode_id("MAXN", modes)
    with pytest.raises(power.PowerError, match="cannot read the power mode"):
        power.parse_nvpmodel_query("nvpmodel: command failed")


JETSON_CLOCKS_JP7 = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super
Online CPUs: 0-5, Offline CPUs: 
cpu0:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=960000 IdleStates: WFI=1 c7=1 
cpu1:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=960000 IdleStates: WFI=1 c7=1 
GPU MinFreq=306000000 MaxFreq=918000000 CurrentFreq=306000000
Active GPU TPCs: 4
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=665600000
FAN Dynamic Speed Control=nvfancontrol hwmon0_pwm1=60
NV Power Mode: 25W
"""
JETSON_CLOCKS_LOCKED = """SOC family:tegra234  Machine:Jetson AGX Orin
cpu4:  Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0 
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
Active GPU TPCs: 8
EMC MinFreq=3199000000 MaxFreq=3199000000 CurrentFreq=3199000000
NV Power Mode: MAXN
"""


def test_jetson_clocks_show():
    c = power.parse_jetson_clocks(JETSON_CLOCKS_JP7)
    assert c.machine.endswith("Developer Kit Super") and c.power_mode == "25W"
    assert c.cpu_max_khz == {"cpu0": 1344000, "cpu1": 1344000} and c.gpu_hz["MaxFreq"] == 918000000
    assert not c.locked
    locked = power.parse_jetson_clocks(JETSON_CLOCKS_LOCKED)
    assert locked.locked and locked.power_mode == "MAXN" and locked.emc_hz["CurrentFreq"] == 3199000000


@pytest.mark.parametrize("text,l4t,jetpack", [
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023",
     "35.4.1", "5.1.2"),
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8 01:49:37 UTC 2025"
     "\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n", "36.4.3", "6.2"),
    ("# R36 (release), REVISION: 4.7, GCID: 42132812, BOARD: generic, EABI: aarch64, DATE: Thu Sep 18 22:54:44 UTC 2025",
     "36.4.7", "6.2.1"),
    ("# R39 (release), REVISION: 2.1, GCID: 46758480, BOARD: generic, EABI: aarch64, DATE: Fri Aug  7 05:54:22 AM UTC "
     "2026\n# KERNEL_VARIANT: oot\n", "39.2.1", "7.2.1"),
])
def test_l4t_release_and_jetpack(text, l4t, jetpack):
    assert device.parse_nv_tegra_release(text) == l4t
    assert device.jetpack_for(l4t) == jetpack


def test_device_tree_compatible():
    assert device.parse_compatible(b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0") == \
        ("p3701-0005", "tegra234", False)
    assert device.parse_compatible(b"nvidia,p3768-0000+p3767-0005-super\0nvidia,tegra234\0") == \
        ("p3767-0005", "tegra234", True)


def test_detect_reads_a_device_root_and_takes_overrides(tmp_path, monkeypatch):
    for var in ("EDGEVLM_L4T", "EDGEVLM_JETPACK", "EDGEVLM_TRT_VERSION", "EDGEVLM_CUDA", "EDGEVLM_MODULE", "EDGEVLM_SM"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    d = device.detect(str(tmp_path))
    assert (d.l4t, d.jetpack, d.module, d.part, d.sm) == ("36.4.3", "6.2", "Jetson AGX Orin 64GB", "p3701-0005", "87")
    monkeypatch.setenv("EDGEVLM_TRT_VERSION", "10.3.0.30")
    monkeypatch.setenv("EDGEVLM_SM", "87")
    assert device.detect(str(tmp_path)).require("tensorrt", "sm").tag == "10.3.0.30-sm87"
    monkeypatch.delenv("EDGEVLM_TRT_VERSION")
    bare = device.detect(str(tmp_path / "nothing"))
    with pytest.raises(device.DeviceError, match="cannot tell this device's l4t"):
        bare.require("l4t")


def test_roofline_matches_the_bandwidth_arithmetic():
    r = {p: roofline("agx-orin-64gb", "mobilevlm-v2-1.7b", p) for p in ("fp16", "int8", "int4")}
    assert 70 < r["fp16"].decode_tok_s < 80  # 204.8 GB/s over ~2.7 GB per token
    assert r["fp16"].decode_tok_s < r["int8"].decode_tok_s < r["int4"].decode_tok_s
    nano = roofline("orin-nano-8gb", "mobilevlm-v2-1.7b", "fp16", mode="15W")
    assert nano.decode_tok_s == pytest.approx(r["fp16"].decode_tok_s * 68.3 / 204.8, rel=1e-6)
    assert 5 < r["fp16"].image_encode_ms < 15 and nano.image_encode_ms > r["fp16"].image_encode_ms
    with pytest.raises(ValueError, match="unknown module"):
        roofline("xavier", "mobilevlm-v2-1.7b")


def test_batched_decode_ceiling_reads_the_weights_once_per_step():
    from edgevlm.jetson.roofline import batch_ceiling
    one = roofline("agx-orin-64gb", "mobilevlm-v2-1.7b", "int4", context=300)
    points, knee = batch_ceiling("agx-orin-64gb", "mobilevlm-v2-1.7b", "int4", context=300)
    assert points[0].aggregate_tok_s == pytest.approx(one.decode_tok_s)
    rates = [p.aggregate_tok_s for p in points]
    assert rates == sorted(rates) and rates[3] > 3 * rates[0]  # batch 8: weights shared by 8 rows
    # per-row KV (MHA, 16 KV heads) costs more bandwidth time than a row's FLOPs: never compute-bound
    assert knee == float("inf") and all(p.bound == "memory" for p in points)
    # with a tiny context the rows are nearly free until the FLOPs catch up
    _, short_knee = batch_ceiling("orin-nano-8gb", "mobilevlm-v2-1.7b", "int4", mode="25W", context=1)
    assert 1 < short_knee < float("inf")


def test_roofline_prices_each_kv_layout():
    """ideal reads the context once; concat ~3x (copy + read); static all MAX_CONTEXT slots."""
    per_pos = 2 * 24 * 16 * 128 * 2 / 1e6  # MB of FP16 K and V per position, 1.7B
    at = lambda kv, ctx, cap=None: roofline("agx-orin-64gb", "mobilevlm-v2-1.7b", "int4", context=ctx,  # noqa: E731
                                            kv_cache=kv, max_context=cap)
    assert at("ideal", 500).kv_mb == pytest.approx(500 * per_pos)
    assert at("concat", 500).kv_mb == pytest.approx(3 * 500 * per_pos)
    assert at("static", 500, 2048).kv_mb == at("static", 1900, 2048).kv_mb == pytest.approx(2048 * per_pos)
    # static beats concat once the context passes a third of its capacity, not before
    assert at("static", 500, 2048).decode_tok_s < at("concat", 500).decode_tok_s
    assert at("static", 1000, 2048).decode_tok_s > at("concat", 1000).decode_tok_s
    assert at("static", 500, 1024).decode_tok_s > at("static", 500, 2048).decode_tok_s
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        at("paged", 500)


def test_engine_profiles_come_from_the_manifest(tiny_onnx):
    from edgevlm.engines.profiles import ProfileError, decoder_profiles, vision_profiles
    from edgevlm.manifest import OnnxArtifacts
    art = OnnxArtifacts.open(tiny_onnx)
    prefill, decode = decoder_profiles(art, max_context=256)
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 128), (1, 72, 128), (1, 255, 128))
    assert prefill.shapes["past_key_0"] == ((1, 4, 0, 32),) * 3
    assert decode.shapes["inputs_embeds"] == ((1, 1, 128),) * 3
    assert decode.shapes["past_value_1"] == ((1, 4, 1, 32), (1, 4, 136, 32), (1, 4, 255, 32))
    assert decode.shapes["position_ids"] == ((1, 1), (1, 1), (1, 1))
    assert set(prefill.shapes) == {t["name"] for t in art.manifest["io"]["decoder"]["inputs"]}
    (images,) = vision_profiles(art, max_batch=4)
    assert images.shapes["pixel_values"] == ((1, 3, 112, 112), (1, 3, 112, 112), (4, 3, 112, 112))
    with pytest.raises(ProfileError, match="MAX_CONTEXT=4096: this model holds 2..512 tokens"):
        decoder_profiles(art, max_context=4096)


def test_static_cache_profiles_pin_the_cache_and_vary_only_seq(tiny_onnx, tmp_path):
    import json
    import shutil

    from edgevlm.engines.profiles import ProfileError, static_decoder_profiles
    from edgevlm.manifest import OnnxArtifacts
    art = OnnxArtifacts.open(tiny_onnx)
    pinned, (prefill, decode) = static_decoder_profiles(art, max_context=256, max_sequences=8)
    assert pinned == {"cache": 256}
    kv = {f"past_{kv}_{i}" for i in range(2) for kv in ("key", "value")}
    assert set(prefill.shapes) == set(decode.shapes) == {"inputs_embeds", "position_ids"} | kv
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 128), (1, 72, 128), (1, 255, 128))
    assert prefill.shapes["past_key_0"] == ((1, 4, 256, 32),) * 3
    # decode: one token per row, 1..8 rows (one shape per batch size: what a CUDA graph captures)
    assert decode.shapes["inputs_embeds"] == ((1, 1, 128), (8, 1, 128), (8, 1, 128))
    assert decode.shapes["position_ids"] == ((1, 1), (8, 1), (8, 1))
    assert decode.shapes["past_value_1"] == ((1, 4, 256, 32), (8, 4, 256, 32), (8, 4, 256, 32))
    with pytest.raises(ProfileError, match="MAX_CONTEXT=600"):
        static_decoder_profiles(art, max_context=600)
    old = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["io"]["decoder_static"], m["files"]["decoder_static"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ProfileError, match="no decoder.static.onnx"):
        static_decoder_profiles(OnnxArtifacts.open(old))


@pytest.mark.parametrize("env", [{}, {"EDGEVLM_TRT_VERSION": "10.3.0.30", "EDGEVLM_SM": "87"}])
def test_make_engines_refuses_off_device_and_writes_nothing(tiny_onnx, tmp_path, env):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    onnx_dir = tmp_path / "tiny" / "onnx"
    shutil.copytree(tiny_onnx, onnx_dir)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVLM_")}
    script = Path(__file__).resolve().parents[1] / "build" / "build_engines.py"
    r = subprocess.run([sys.executable, str(script), "--onnx", str(onnx_dir), "--precision", "fp16"],
                       env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("engines: refused:") and "nothing was written" in r.stderr
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["onnx"]


@pytest.mark.orin
@pytest.mark.parametrize("kv", ["concat", "static"])
def test_tensorrt_engines_match_onnx_runtime(tiny_onnx, tmp_path, kv):
    """On the Orin: FP16 engines of the tiny export give ONNX Runtime's greedy tokens, with the
    concat KV cache and (TensorRT 10.15+) the in-place one whose decode step is a CUDA graph,
    through the pools the scheduler drives."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine (no GPU; the "
                                                 "PyPI packages are download stubs); this test runs on the Orin")
    from edgevlm.engines.features import Features
    if kv == "static" and not Features.of(trt).inplace_kv:
        pytest.skip(f"TensorRT {trt.__version__} has no in-place KV update (10.15+)")
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from edgevlm.jetson.device import detect
    from edgevlm.manifest import OnnxArtifacts
    from edgevlm.runtime.runners import open_decoder
    from edgevlm.runtime.tensorrt.decoder import TrtDecoder
    from edgevlm.runtime.text_model import open_text_model
    art = OnnxArtifacts.open(tiny_onnx)
    script = Path(__file__).resolve().parents[1] / "build" / "build_engines.py"
    r = subprocess.run([sys.executable, str(script), "--onnx", str(tiny_onnx), "--max-context", "256", "--kv", kv],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr
    trt_pool = TrtDecoder(tiny_onnx.parent / "engines" / detect().tag, art.config.text).open_pool(2)
    model = open_text_model(tiny_onnx)
    ort_pool = open_decoder(tiny_onnx).open_pool(1, max_context=64)
    ids = model.tok.encode("Name three colours.")
    a, b = ort_pool.acquire(64), trt_pool.acquire(64)
    la, lb = ort_pool.prefill(a, model.table.embed(ids)), trt_pool.prefill(b, model.table.embed(ids))
    for _ in range(16):
        assert int(np.argmax(la)) == int(np.argmax(lb))
        t = int(np.argmax(la))
        la, lb = ort_pool.decode([a], model.table.embed([t]))[0], trt_pool.decode([b], model.table.embed([t]))[0]
    if kv == "static":
        assert trt_pool.steps[1].graph is not None  # decode steps after the first replay one captured graph
    trt_pool.release(b)
    again = trt_pool.acquire(64)  # the row's memory comes back, stale cache and all
    ort_pool.release(a)
    fresh = ort_pool.acquire(64)
    assert int(np.argmax(trt_pool.prefill(again, model.table.embed(ids)))) == int(np.argmax(
        ort_pool.prefill(fresh, model.table.embed(ids))))
    trt_pool.close()


def test_compose_and_systemd_run_what_we_ship():
    """What `docker compose` and systemd would run, read as they read it (YAML, unit sections)."""
    import configparser
    from pathlib import Path

    import yaml
    root = Path(__file__).resolve().parents[1] / "jetson"
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    triton, engines = compose["services"]["triton"], compose["services"]["engines"]
    assert "python3 -m edgevlm.serve" in triton["command"] and "--host ${HOST:-127.0.0.1}" in triton["command"]
    assert triton["restart"] == "unless-stopped" and triton["runtime"] == "nvidia"
    assert triton["healthcheck"]["test"][-1].endswith("/v2/health/ready")
    assert triton["volumes"] == engines["volumes"] and triton["image"] == engines["image"]  # same TensorRT
    assert engines["profiles"] == ["build"] and "build/build_engines.py" in engines["command"]
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((root / "edgevlm.service").read_text())
    assert unit["Service"]["Restart"] == "always" and unit["Unit"]["Requires"] == "docker.service"
    assert unit["Service"]["ExecStart"].split()[:4] == ["/usr/bin/docker", "compose", "-f",
                                                        "${EDGEVLM_ROOT}/jetson/compose.yaml"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_jetson_bench_refuses_off_device(tiny_onnx):
    import os
    import subprocess
    import sys
    from pathlib import Path
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVLM_")}
    script = Path(__file__).resolve().parents[1] / "tools" / "jetson_bench.py"
    r = subprocess.run([sys.executable, str(script), "--onnx", str(tiny_onnx)], env=clean,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("jetson-bench: refused:") and r.stderr.count("\n") == 1


def test_inside_a_container_the_compute_capability_comes_from_the_cuda_device(tmp_path, monkeypatch):
    """No /etc/nv_tegra_release, no device tree (a container without the mounts): the CUDA
    device answers; the device tree, where visible, wins without asking CUDA; EDGEVLM_SM wins
    over both; with none of them the fact is missing and require() says which override."""
    monkeypatch.delenv("EDGEVLM_SM", raising=False)
    monkeypatch.delenv("EDGEVLM_L4T", raising=False)
    asked = []
    monkeypatch.setattr(device, "cuda_compute_capability", lambda: asked.append(1) or "87")
    container = device.detect(str(tmp_path))
    assert container.sm == "87" and container.l4t is None and asked == [1]
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "compatible").write_bytes(b"nvidia,p3701-0005\0nvidia,tegra264\0")
    assert device.detect(str(tmp_path)).sm == "110" and asked == [1]  # the tree first (a Thor here)
    monkeypatch.setenv("EDGEVLM_SM", "72")
    assert device.detect(str(tmp_path)).sm == "72"
    monkeypatch.delenv("EDGEVLM_SM")
    monkeypatch.setattr(device, "cuda_compute_capability", lambda: None)
    with pytest.raises(device.DeviceError, match="EDGEVLM_SM"):
        device.detect(str(tmp_path / "bare")).require("sm")


def test_cuda_python_is_found_under_either_module_name(monkeypatch):
    import sys
    import types
    old = types.ModuleType("cuda.cudart")
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # 11.x: no cuda.bindings
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(cudart=old, __path__=[]))
    monkeypatch.setitem(sys.modules, "cuda.cudart", old)
    assert device.cudart() is old
    new = types.ModuleType("cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=new, __path__=[]))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", new)
    assert device.cudart() is new


def test_compose_defaults_are_the_stack_tables_and_the_container_sees_what_it_needs():
    import re
    from pathlib import Path

    import yaml

    from edgevlm.jetson import stack
    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "jetson" / "compose.yaml").read_text())
    base = compose["x-edgevlm"]
    defaults = {k: re.fullmatch(r"\$\{\w+:-(.+)\}", v).group(1) for k, v in base["build"]["args"].items()}
    assert defaults == stack.docker_build_args("6.2.1")
    assert "/etc/nv_tegra_release:/etc/nv_tegra_release:ro" in base["volumes"]
    assert base["environment"]["NVIDIA_DISABLE_REQUIRE"] == "1"
    assert base["environment"]["PYTHONPATH"].split(":") == ["${EDGEVLM_ROOT}", "${EDGEVLM_ROOT}/client"]


def test_each_jetpack_gets_the_cuda_python_of_its_own_cuda():
    from edgevlm.jetson import stack
    for s in stack.STACKS:
        assert s.cuda_python == f"cuda-python=={s.cuda}.*", s
    assert stack.stack_for("6.2.2").jetpack == "6.2.1"  # a newer patch of a known line
    with pytest.raises(stack.StackError, match="LayerNormalization"):
        stack.stack_for("5.1.2")
    with pytest.raises(stack.StackError, match="no verified Triton container"):
        stack.docker_build_args("7.2.1")
