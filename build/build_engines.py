"""make engines: TensorRT engines for this device from an ONNX export (on the Orin).

    python build/build_engines.py --onnx artifacts/mobilevlm-v2-1.7b/onnx --precision fp16 [--max-context 2048]

Each precision builds from its export (`make quantize PRECISION=...`): fp16 from `onnx-fp16/`
(strongly typed, TensorRT 10 and 11; 8.x builds `onnx/` with precision flags), int8 / int4 from
`onnx-int8/` / `onnx-int4/`. KV=auto (default) builds the decoder with the in-place static KV cache where
TensorRT has it (10.15+) and with concat-KV otherwise; KV=static|concat forces one. A
Llama-3.2-Vision export gets a third engine, cross_kv (each cross layer's K/V of a picture),
and its image graphs stay FP16 at every precision. Engines land in
artifacts/<name>/engines/<TensorRT>-sm<cc>/ with a manifest and the timing cache beside them;
off-device it refuses in one line, exit 2, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgevlm.engines.features import Features
from edgevlm.engines.profiles import (ProfileError, cross_kv_profiles, decoder_profiles, static_decoder_profiles,
                                      vision_profiles)
from edgevlm.jetson.device import DeviceError, detect, total_memory_gib
from edgevlm.jetson.memory import workspace_gib
from edgevlm.jetson.stack import UNSUPPORTED
from edgevlm.manifest import ManifestError, OnnxArtifacts, write_manifest
from edgevlm.staging import staged_dir

PRECISIONS = ("fp16", "int8", "int4")


def export_for(fp32: Path, precision: str, strongly_typed: bool) -> Path:
    """The export an engine of `precision` is built from: the Q/DQ export for int8 / int4;
    for fp16 the FP16 export where the network is strongly typed (TensorRT 10, 11), the FP32
    one with precision flags on 8.x."""
    if precision == "fp16" and not strongly_typed:
        return fp32
    return fp32.parent / f"onnx-{precision}"


def typed_onnx(art: OnnxArtifacts, key: str, strongly_typed: bool) -> Path:
    """The graph `key`, or for strongly typed builds the FP16 copy `make quantize` writes beside
    a quantized graph (the graph's types decide there: without it everything outside the
    quantized layers would run FP32); TensorRT 8.x builds the FP32-typed graph with precision
    flags instead."""
    fp16 = f"{key}_fp16"
    return art.path(fp16 if strongly_typed and fp16 in art.manifest["files"] else key)


def vision_onnx(art: OnnxArtifacts, strongly_typed: bool) -> Path:
    return typed_onnx(art, "vision_encoder", strongly_typed)


def decoder_onnx(art: OnnxArtifacts, kv: str, strongly_typed: bool) -> Path:
    """decoder.onnx or decoder.static.onnx (or their FP16 copies)."""
    return typed_onnx(art, "decoder_static" if kv == "static" else "decoder", strongly_typed)


def image_graphs(art: OnnxArtifacts, strongly_typed: bool) -> dict[str, Path]:
    """The graphs an image goes through before the decoder: the vision encoder, and for a
    cross-attention model (Llama-3.2-Vision) the graph making each cross layer's K/V."""
    graphs = {"vision_encoder": vision_onnx(art, strongly_typed)}
    if "cross_kv" in art.manifest["files"]:
        graphs["cross_kv"] = typed_onnx(art, "cross_kv", strongly_typed)
    return graphs


