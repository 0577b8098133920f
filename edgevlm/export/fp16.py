"""The FP16 export (`make quantize PRECISION=fp16` -> `onnx-fp16/`): what strongly typed
TensorRT builds take for fp16 engines, where the graph's own types decide the math.

TensorRT 10 and 11 build strongly typed networks (11 only those: its BuilderFlag has no FP16),
so "FP16 with the norms in FP32" must be written into the graph itself rather than asked of
the builder: FP16 weights and activations; LayerNorm (vision), RMSNorm's reductions, softmax
and the lm_head in FP32; FP32 pixels in and embeddings / logits out; the KV cache IO in FP16
(half the cache traffic, and the static decoder's in-place update needs the cache type
unchanged up to its TensorScatter). Checked against FP32 with ONNX Runtime like the quantized
exports; nothing is written if it drifts (quant_check.THRESHOLDS["fp16"]).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import onnx

from edgevlm.export import cleanup, static_cache
from edgevlm.export.quantize import (FP16_KEEP_FP32, VISION_KEEP_FP32, _agreement, calibration_images,
                                     cast_decoder_fp16, cast_vision_fp16)
from edgevlm.manifest import OnnxArtifacts, write_manifest
from edgevlm.staging import staged_dir

def fp16_export(onnx_dir: str | Path, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Write the FP16 export of an FP32 one; returns the accuracy report in its manifest."""
    from edgevlm.export.quant_check import QuantizationError, check_quantized
    src = OnnxArtifacts.open(onnx_dir)
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        log("fp16: vision encoder (LayerNorm and softmax stay FP32)")
        cast_vision_fp16(src.path("vision_encoder"), tmp / "vision_encoder.onnx")
        log("fp16: decoder (norm reductions, softmax and lm_head stay FP32; FP16 KV cache IO)")
        cast_decoder_fp16(src.path("decoder"), tmp / "decoder.onnx", fp16_cache=True)
        files = {"vision_encoder": "vision_encoder.onnx", "decoder": "decoder.onnx",
                 "embed_tokens": src.manifest["files"]["embed_tokens"], "tokenizer": src.manifest["files"]["tokenizer"]}
        if "decoder_static" in src.manifest["files"]:
            log("fp16: the static-KV decoder, its weights shared with the concat one")
            cast_decoder_fp16(src.path("decoder_static"), tmp / "decoder.static.onnx", fp16_cache=True)
            static_cache.share_file_weights(tmp / "decoder.static.onnx", tmp / "decoder.onnx")
            files["decoder_static"] = "decoder.static.onnx"
        for key in ("vision_encoder", "decoder"):
            if (tmp / f"{key}.onnx.data").is_file():
                files[f"{key}_data"] = f"{key}.onnx.data"
        for key in ("embed_tokens", "tokenizer"):
            shutil.copy2(src.path(key), tmp / src.manifest["files"][key])
        io = {k: cleanup.io_specs(tmp / files[k]) for k in ("vision_encoder", "decoder", "decoder_static") if k in files}
        manifest = {k: v for k, v in src.manifest.items() if k not in ("format", "files", "sha256", "io", "opset", "created")}
        manifest.update(
            files=files, io=io,
            opset={k: cleanup.opset_of(onnx.load(str(tmp / files[k]), load_external_data=False))
                   for k in ("vision_encoder", "decoder")},
            quantization={"precision": "fp16", "tool": "onnxruntime.transformers.float16",
                          "vision_encoder": {"kept_fp32": VISION_KEEP_FP32},
                          "decoder": {"kept_fp32": FP16_KEEP_FP32, "kv_cache_io": "float16"},
                          "source_onnx": str(src.root.resolve()), "source_digest": src.digest},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_manifest(tmp, manifest, hashes=False)  # final one below
        log("fp16: checking against FP32 with ONNX Runtime")
        report = check_quantized(src.root, tmp, calibration_images(None))
        report.raise_if_failed("fp16")
        if "decoder_static" in files:  # the in-place twin gives the concat graph's logits
            cosine = _agreement(tmp / "decoder.onnx", tmp / "decoder.static.onnx", cfg=src.config, static=True,
                                table_path=tmp / files["embed_tokens"], tok_path=tmp / files["tokenizer"])
            if cosine < 0.99:
                raise QuantizationError(f"decoder.static.onnx drifts from decoder.onnx: logits cosine {cosine:.4f}")
            manifest["quantization"]["decoder"]["static_logits_cosine"] = round(cosine, 6)
        manifest["quantization"].update(accuracy=report.to_dict(), seconds=round(time.perf_counter() - t0, 1))
        write_manifest(tmp, manifest)
    return report.to_dict()

