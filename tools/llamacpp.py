"""llama.cpp's MobileVLM port as a peer in `make bench`: built, converted and run here, never a
dependency of edgevlm and never copied into it.

    build     the llama.cpp tree vendored in the llama-cpp-python sdist (PyPI), CMake, CPU
              only: llama-mtmd-cli and llama-quantize. Two flavours, each cached: `native`
              (GGML_NATIVE=ON: everything the CPU offers, AMX included) and `portable`
              (GGML_NATIVE=OFF with this CPU's own AVX2 / AVX-512 options on and AMX off), the
              fallback for a tier the native build crashes on (seen on Xeons with AMX: every
              quantized GGUF, SIGSEGV during the warm-up)
    convert   our checkpoint by llama.cpp's MobileVLM recipe (docs/multimodal/MobileVLM.md in
              that tree): llava_surgery.py splits out the projector, a CLIP vision directory
              is written from the checkpoint's own tower (transformers' CLIPVisionModel
              layout) for convert_image_encoder_to_gguf.py --projector-type ldpv2|ldp
              --clip-model-is-vision, convert_legacy_llama.py writes the LLaMA part as f16,
              llama-quantize makes q8_0 and q4_k_s
    run       llama-mtmd-cli -t THREADS --temp 0 --ignore-eos -n TOKENS --perf -v with one
              photo, parsed: image encode ms, prompt eval and eval tok/s; its peak RSS (VmHWM)

Everything lands under artifacts/llama.cpp/ (the build, by sdist version) and
artifacts/<model>/gguf/ (the converted files), so a rerun only measures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgevlm.serve.tritonserver import proc_status_kib

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"  # pinned: the vendored llama.cpp the figures were measured with
QUANTS = ("f16", "q8_0", "q4_k_s")
PROJECTOR = {"ldpnetv2": "ldpv2", "ldpnet": "ldp"}  # our mm_projector_type -> the converter's


class PeerUnavailable(RuntimeError):
    """llama.cpp could not be built, converted or run here; the bench says why and goes on."""


class RunFailed(PeerUnavailable):
    """One llama-mtmd-cli run crashed, failed or timed out: its exit status and last lines."""

    def __init__(self, exit_code: int | None, tail: list[str], why: str = ""):
        self.exit_code, self.tail = exit_code, tail
        status = why or f"exit {exit_code}"
        super().__init__(f"llama-mtmd-cli {status}: " + " | ".join(tail))


def _run(argv, log, cwd=None, env=None, what="") -> str:
    log(f"llama.cpp: {what or ' '.join(map(str, argv[:3]))}")
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise PeerUnavailable(f"{what or argv[0]} failed (exit {r.returncode}): {' | '.join(tail)}")
    return r.stdout


def source_tree(cache: Path, log) -> Path:
    """The llama.cpp tree inside the pinned sdist, downloaded and unpacked once."""
    version = SDIST.split("==")[1]
    tree = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", cache],
         log, what=f"download the {SDIST} sdist")
    archive = next(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    if not (tree / "CMakeLists.txt").is_file():
        raise PeerUnavailable(f"{archive.name} holds no vendor/llama.cpp tree")
    return tree


# GGML's x86 options and the /proc/cpuinfo flag each needs (the portable build turns on those
# this CPU has); AMX stays off there.
X86_OPTIONS = (("GGML_AVX", "avx"), ("GGML_AVX2", "avx2"), ("GGML_FMA", "fma"), ("GGML_F16C", "f16c"),
               ("GGML_BMI2", "bmi2"), ("GGML_AVX_VNNI", "avx_vnni"), ("GGML_AVX512", "avx512f"),
               ("GGML_AVX512_VBMI", "avx512_vbmi"), ("GGML_AVX512_VNNI", "avx512_vnni"),
               ("GGML_AVX512_BF16", "avx512_bf16"))
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
FLAVOURS = ("native", "portable")


def build_options(flavour: str, cpu_flags: set[str]) -> list[str]:
    """The GGML options of a build flavour: `native` as the CPU is, or `portable`: native off,
    this CPU's own AVX2 / AVX-512 options on, AMX off."""
    if flavour == "native":
        return ["GGML_NATIVE=ON"]
    if flavour != "portable":
        raise ValueError(f"unknown llama.cpp build flavour {flavour!r}")
    on = [f"{opt}=ON" for opt, flag in X86_OPTIONS if flag in cpu_flags]
    return ["GGML_NATIVE=OFF", *on, *(f"{opt}=OFF" for opt in AMX_OPTIONS)]