def engine_kv_layout(requested: str, art: OnnxArtifacts) -> str:
    """auto: static where TensorRT updates the cache in place and the export has the graph,
    concat otherwise."""
    if requested != "auto":
        return requested
    import tensorrt as trt

    static_ok = Features.of(trt).inplace_kv and "decoder_static" in art.manifest["files"]
    return "static" if static_ok else "concat"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="the FP32 export (artifacts/<name>/onnx)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--max-context", type=int, help="tokens the decoder engine holds (default: the model's, at most 4096)")
    ap.add_argument("--max-batch", type=int,
                    help="vision-encoder rows per call: pictures, or LLaVA-1.6 tiles (default 8); Llama-3.2-Vision: "
                         "pictures of 4 tiles each (default 2: the attention of 8 such pictures alone is GBs)")
    ap.add_argument("--max-sequences", type=int, default=8,
                    help="rows of the batched decode step (static KV; concat engines decode one)")
    ap.add_argument("--kv", choices=("auto", "static", "concat"), default="auto",
                    help="decoder KV cache layout (default: static on TensorRT 10.15+)")
    ap.add_argument("--workspace-gib", type=float,
                    help="builder tactic workspace (default: an eighth of this module's memory, 0.5 to 2 GiB)")
    ap.add_argument("--optimization-level", type=int, default=3, choices=range(6))
    args = ap.parse_args(argv)
    fp32 = Path(args.onnx)
    try:
        device = detect().require("tensorrt", "sm")
        import tensorrt  # present: detect found its version
    except (DeviceError, ImportError) as e:
        print(f"engines: refused: {e}. `make engines` runs on the Jetson (JetPack 6.1+ with TensorRT); "
              "nothing was written", file=sys.stderr)
        return 2
    if device.jetpack and device.jetpack.split(".")[0] == "5":
        print(f"engines: refused: {UNSUPPORTED['5']}; nothing was written", file=sys.stderr)
        return 2
    strongly_typed = Features.of(tensorrt).strongly_typed
    src_dir = export_for(fp32, args.precision, strongly_typed)
    try:
        art = OnnxArtifacts.open(src_dir)
        kv = engine_kv_layout(args.kv, art)
        if kv == "static":
            pinned, dec_profiles = static_decoder_profiles(art, args.max_context, max_sequences=args.max_sequences)
            max_context = pinned["cache"]
        else:
            pinned, dec_profiles = None, decoder_profiles(art, args.max_context)
            max_context = dec_profiles[1].shapes["past_key_0"][2][2] + 1
        max_batch = args.max_batch or (2 if art.config.cross_length else 8)
        image_profiles = {"vision_encoder": vision_profiles(art, max_batch)}
        if art.config.cross_length:
            image_profiles["cross_kv"] = cross_kv_profiles(art, max_batch)
    except (ManifestError, ProfileError) as e:
        hint = f" (run `make quantize PRECISION={args.precision}` first)" if src_dir != fp32 else ""
        print(f"engines: error: {e}{hint}", file=sys.stderr)
        return 1
    from edgevlm.engines.build import BuildError, build_engine
    if args.workspace_gib is None:
        args.workspace_gib = workspace_gib(total_memory_gib() or 16)
    out = fp32.parent / "engines" / device.tag
    cache = fp32.parent / "engines" / f"timing-{device.tag}.cache"  # kept across builds and precisions
    try:
        with staged_dir(out) as tmp:
            built = {}
            # LLaVA's and MobileVLM's quantized exports carry a W8A8 vision encoder; a
            # cross-attention model's image graphs stay FP16 (its quantization is the decoder's)
            image_precision = "fp16" if args.precision == "fp16" or art.config.cross_length else "int8"
            for key, path in image_graphs(art, strongly_typed).items():
                built[key] = build_engine(path, tmp / f"{key}.plan", image_profiles[key], image_precision,
                                          timing_cache=cache, workspace_gib=args.workspace_gib,
                                          optimization_level=args.optimization_level)
            built["decoder"] = build_engine(decoder_onnx(art, kv, strongly_typed), tmp / "decoder.plan", dec_profiles,
                                            args.precision, timing_cache=cache, workspace_gib=args.workspace_gib,
                                            optimization_level=args.optimization_level, pinned=pinned, kv_cache=kv)
            write_manifest(tmp, {
                "kind": "tensorrt", "device_tag": device.tag, "device": device.to_dict(),
                "precision": args.precision, # the export's own files, hashed: what the repository check compares
                "onnx_sha256": art.digest, "source_onnx": str(src_dir.resolve()),
                "model": art.manifest["model"], "max_context": max_context, "kv_cache": kv,
                "max_sequences": args.max_sequences if kv == "static" else 1,
                "engines": built, "io": art.manifest["io"],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except BuildError as e:
        print(f"engines: error: {e}", file=sys.stderr)
        return 1
    print(f"engines: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
