"""`make bench`, peers: the cpu target served through tritonserver beside llama.cpp's MobileVLM
port, same checkpoint, same photo, same thread count, in one run.

Ours: the FP32 export and the `make quantize` exports beside it (INT8, INT4: the W8A8 vision
encoder and the MatMulNBits decoder the cpu target serves), each in its own tritonserver with
the caches off. llama.cpp: f16, q8_0 and q4_k_s GGUFs with an f16 mmproj (tools/llamacpp.py).
Per tier: image encode ms, prefill tok/s (image + text positions), decode tok/s over TOKENS
greedy tokens, peak resident memory, and decode's effective GB/s (weight bytes read per token
times tok/s) beside what this machine can read (tools/read_bandwidth.c), and the image encode's
matmul rate beside the machine's FP32 GEMM rate. Ratios are ours / llama.cpp for rates and
llama.cpp / ours for times, so > 1 means we are faster.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from edgevlm_client import Client

from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.runners import cpu_form, kv_layout
from edgevlm.samples import sample_image
from edgevlm.serve.repository import render_repository
from edgevlm.serve.tritonserver import TritonServer

import llamacpp

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the image? Describe it in detail."
PHOTO = "chelsea"
TOKENS = 64
OURS = ("fp32", "int8", "int4")
# (row, our precision, llama.cpp's file): the tiers a CPU user would pick between
TIERS = (("4-bit", "int4", "q4_k_s"), ("8-bit", "int8", "q8_0"), ("16/32-bit", "fp32", "f16"))


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def copy_bandwidth_gb_s(mib: int = 1024, runs: int = 5) -> float:
    """One thread copying a buffer far larger than the caches: bytes read + written per second."""
    a = np.ones(mib << 18, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return round(2 * a.nbytes / best / 1e9, 1)


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16")


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo reports for this CPU."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_isa() -> list[str]:
    """The vector extensions CPU kernels (MLAS, ggml) choose between that this CPU reports."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def read_bandwidth_gb_s(threads: int) -> dict[str, float]:
    """GB/s read by 1..threads threads (tools/read_bandwidth.c, built once under artifacts/);
    empty if there is no C compiler with OpenMP."""
    src = Path(__file__).with_name("read_bandwidth.c")
    exe = ROOT / "artifacts" / "bench" / "read_bandwidth"
    if not exe.is_file() or exe.stat().st_mtime < src.stat().st_mtime:
        exe.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)],
                               capture_output=True, text=True)
        if built.returncode:
            log(f"  read bandwidth not measured: cc failed: {(built.stderr.strip().splitlines() or ['?'])[-1]}")
            return {}
    lines = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True).stdout.split("\n")
    return {t: float(g) for t, g in (x.split() for x in lines if x.strip())}


def gemm_gflops(m: int, k: int, n: int, threads: int, runs: int = 10) -> float:
    """ONNX Runtime's FP32 MatMul [m, k] x [k, n] (MLAS), best of `runs`: what FP32 compute
    reaches here on a matmul of the vision tower's shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k)).astype(np.float32)
    sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return round(2 * m * k * n / best / 1e9, 1)


def tower_gflop(v) -> float:
    """Multiply-adds x 2 of the CLIP layers an image runs (projections, MLP, attention scores
    and mix); the projector is left out, so rates from it are a floor."""
    t, d, f = v.num_patches + 1, v.hidden_size, v.intermediate_size
    return float(f"{v.layers_used * 2 * (t * (4 * d * d + 2 * d * f) + 2 * t * t * d) / 1e9:.4g}")


def half_matmul(k: int = 2048, n: int = 5632, runs: int = 50) -> dict:
    """A 16-bit tier's core on this CPU: ONNX Runtime's MatMul of one row by a 1.7B-shaped
    weight, FP32 against FP16 (ms per call, weight GB/s)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    out = {}
    for name, dtype, elem in (("fp32", np.float32, TensorProto.FLOAT), ("fp16", np.float16, TensorProto.FLOAT16)):
        w = (rng.standard_normal((k, n)) * 0.02).astype(dtype)
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "row_by_weight",
                                  [helper.make_tensor_value_info("x", elem, [1, k])],
                                  [helper.make_tensor_value_info("y", elem, [1, n])], [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((1, k)).astype(dtype)
        for _ in range(5):
            sess.run(None, {"x": x})
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, {"x": x})
        ms = (time.perf_counter() - t0) / runs * 1e3
        out[name] = {"ms": round(ms, 3), "weight_gb_s": round(w.nbytes / ms / 1e6, 1)}
    return out