def build(cache: Path, log, flavour: str = "native", cpu_flags: set[str] = frozenset()) -> tuple[Path, Path]:
    """(bin directory with llama-mtmd-cli and llama-quantize, source tree), built once per flavour."""
    tree = source_tree(cache, log)
    out = tree / ("build" if flavour == "native" else f"build-{flavour}")
    bins = out / "bin"
    if all((bins / b).is_file() for b in ("llama-mtmd-cli", "llama-quantize")):
        return bins, tree
    if shutil.which("cmake") is None:
        raise PeerUnavailable("no cmake on this machine")
    options = build_options(flavour, cpu_flags)
    _run(["cmake", "-S", tree, "-B", out, "-DCMAKE_BUILD_TYPE=Release", *(f"-D{o}" for o in options),
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DBUILD_SHARED_LIBS=OFF"], log, what=f"cmake configure (Release, {flavour}: {' '.join(options)})")
    _run(["cmake", "--build", out, "-j", str(os.cpu_count() or 2), "--target", "llama-mtmd-cli", "llama-quantize"],
         log, what=f"build llama-mtmd-cli and llama-quantize, {flavour} (several minutes, once)")
    return bins, tree


# The converters' own requirements (requirements/requirements-convert_legacy_llama.txt in the
# tree pins transformers 4.57; transformers 5 renamed what convert_image_encoder_to_gguf.py
# reaches into), in a venv of their own; torch is the local CPU wheel our setup pins too.
CONVERTER_REQUIREMENTS = ("torch==2.13.0", "transformers==4.57.6", "numpy<2.3", "sentencepiece<0.3",
                          "protobuf<5", "safetensors", "pillow")


def converter_python(cache: Path, log) -> Path:
    venv = cache / "convert-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.is_file() and stamp.read_text() == "\n".join(CONVERTER_REQUIREMENTS):
        return python
    _run([sys.executable, "-m", "venv", "--clear", venv], log, what="a venv for the converters")
    _run([python, "-m", "pip", "install", "-q", *CONVERTER_REQUIREMENTS], log,
         what="the converters' requirements (transformers 4.57)")
    stamp.write_text("\n".join(CONVERTER_REQUIREMENTS))
    return python


def _clip_dir(checkpoint: Path, out: Path) -> None:
    """transformers' CLIPVisionModel directory holding the checkpoint's own tower."""
    import torch
    from edgevlm.model.checkpoint import read_checkpoint
    ckpt = read_checkpoint(checkpoint)
    v = ckpt.config.vision
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
        "layer_norm_eps": v.layer_norm_eps, "projection_dim": 768, "num_channels": 3}, indent=2))
    tower = {k: t.float().contiguous() for k, t in ckpt.weights().vision.items()}
    torch.save(tower, out / "pytorch_model.bin")


