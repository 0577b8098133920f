"""make engines: TensorRT engines for this device from an ONNX export (on the Orin).

    python build/build_engines.py --onnx artifacts/mobilevlm-v2-1.7b/onnx --precision fp16 [--max-context 2048]

Each precision builds from its export (`make quantize PRECISION=...`): fp16 from `onnx-fp16/`
(strongly typed, TensorRT 10 and 11; 8.x builds `onnx/` with precision flags), int8 / int4 from
`onnx-int8/` / `onnx-int4/`. KV=auto (default) builds the decoder with the in-place static KV cache where
TensorRT has it (10.15+) and with concat-KV otherwise; KV=static|concat forces one. Engines land in artifacts/<name>/engines/<TensorRT>-sm<cc>/ with a manifest and the
timing cache beside them; off-device it refuses in one line, exit 2, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgevlm.engines.features import Features
from edgevlm.engines.profiles import ProfileError, decoder_profiles, static_decoder_profiles, vision_profiles
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


def vision_onnx(art: OnnxArtifacts, strongly_typed: bool) -> Path:
    """The W8A8 vision encoder's FP16 copy for strongly typed builds of quantized exports (the
    graph's types decide there), the encoder itself otherwise."""
    key = "vision_encoder_fp16" if strongly_typed and "vision_encoder_fp16" in art.manifest["files"] else "vision_encoder"
    return art.path(key)


def decoder_onnx(art: OnnxArtifacts, kv: str, strongly_typed: bool) -> Path:
    """decoder.onnx or decoder.static.onnx; strongly typed builds (Q/DQ on TensorRT 10) take
    the FP16 copy `make quantize` writes of either; TensorRT 8.5 builds the FP32-typed graph
    with precision flags instead."""
    key = "decoder_static" if kv == "static" else "decoder"
    return art.path(f"{key}_fp16" if strongly_typed and f"{key}_fp16" in art.manifest["files"] else key)


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
    ap.add_argument("--max-context", type=int, help="tokens the decoder engine holds (default: the model's)")
    ap.add_argument("--max-batch", type=int, default=8, help="images per vision-encoder call")
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
        vis_profiles = vision_profiles(art, args.max_batch)
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
            built = {
                # both quantized exports carry the W8A8 vision encoder
                "vision_encoder": build_engine(vision_onnx(art, strongly_typed), tmp / "vision_encoder.plan", vis_profiles,
                                               "fp16" if args.precision == "fp16" else "int8",
                                               timing_cache=cache, workspace_gib=args.workspace_gib,
                                               optimization_level=args.optimization_level),
                "decoder": build_engine(decoder_onnx(art, kv, strongly_typed), tmp / "decoder.plan", dec_profiles, args.precision,
                                        timing_cache=cache, workspace_gib=args.workspace_gib,
                                        optimization_level=args.optimization_level,
                                        pinned=pinned, kv_cache=kv),
            }
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