def decoder_weight_bytes(root: Path) -> int:
    """Bytes a decode step reads: the served decoder graph and its weights (the embedding table
    is outside it: one row per token)."""
    art = OnnxArtifacts.open(root)
    graph = art.path(cpu_form(art, "decoder_static" if kv_layout(art) == "static" else "decoder"))
    model = onnx.load(str(graph), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return graph.stat().st_size + sum((graph.parent / f).stat().st_size for f in data)


def ours(root: Path, image: bytes, runs: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo = render_repository(root, Path(tmp) / "repository", max_sequences=1, prefix_cache_mib=0,
                                 image_cache_mib=0)
        with TritonServer(repo) as server:
            client = Client(server.grpc_url, timeout_s=1800)
            client.generate(QUESTION, image=image, max_tokens=2)  # warm-up: sessions, pages
            rows = [client.generate(QUESTION, image=image, max_tokens=tokens).stats for _ in range(runs)]
            peak = server.peak_rss_mb()
    return {"image_encode_ms": statistics.median(s["image_encode_ms"] for s in rows),
            "prompt_tokens": rows[0]["prefill_tokens"],
            "prefill_tok_s": statistics.median(s["prefill_tokens_per_s"] for s in rows),
            "decode_tokens": rows[0]["decode_tokens"],
            "decode_tok_s": statistics.median(s["decode_tokens_per_s"] for s in rows),
            "peak_rss_mb": round(peak), "decode_weight_mb": round(decoder_weight_bytes(root) / 2**20)}


def tier(bins: Path, files: dict, q: str, photo: Path, runs: int, tokens: int, threads: int) -> dict:
    """One tier's medians on one build, or {"failed": ...} with the crash's exit status and
    last lines: a crash or a timeout fails that tier, never the others."""
    log(f"  llama.cpp {q} ({bins.parent.name}): {runs} run(s), {tokens} tokens, {threads} threads")
    try:
        rs = [llamacpp.run(bins, files[q], files["mmproj"], photo, QUESTION, threads, tokens) for _ in range(runs)]
    except llamacpp.RunFailed as e:
        log(f"  llama.cpp {q}: failed: {e}")
        return {"failed": {"exit": e.exit_code, "why": str(e), "tail": e.tail}}
    out = {k: statistics.median(getattr(r, k) for r in rs) for k in
           ("image_encode_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")}
    out.update(prompt_tokens=rs[0].prompt_tokens, decode_tokens=rs[0].decode_tokens)
    return out


def tiers(builds, files: dict, photo: Path, runs: int, tokens: int, threads: int) -> dict:
    """Every tier on the native build; if one fails there, every tier again on the portable
    build (`builds(flavour)` makes it on first use), so a row may carry both. Per tier: the
    run of each build, and the faster successful one as the tier's figures (its `build`)."""
    runs_by = {q: {} for q in llamacpp.QUANTS}
    for flavour in llamacpp.FLAVOURS:
        if flavour != "native" and not any("failed" in r.get("native", {}) for r in runs_by.values()):
            break
        try:
            bins, flags = builds(flavour)
        except llamacpp.PeerUnavailable as e:
            log(f"  llama.cpp {flavour} build: {e}")
            for q in runs_by:
                runs_by[q][flavour] = {"failed": {"exit": None, "why": f"build: {e}", "tail": []}}
            continue
        for q in llamacpp.QUANTS:
            runs_by[q][flavour] = {**tier(bins, files, q, photo, runs, tokens, threads), "flags": flags}
    out = {}
    for q, by in runs_by.items():
        ok = {f: r for f, r in by.items() if "failed" not in r}
        best = max(ok, key=lambda f: ok[f]["decode_tok_s"]) if ok else None
        out[q] = {**(ok[best] if best else {"failed": by["native"]["failed"]}), "build": best, "builds": by}
    return out


def theirs(checkpoint: Path, image: bytes, runs: int, tokens: int, threads: int) -> dict:
    cache = ROOT / "artifacts" / "llama.cpp"
    flags = cpu_flags()

    def builds(flavour):
        bins, _ = llamacpp.build(cache, log, flavour, flags)
        return bins, " ".join(llamacpp.build_options(flavour, flags))
    bins, tree = llamacpp.build(cache, log, "native", flags)
    files = llamacpp.convert(checkpoint, checkpoint.parent / "gguf", bins, tree, log)
    photo = checkpoint.parent / "gguf" / f"{PHOTO}.png"
    photo.write_bytes(image)
    out = tiers(builds, files, photo, runs, tokens, threads)
    for q in llamacpp.QUANTS:
        out[q].update(decode_weight_mb=round(llamacpp.decode_weight_bytes(files[q], tree) / 2**20),
                      file_mb=round(files[q].stat().st_size / 2**20))
    out["mmproj_mb"] = round(files["mmproj"].stat().st_size / 2**20)
    out["sdist"] = llamacpp.SDIST
    return out


def peers(onnx_dir: Path, checkpoint: Path | None, quick: bool, threads: int) -> dict:
    runs, tokens = (1, 8) if quick else (3, TOKENS)
    image = sample_image(PHOTO)
    vision = OnnxArtifacts.open(onnx_dir).config.vision
    report = {"runs": runs, "tokens": tokens, "threads": threads, "photo": PHOTO, "question": QUESTION,
              "cpu_isa": cpu_isa(), "read_bandwidth_gb_s": read_bandwidth_gb_s(threads),
              "copy_bandwidth_gb_s": copy_bandwidth_gb_s(), "half_matmul": half_matmul(),
              "tower_gflop": tower_gflop(vision),
              "gemm_gflops": gemm_gflops(vision.num_patches + 1, vision.hidden_size, vision.intermediate_size, threads),
              "ours": {}}
    for precision in OURS:
        root = onnx_dir if precision == "fp32" else onnx_dir.parent / f"onnx-{precision}"
        if not (root / "manifest.json").is_file():
            log(f"  ours {precision}: no export at {root} (make quantize PRECISION={precision}), skipped")
            continue
        log(f"  ours {precision}: served, {runs} run(s), {tokens} tokens")
        report["ours"][precision] = ours(root, image, runs, tokens)
    if quick or checkpoint is None:
        log("  llama.cpp: skipped (" + ("quick run" if quick else "no --checkpoint to convert") + ")")
        report["llamacpp"] = {"skipped": "quick run" if quick else "no checkpoint"}
        return report
    try:
        report["llamacpp"] = theirs(checkpoint, image, runs, tokens, threads)
    except llamacpp.PeerUnavailable as e:
        log(f"  llama.cpp: skipped: {e}")
        report["llamacpp"] = {"skipped": str(e)}
        return report
    report["ratios"] = ratios(report)
    return report


def _gb_s(v: dict) -> float:
    return round(v["decode_weight_mb"] * 2**20 * v["decode_tok_s"] / 1e9, 1)


def ratios(r: dict) -> dict:
    """> 1: ours is faster. Image encode: ours FP32 and W8A8 against the f16 mmproj."""
    o, t = r["ours"], r["llamacpp"]
    out = {}
    f16 = "failed" not in t["f16"]
    if "fp32" in o and f16:
        out["image_encode_fp32"] = round(t["f16"]["image_encode_ms"] / o["fp32"]["image_encode_ms"], 2)
    int8_vision = [o[p]["image_encode_ms"] for p in ("int8", "int4") if p in o]  # one graph, both exports
    if int8_vision and f16:
        out["image_encode_int8"] = round(t["f16"]["image_encode_ms"] / statistics.median(int8_vision), 2)
    for row, mine, peer in TIERS:
        if mine in o and "failed" not in t[peer]:
            out[f"prefill_{row}"] = round(o[mine]["prefill_tok_s"] / t[peer]["prefill_tok_s"], 2)
            out[f"decode_{row}"] = round(o[mine]["decode_tok_s"] / t[peer]["decode_tok_s"], 2)
    return out


def _machine(r: dict) -> str:
    bw = r.get("read_bandwidth_gb_s") or {}
    if not bw:
        return f"one thread copies **{r['copy_bandwidth_gb_s']} GB/s** (read + write) on this machine."
    most = max(bw, key=int)
    return (f"this machine reads **{bw[most]} GB/s** with {most} threads ({bw.get('1', '?')} with one; "
            "`tools/read_bandwidth.c`, measured in the same run), the most a decode step can use.")


def _encode_ceiling(r: dict) -> list[str]:
    """Why FP32 image encode cannot be much faster here: its matmul rate against the GEMM rate."""
    o, t = r["ours"], r["llamacpp"]
    if "fp32" not in o or "failed" in t["f16"] or not r.get("gemm_gflops") or not r.get("tower_gflop"):
        return []
    rate = r["tower_gflop"] / (o["fp32"]["image_encode_ms"] / 1e3)
    need = r["tower_gflop"] / (t["f16"]["image_encode_ms"] / 1.5 / 1e3)
    line = (f"FP32 image encode runs the tower's {r['tower_gflop']} GFLOP at {rate:.0f} GFLOP/s, "
            f"{100 * rate / r['gemm_gflops']:.0f} % of what ONNX Runtime's FP32 MatMul reaches here on the tower's "
            f"MLP shape ({r['gemm_gflops']:.0f} GFLOP/s). A 1.5× lead on llama.cpp's f16 encoder takes {need:.0f} GFLOP/s")
    if need > r["gemm_gflops"]:
        line += (", more than FP32 matmul does on this CPU: the FP32 tier cannot reach it, and the int8 "
                 "vision encoder of the quantized exports is the cpu target's fast encoder")
    return [line + ".", ""]


def _decode_ceiling(r: dict) -> list[str]:
    bw = r.get("read_bandwidth_gb_s") or {}
    if not bw:
        return []
    top = bw[max(bw, key=int)]
    o, t = r["ours"], r["llamacpp"]
    parts = [f"{row} {_gb_s(t[peer])} / {_gb_s(o[mine])} GB/s ({100 * _gb_s(t[peer]) / top:.0f} % / "
             f"{100 * _gb_s(o[mine]) / top:.0f} %)" for row, mine, peer in TIERS if mine in o and "failed" not in t[peer]]
    return [f"Share of the {top} GB/s this machine reads, llama.cpp / ours: " + "; ".join(parts) + ".", ""]


def markdown(name: str, r: dict) -> list[str]:
    out = [f"### {name}", ""]
    o, t = r["ours"], r["llamacpp"]
    if "skipped" in t:
        return out + [f"llama.cpp not measured: {t['skipped']}.", ""]
    out += [f"`{r['photo']}` photo, \"{r['question']}\", {r['tokens']} greedy tokens (llama.cpp with `--ignore-eos`), "
            f"{r['threads']} threads on both sides, medians of {r['runs']} runs. llama.cpp from the `{t['sdist']}` "
            f"sdist's vendored tree, `llama-mtmd-cli` with an f16 mmproj ({t['mmproj_mb']} MB); ours through "
            "tritonserver and gRPC, caches off. Effective GB/s: the decoder's weight bytes (no embedding table) × "
            f"decode tok/s; {_machine(r)}", "",
            "| tier | llama.cpp (build) | ours | image encode ms | prefill tok/s (tokens) | decode tok/s | decode GB/s |",
            "|---|---|---|---|---|---|---|"]
    tiers = [(row, mine, peer, t[peer], o[mine]) for row, mine, peer in TIERS if mine in o]
    flags = {}
    for row, mine, peer, chosen, b in tiers:
        # the build the tier's figures come from first, then any other build that ran it
        builds = chosen.get("builds") or {"native": chosen}
        for flavour in sorted(builds, key=lambda f: f != chosen.get("build", "native")):
            a = {**chosen, **builds[flavour]} if "builds" in chosen else chosen
            flags[flavour] = builds[flavour].get("flags", "GGML_NATIVE=ON")
            name = f"{peer} ({flavour})"
            if "failed" in a:
                out.append(f"| {row} | {name} | {mine.upper()} | failed: {a['failed']['why'][:60]} | | | |")
                continue
            out.append(
                f"| {row} | {name} | {mine.upper()} | {a['image_encode_ms']:.0f} / {b['image_encode_ms']:.0f} | "
                f"{a['prefill_tok_s']:.0f} ({a['prompt_tokens']}) / {b['prefill_tok_s']:.0f} ({b['prompt_tokens']}) | "
                f"{a['decode_tok_s']:.1f} / {b['decode_tok_s']:.1f} | {_gb_s(a)} / {_gb_s(b)} |")
    out += [""] + [f"- llama.cpp's `{f}` build: `{v}`" for f, v in flags.items()]
    failed = [(row, peer, t[peer]["failed"]) for row, _, peer, _, _ in tiers if "failed" in t[peer]]
    for row, peer, f in failed:
        out += [f"- {row} ({peer}) failed on every build: {f['why']}"]
    out += ["", "| tier | weights read MB | peak RSS MB | ours / llama.cpp: encode, prefill, decode |",
            "|---|---|---|---|"]
    q = r["ratios"]
    for row, _, _, a, b in tiers:
        if "failed" in a:
            continue
        out.append(f"| {row} | {a['decode_weight_mb']} / {b['decode_weight_mb']} | {a['peak_rss_mb']:.0f} / "
                   f"{b['peak_rss_mb']:.0f} | {a['image_encode_ms'] / b['image_encode_ms']:.2f}×, "
                   f"**{q[f'prefill_{row}']:.2f}×**, **{q[f'decode_{row}']:.2f}×** |")
    q, h = r["ratios"], r["half_matmul"]
    out += ["", "Each cell is llama.cpp / ours. Goal: every ratio ≥ 1.0, image encode and prefill ≥ 1.5."
            + (f" Image encode, llama.cpp's f16 mmproj / ours: FP32 **{q['image_encode_fp32']:.2f}×**"
               if "image_encode_fp32" in q else "")
            + (f", the quantized exports' int8 vision encoder **{q['image_encode_int8']:.2f}×**"
               if "image_encode_int8" in q else "") + ".", "",
            *_encode_ceiling(r), *_decode_ceiling(r),
            f"No 16-bit tier on this CPU ({' '.join(r.get('cpu_isa', [])) or 'flags unknown'}): ONNX Runtime's FP16 MatMul here takes "
            f"{h['fp16']['ms']:.2f} ms for one row by a 2048×5632 weight ({h['fp16']['weight_gb_s']} GB/s of weights) "
            f"against FP32's {h['fp32']['ms']:.2f} ms ({h['fp32']['weight_gb_s']} GB/s): on x86 its FP16 MatMul is a "
            "generic fallback, not an MLAS kernel, and no BF16 MatMul is registered for the CPU, so half the bytes "
            "does not make decode faster. The 16/32-bit row compares FP32; the 8-bit tier is the cpu target's answer to f16.", ""]
    return out