def convert(checkpoint: Path, gguf: Path, bins: Path, tree: Path, log, python: Path | None = None) -> dict[str, Path]:
    """{"mmproj": ..., "f16": ..., "q8_0": ..., "q4_k_s": ...} for this checkpoint, made once per
    checkpoint content (gguf/source.sha256 holds the digest they were converted from)."""
    from edgevlm.model.checkpoint import read_checkpoint
    files = {"mmproj": gguf / "mmproj-model-f16.gguf", **{q: gguf / f"model-{q}.gguf" for q in QUANTS}}
    config = json.loads((checkpoint / "config.json").read_text())
    projector = PROJECTOR.get(config.get("mm_projector_type", ""))
    if projector is None:
        raise PeerUnavailable(f"llama.cpp's MobileVLM recipe has no projector for {config.get('mm_projector_type')!r}")
    stamp, digest = gguf / "source.sha256", read_checkpoint(checkpoint).sha256()
    if all(f.is_file() for f in files.values()) and stamp.is_file() and stamp.read_text() == digest:
        return files
    stamp.unlink(missing_ok=True)
    python = python or converter_python(tree.parents[2], log)
    work = gguf / "work"
    shutil.rmtree(work, ignore_errors=True)
    hf = work / "hf"
    hf.mkdir(parents=True)
    for f in checkpoint.iterdir():  # the surgery writes beside the weights: link, never touch ours
        if f.is_file():
            os.link(f, hf / f.name)
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    legacy = tree / "tools" / "mtmd" / "legacy-models"
    _run([python, legacy / "llava_surgery.py", "-m", hf], log, env=env, what="llava_surgery.py")
    _clip_dir(checkpoint, work / "clip")
    _run([python, legacy / "convert_image_encoder_to_gguf.py", "-m", work / "clip", "--clip-model-is-vision",
          "--llava-projector", hf / "llava.projector", "--output-dir", work, "--projector-type", projector],
         log, env=env, what=f"convert_image_encoder_to_gguf.py --projector-type {projector}")
    _run([python, tree / "examples" / "convert_legacy_llama.py", hf, "--skip-unknown", "--outtype", "f16",
          "--outfile", work / "model-f16.gguf"], log, env=env, what="convert_legacy_llama.py --outtype f16")
    for q in QUANTS[1:]:
        _run([bins / "llama-quantize", work / "model-f16.gguf", work / f"model-{q}.gguf", q.upper()], log,
             what=f"llama-quantize {q}")
    for key, f in files.items():
        (work / f.name).replace(f)  # only complete files land beside the cache's other files
    shutil.rmtree(work)
    stamp.write_text(digest)
    return files


@dataclass
class PeerRun:
    image_encode_ms: float
    prompt_tokens: int
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    peak_rss_mb: float


_ENCODE = re.compile(r"(?:image slice encoded in|mtmd batch encoding done in) (\d+) ms")
_PROMPT = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens \(.*?([\d.]+) tokens per second\)")
_EVAL = re.compile(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) runs\s*\(.*?([\d.]+) tokens per second\)")


def parse(log_text: str) -> dict:
    """The figures llama-mtmd-cli prints with --perf -v (the last of each kind)."""
    enc, prompt = _ENCODE.findall(log_text), _PROMPT.findall(log_text)
    evals = list(_EVAL.finditer(log_text))
    if not (enc and prompt and evals):
        raise PeerUnavailable("llama-mtmd-cli printed no timing lines (image encode, prompt eval, eval)")
    e = evals[-1]
    return {"image_encode_ms": float(enc[-1]), "prompt_tokens": int(prompt[-1][1]),
            "prefill_tok_s": float(prompt[-1][2]), "decode_tokens": int(e.group(2)),
            "decode_tok_s": float(e.group(3))}


def run(bins: Path, model: Path, mmproj: Path, image: Path, question: str, threads: int, tokens: int,
        timeout_s: float = 1800.0) -> PeerRun:
    """One llama-mtmd-cli run; RunFailed when it crashes (a negative exit: the signal), fails or
    runs past timeout_s."""
    argv = [bins / "llama-mtmd-cli", "-m", model, "--mmproj", mmproj, "--image", image, "-p", question,
            "-t", str(threads), "--temp", "0", "--ignore-eos", "-n", str(tokens), "--perf", "-v",
            "--chat-template", "deepseek", "-c", "2048"]
    deadline = time.monotonic() + timeout_s
    timed_out = False
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, text=True)
        peak_kib = 0
        # its own high-water mark, read while it runs: wait4's ru_maxrss would also count the
        # bench process it was forked from (Linux carries the pre-exec peak over)
        while p.poll() is None:
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                timed_out = True
                break
            peak_kib = max(peak_kib, proc_status_kib(p.pid, "VmHWM:"))
            time.sleep(0.05)
        log.seek(0)
        out = log.read()
    tail = out.strip().splitlines()[-3:]
    if timed_out:
        raise RunFailed(None, tail, f"ran past {timeout_s:.0f} s")
    if p.returncode != 0:
        raise RunFailed(p.returncode, tail)
    return PeerRun(**parse(out), peak_rss_mb=round(peak_kib / 1024))



def decode_weight_bytes(model: Path, tree: Path) -> int:
    """Bytes of the GGUF's tensors a decode step reads: all but the token embedding table (one
    row per token is gathered from it)."""
    sys.path.insert(0, str(tree / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    return sum(int(t.n_bytes) for t in GGUFReader(str(model)).tensors if t.name != "token_embd.weight")
