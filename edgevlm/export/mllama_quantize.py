"""Llama-3.2-Vision: weight-only INT8 / INT4 of the text decoder, checked against FP32.

The decoder's weight MatMuls (self- and cross-attention projections, MLPs) are quantized as the
other families' are (quantize.py: per output channel for INT8, blocks of 128 along K for INT4,
symmetric, round-to-nearest), in both forms: explicit Q/DQ (TensorRT's) and the cpu target's
MatMulNBits twin. The vision encoder and the cross-attention K/V graph are carried over in
FP32: they run once per image, and the K/V they make is what every later token attends to.

The gate runs both exports the way serving does (the image's K/V, the KV pool, the
checkpoint's prompt) on the sample photos and a text-only prompt: the quantized decoder is fed
the FP32 greedy tokens and must keep their logits close (cosine) and pick the same next token
often enough (quant_check.THRESHOLDS); a graph that fails is not written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgevlm.export import cleanup, matmul_nbits, static_cache
from edgevlm.export.mllama_parity import ServedDecoder
from edgevlm.export.parity import QUESTION, TEXT_ONLY
from edgevlm.export.quant_check import STEPS, QuantReport, _cosine, _size_mb
from edgevlm.export.quantize import INT4_BLOCK, PRECISIONS, calibration_images, quantize_decoder_weights
from edgevlm.manifest import OnnxArtifacts, write_manifest
from edgevlm.runtime.cross_attention import CrossImage
from edgevlm.runtime.cross_requests import CrossImageEncoder, CrossPreprocessor
from edgevlm.staging import staged_dir

CARRIED = ("vision_encoder", "cross_kv", "embed_tokens", "tokenizer", "tokenizer_config", "chat_template")


def _check(fp32_dir: Path, quant_dir: Path, decoder_key: str, images: dict[str, bytes]) -> QuantReport:
    pre = CrossPreprocessor(fp32_dir)
    encoder = CrossImageEncoder(fp32_dir)
    ref, quant = ServedDecoder(fp32_dir, "decoder_static"), ServedDecoder(quant_dir, decoder_key)
    report, agree, top5, cosines = QuantReport(), [], [], []
    for data in [*images.values(), None]:
        inputs = {"prompt": np.array([(QUESTION if data else TEXT_ONLY).encode()], dtype=object)}
        if data is not None:
            inputs["image"] = np.array([data], dtype=object)
        prepared = pre.from_inputs(inputs)
        ids = prepared.input_ids.tolist()
        cross = None
        if data is not None:
            kv, _ = encoder(prepared.pixel_values)
            cross = pre.attach(ids, CrossImage([a[0] for a in kv], prepared.tiles, ref.cfg.vision.tile_tokens))["cross"]
        want = ref.logits(ids, cross, STEPS)  # FP32's greedy continuation, fed to the quantized one
        got = quant.logits(ids, cross, STEPS, [int(r.argmax()) for r in want[:-1]])
        cosines.extend(_cosine(want, got))
        agree.extend(got.argmax(-1) == want.argmax(-1))
        top5.extend(int(w.argmax()) in np.argsort(g)[-5:] for w, g in zip(want, got))
        report.logits_max_abs_err = max(report.logits_max_abs_err, float(np.abs(want - got).max()))
        report.logits_max_abs = max(report.logits_max_abs, float(np.abs(want).max()))
        same = bool((got.argmax(-1) == want.argmax(-1)).all())
        report.greedy_identical += same
        report.first_divergence.append(-1 if same else int(np.flatnonzero(got.argmax(-1) != want.argmax(-1))[0]))
        report.cases += 1
    report.logits_cosine_min = float(min(cosines))
    report.teacher_forced_agreement = float(np.mean(agree))
    report.teacher_forced_top5 = float(np.mean(top5))
    report.size_mb = {"decoder_fp32": _size_mb(fp32_dir, "decoder"), "decoder": _size_mb(quant_dir, "decoder.cpu"),
                      "vision_fp32": _size_mb(fp32_dir, "vision_encoder"), "vision": _size_mb(quant_dir, "vision_encoder")}
    return report


def quantize_mllama(onnx_dir: str | Path, out_dir: str | Path, precision: str, *, calib_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> dict:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    src = OnnxArtifacts.open(onnx_dir)
    bits = 8 if precision == "int8" else 4
    images = calibration_images(calib_dir)
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        files = {}
        for key in CARRIED:
            name = src.manifest["files"][key]
            shutil.copy2(src.path(key), tmp / name)
            files[key] = name
            if f"{key}_data" in src.manifest["files"]:
                shutil.copy2(src.path(f"{key}_data"), tmp / src.manifest["files"][f"{key}_data"])
                files[f"{key}_data"] = src.manifest["files"][f"{key}_data"]
        log(f"quantize: decoder INT{bits} weight-only (Q/DQ, TensorRT's form), concat and static KV")
        quantize_decoder_weights(src.path("decoder"), tmp / "decoder.onnx", bits)
        quantize_decoder_weights(src.path("decoder_static"), tmp / "decoder.static.onnx", bits)
        static_cache.share_file_weights(tmp / "decoder.static.onnx", tmp / "decoder.onnx")
        log("quantize: the cpu target's decoders: the same weights as MatMulNBits")
        counts = matmul_nbits.write_cpu_decoder(tmp / "decoder.onnx", tmp / "decoder.cpu.onnx", bits)
        matmul_nbits.write_cpu_decoder(tmp / "decoder.static.onnx", tmp / "decoder.static.cpu.onnx", bits)
        static_cache.share_file_weights(tmp / "decoder.static.cpu.onnx", tmp / "decoder.cpu.onnx")
        files.update(decoder="decoder.onnx", decoder_data="decoder.onnx.data", decoder_static="decoder.static.onnx",
                     decoder_cpu="decoder.cpu.onnx", decoder_cpu_data="decoder.cpu.onnx.data",
                     decoder_static_cpu="decoder.static.cpu.onnx")
        manifest = {k: v for k, v in src.manifest.items() if k not in ("format", "files", "sha256", "io", "created")}
        manifest.update(files=files, io={k: cleanup.io_specs(tmp / files[k]) for k in
                                         ("vision_encoder", "cross_kv", "decoder", "decoder_static")},
                        weights={"storage": "quantized"})
        write_manifest(tmp, manifest, hashes=False)  # provisional: lets the check open it
        log(f"quantize: checking the served decoders against FP32 ({len(images)} photos and a text-only prompt)")
        reports = {key: _check(src.root, tmp, key, images) for key in ("decoder_static_cpu", "decoder_static")}
        for report in reports.values():
            report.raise_if_failed(precision)  # nothing is left behind: the staged directory goes
        manifest["quantization"] = {
            "precision": precision, "source_onnx": str(src.root.resolve()), "source_digest": src.digest,
            "decoder": {"scheme": f"INT{bits} weight-only",
                        "weights": "per output channel, symmetric" if bits == 8 else
                        f"blocks of {INT4_BLOCK} along K, symmetric, round-to-nearest",
                        "cpu_form": {"file": "decoder.static.cpu.onnx", "op": "com.microsoft.MatMulNBits",
                                     "rewritten": counts}},
            "vision_encoder": "FP32 (carried over)", "cross_kv": "FP32 (carried over)",
            "accuracy": {key: r.to_dict() for key, r in reports.items()},
            "seconds": round(time.perf_counter() - t0, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_manifest(tmp, manifest)
        log("quantize: " + reports["decoder_static_cpu"].summary(precision))
    return {key: r.to_dict() for key, r in reports.items()}
