"""Explicit (Q/DQ) quantization of an ONNX export with ONNX Runtime's quantization tools.

    int8   vision encoder W8A8 (weights per channel, activations per tensor, symmetric,
           MinMax-calibrated on real photos); decoder INT8 weight-only, per output channel
    int4   the same vision encoder; decoder INT4 weight-only, blocks of 128 along K,
           symmetric, round-to-nearest (RTN)

Only MatMuls with constant weights in the decoder are quantized: RMSNorm, RoPE, softmax and
the lm_head (a Gemm on the last position) stay FP32, so do LayerNorms in the vision tower.
Every graph is checked against FP32 with ONNX Runtime before it is written (see
quant_check.py). The output is a complete export directory (`onnx-int8/`, `onnx-int4/`)
that the cpu runners and the engine builder open like any other.

When the export has decoder.static.onnx (the in-place KV cache, see static_cache.py), its
quantized twin and FP16 copy are written too, their weights pointing at the concat graphs'
data files (the same bytes), so TensorRT 10.15+ builds the quantized decoder in place as well.

TensorRT: both forms are explicit Q/DQ with zero points 0. The INT8 decoder stays at opset 17
(per-axis DequantizeLinear) and the W8A8 vision encoder too; weight-only DQ feeding a MatMul
needs TensorRT 10. The INT4 decoder needs opset 21 (INT4 type, `block_size`), TensorRT 10+.
Tools: ONNX Runtime's quantize_static (vision); the decoder's weight-only passes are ours
(weight_only.py: INT4 with the same integers and scales as ONNX Runtime's quantizer, weights
converted one at a time, 16-bit-stored weights read as they are).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from edgevlm.export import cleanup, matmul_nbits, static_cache, weight_only
from edgevlm.export.isolated import run_isolated
from edgevlm.runtime.image import preprocess
from edgevlm.manifest import OnnxArtifacts, write_manifest
from edgevlm.staging import staged_dir

PRECISIONS = ("int8", "int4")
INT4_BLOCK = weight_only.INT4_BLOCK


def calibration_images(directory: str | Path | None = None, limit: int = 32) -> dict[str, bytes]:
    """Photos from a directory (JPEG/PNG/...), or scikit-image's bundled samples."""
    if directory is None:
        from edgevlm.samples import sample_images
        return sample_images()
    files = sorted(p for p in Path(directory).iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))[:limit]
    if not files:
        raise ValueError(f"{directory}: no calibration images (.jpg, .png, .webp, .bmp)")
    return {p.name: p.read_bytes() for p in files}


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantizers log on the root logger, chiefly the advice to run its
    pre-processing first, which does not apply to these graphs: errors only, while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_vision_w8a8(src: Path, dst: Path, images: Iterable[bytes], image_size: int) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    batches = [{"pixel_values": preprocess(img, image_size)[None]} for img in images]

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with _quiet_root_logger():
        quantize_static(str(src), str(dst), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Conv", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True,
                        # TensorRT takes symmetric Q/DQ only (zero point 0)
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def quantize_vision_cpu(src: Path, dst: Path) -> None:
    """The cpu target's vision encoder: int8 weights per channel (symmetric, as in the W8A8
    graph) and activations quantized per call to uint8 (ONNX Runtime's DynamicQuantizeMatMul:
    integer dot products, VNNI or AVX2). The W8A8 Q/DQ graph is TensorRT's form: on a CPU, ONNX
    Runtime leaves a third of its MatMuls in FP32 between Q/DQ pairs (attention and one
    projection per layer) and gains little over FP32; this form runs the weight MatMuls in int8
    and attention in FP32 (`make bench`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with _quiet_root_logger():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})  # attention stays FP32


def quantize_decoder_weights(src: Path, dst: Path, bits: int) -> None:
    """The decoder's weight MatMuls quantized, weight-only (weight_only.py)."""
    from edgevlm.export.quant_check import QuantizationError
    model = onnx.load(str(src), load_external_data=False)
    if bits == 4 and cleanup.opset_of(model) < 21:
        # INT4 needs opset 21; ReduceMean and Split change form on the way (weights not loaded
        # yet). The static decoder is at 24 already. Opset 17 stays for INT8: per-axis
        # DequantizeLinear exists since 13.
        model = onnx.version_converter.convert_version(model, 21)
    base = str(src.parent)  # each weight is read from there as it is quantized
    if not (weight_only.int8(model, base_dir=base) if bits == 8 else weight_only.int4(model, base_dir=base)):
        raise QuantizationError(f"{src.name}: no weight MatMuls to quantize")
    onnx.load_external_data_for_model(model, base)  # what stays as it was: norms, lm_head
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)


FP16_DQ_OPSET = 19  # DequantizeLinear takes FP16 scales from opset 19
# Kept FP32 in the FP16 copy: the norm reductions, softmax and the lm_head (a Gemm).
FP16_KEEP_FP32 = ["ReduceMean", "Pow", "Sqrt", "Reciprocal", "Softmax", "Gemm"]


def cast_decoder_fp16(src: Path, dst: Path, fp16_cache: bool = False, min_opset: int = 0,
                      fp32_io: tuple[str, ...] = ("inputs_embeds", "logits")) -> None:
    """An FP16 copy of the quantized decoder for strongly typed TensorRT 10 builds, where the
    graph's own types decide the math: activations and DQ scales in FP16 (so weight-only DQ
    feeds FP16 MatMuls), norms / softmax / lm_head in FP32, FP32 at the inputs and outputs.
    fp16_cache: the KV cache IO becomes FP16 too, as the static decoder needs (a Cast between
    the cache input and its TensorScatter would stop TensorRT updating it in place).
    min_opset: FP16 DequantizeLinear scales need opset 19, the lowest that has them, which
    TensorRT 10.0's parser documents (9..20); the INT4 decoders are at 21 already (INT4 type).
    fp32_io: with fp16_cache, the inputs and outputs kept FP32 (every other float one is FP16).
    ONNX Runtime's float16 converter does the rewrite."""
    from edgevlm.export.half import to_fp16
    keep = list(fp32_io) if fp16_cache else True
    to_fp16(src, dst, keep_io_types=keep, op_block_list=FP16_KEEP_FP32, min_opset=min_opset)


# Kept FP32 in the vision tower: its LayerNorms and attention softmax.
VISION_KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal"]


def cast_vision_fp16(src: Path, dst: Path, min_opset: int = 0) -> None:
    """An FP16 copy of a vision encoder: FP16 weights and activations (and Q/DQ scales, which
    need opset 19), LayerNorm and softmax FP32, FP32 pixels in and embeddings out. Strongly
    typed TensorRT builds run the graph's own types, so without it everything outside the
    quantized layers of the W8A8 graph would run in FP32."""
    from edgevlm.export.half import to_fp16
    to_fp16(src, dst, keep_io_types=True, op_block_list=VISION_KEEP_FP32, min_opset=min_opset)


def _embedding_cosine(a_path: Path, b_path: Path, size: int, images) -> float:
    """Minimum per-token cosine between two vision encoders' embeddings on real photos."""
    from edgevlm.runtime.onnxruntime import OrtVisionEncoder
    a, b, worst = OrtVisionEncoder(a_path), OrtVisionEncoder(b_path), 1.0
    for data in list(images)[:2]:
        px = preprocess(data, size)[None]
        x, y = a(px).astype(np.float64), b(px).astype(np.float64)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        worst = min(worst, float(cos.min()))
    return worst


def _agreement(quant: Path, other: Path, cfg, table_path: Path, tok_path: Path, static: bool = False) -> float:
    """Logits cosine, quantized decoder vs a derived graph (its FP16 copy, its static-KV twin),
    over a text prompt's prefill and 4 greedy decode steps."""
    from edgevlm.runtime.embedding import EmbeddingTable
    from edgevlm.runtime.onnxruntime import OrtDecoder
    from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
    from edgevlm.runtime.tokenizer import Tokenizer
    ids = tokenize_prompt(Tokenizer(tok_path), build_prompt("Name three colours.", image=False))
    table = EmbeddingTable(table_path)
    sides = []
    for decoder in (OrtDecoder(quant, cfg.text), OrtDecoder(other, cfg.text, static=static)):
        pool = decoder.open_pool(1, max_context=len(ids) + 4)
        sides.append((pool, pool.acquire(len(ids) + 4)))
    x, worst = table.embed(ids), 1.0
    for _ in range(5):
        a, b = (pool.prefill(row, x).astype(np.float64) for pool, row in sides)
        worst = min(worst, float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
        x = table.embed([int(np.argmax(a))])
    return worst


def quantize_export(onnx_dir: str | Path, out_dir: str | Path, precision: str, *,
                    calib_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Quantize an export; returns the accuracy report written into the manifest (the Q/DQ
    decoder's, with the cpu form's under "cpu_form")."""
    from edgevlm.export.quant_check import THRESHOLDS, QuantizationError, check_forms
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    src = OnnxArtifacts.open(onnx_dir)
    cfg = src.config
    images = calibration_images(calib_dir)
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        log(f"quantize: vision encoder W8A8, calibrated on {len(images)} photo(s)")
        quantize_vision_w8a8(src.path("vision_encoder"), tmp / "vision_encoder.onnx", images.values(),
                             cfg.vision.image_size)
        log("quantize: the cpu target's vision encoder: int8 weights, activations quantized per call")
        quantize_vision_cpu(src.path("vision_encoder"), tmp / "vision_encoder.cpu.onnx")
        log("quantize: FP16 copy of the vision encoder for strongly typed TensorRT builds")
        cast_vision_fp16(tmp / "vision_encoder.onnx", tmp / "vision_encoder.fp16.onnx", min_opset=FP16_DQ_OPSET)
        vision_cosine = _embedding_cosine(tmp / "vision_encoder.onnx", tmp / "vision_encoder.fp16.onnx",
                                          cfg.vision.image_size, images.values())
        if vision_cosine < 0.99:
            raise QuantizationError(f"vision_encoder.fp16.onnx drifts from the W8A8 encoder: cosine {vision_cosine:.4f}")
        video = "video_encoder" in src.manifest["files"]
        if video:  # run by ONNX Runtime in the serving process on every target: its cpu form only
            log("quantize: the video encoder as the cpu target's vision encoder (int8 weights, per call activations)")
            quantize_vision_cpu(src.path("video_encoder"), tmp / "video_encoder.cpu.onnx")
            video_cosine = _embedding_cosine(src.path("video_encoder"), tmp / "video_encoder.cpu.onnx",
                                             cfg.vision.image_size, images.values())
            if video_cosine < THRESHOLDS[precision]["image_cosine_min"]:
                raise QuantizationError(f"video_encoder.cpu.onnx drifts from the FP32 video encoder: "
                                        f"cosine {video_cosine:.4f}")
        bits = 8 if precision == "int8" else 4
        log(f"quantize: decoder INT{bits} weight-only" + (f", blocks of {INT4_BLOCK}" if bits == 4 else
                                                          ", per output channel"))
        quantize_decoder_weights(src.path("decoder"), tmp / "decoder.onnx", bits)
        log("quantize: FP16 copy of the decoder for strongly typed TensorRT builds")
        cast_decoder_fp16(tmp / "decoder.onnx", tmp / "decoder.fp16.onnx", min_opset=FP16_DQ_OPSET)
        static = "decoder_static" in src.manifest["files"]
        if static:
            log("quantize: the static-KV decoder (weights shared with the concat one) and its FP16 copy")
            quantize_decoder_weights(src.path("decoder_static"), tmp / "decoder.static.onnx", bits)
            static_cache.share_file_weights(tmp / "decoder.static.onnx", tmp / "decoder.onnx")
            cast_decoder_fp16(tmp / "decoder.static.onnx", tmp / "decoder.static.fp16.onnx", fp16_cache=True,
                              min_opset=FP16_DQ_OPSET)
            static_cache.share_file_weights(tmp / "decoder.static.fp16.onnx", tmp / "decoder.fp16.onnx")
        head_bits, head_block = matmul_nbits.LM_HEAD[bits]
        log(f"quantize: the cpu target's decoder: the same weights as MatMulNBits, lm_head {head_bits}-bit")
        cpu_counts = matmul_nbits.write_cpu_decoder(tmp / "decoder.onnx", tmp / "decoder.cpu.onnx", bits)
        if static:
            static_counts = matmul_nbits.write_cpu_decoder(tmp / "decoder.static.onnx", tmp / "decoder.static.cpu.onnx",
                                                           bits, static_text=cfg.text)
            static_cache.share_file_weights(tmp / "decoder.static.cpu.onnx", tmp / "decoder.cpu.onnx")
        carried = [k for k in ("embed_tokens", "tokenizer", "image_newline") if k in src.manifest["files"]]
        for key in carried:
            shutil.copy2(src.path(key), tmp / src.manifest["files"][key])
        table_path, tok_path = tmp / src.manifest["files"]["embed_tokens"], tmp / src.manifest["files"]["tokenizer"]

        def agree(quant: Path, other: Path, static: bool = False) -> float:
            # in a process of its own, as the gate's stages: two 7B decoders' arenas stayed in
            # this one and the gate's next form was OOM-killed beside them
            return run_isolated(_agreement, quant, other, cfg, table_path, tok_path, static)
        qdq = tmp / "decoder.onnx"
        cosines = {"decoder.fp16.onnx": agree(qdq, tmp / "decoder.fp16.onnx")}
        if static:
            cosines["decoder.static.onnx"] = agree(qdq, tmp / "decoder.static.onnx", static=True)
            cosines["decoder.static.fp16.onnx"] = agree(qdq, tmp / "decoder.static.fp16.onnx", static=True)
            # the served cpu twin (fused attention) against the concat one the gate checks
            cosines["decoder.static.cpu.onnx"] = agree(tmp / "decoder.cpu.onnx", tmp / "decoder.static.cpu.onnx",
                                                       static=True)
        for name, cosine in cosines.items():
            if cosine < 0.99:
                raise QuantizationError(f"{name} drifts from the quantized decoder: logits cosine {cosine:.4f}")
        manifest = {k: v for k, v in src.manifest.items() if k not in ("format", "files", "sha256", "io", "opset", "created")}
        files = {"vision_encoder": "vision_encoder.onnx", "decoder": "decoder.onnx",
                 **{k: src.manifest["files"][k] for k in carried}}
        files.update(decoder_fp16="decoder.fp16.onnx", vision_encoder_fp16="vision_encoder.fp16.onnx",
                     decoder_cpu="decoder.cpu.onnx", vision_encoder_cpu="vision_encoder.cpu.onnx")
        if static:
            files.update(decoder_static="decoder.static.onnx", decoder_static_fp16="decoder.static.fp16.onnx",
                         decoder_static_cpu="decoder.static.cpu.onnx")
        if video:
            files.update(video_encoder_cpu="video_encoder.cpu.onnx")
        for key, name in (("vision_encoder", "vision_encoder"), ("decoder", "decoder"), ("decoder_fp16", "decoder.fp16"),
                          ("vision_encoder_fp16", "vision_encoder.fp16"), ("decoder_cpu", "decoder.cpu"),
                          ("vision_encoder_cpu", "vision_encoder.cpu"), ("video_encoder_cpu", "video_encoder.cpu")):
            if (tmp / f"{name}.onnx.data").is_file():
                files[f"{key}_data"] = f"{name}.onnx.data"
        io = {k: cleanup.io_specs(tmp / f"{k}.onnx") for k in ("vision_encoder", "decoder")}
        if static:
            io["decoder_static"] = cleanup.io_specs(tmp / "decoder.static.onnx")
        manifest.update(
            files=files, io=io, weights={"storage": "quantized"},
            opset={"vision_encoder": cleanup.TARGET_OPSET, "decoder": cleanup.TARGET_OPSET if bits == 8 else 21},
            quantization={
                "precision": precision, "tool": "onnxruntime.quantization",
                "vision_encoder": {"scheme": "W8A8", "weights": "int8 per channel, symmetric",
                                   "activations": "int8 per tensor, symmetric, MinMax",
                                   "calibration_images": sorted(images),
                                   "fp16_copy": {"file": "vision_encoder.fp16.onnx", "keeps_fp32": VISION_KEEP_FP32,
                                                 "embedding_cosine": round(vision_cosine, 6)},
                                   "cpu_form": {"file": "vision_encoder.cpu.onnx", "op": "DynamicQuantizeMatMul",
                                                "weights": "int8 per channel, symmetric",
                                                "activations": "uint8 per tensor, quantized per call",
                                                "kept_fp32": ["attention", "LayerNorm", "QuickGelu"]}},
                **({"video_encoder": {"cpu_form": {"file": "video_encoder.cpu.onnx", "op": "DynamicQuantizeMatMul",
                                                   "embedding_cosine": round(video_cosine, 6)}}} if video else {}),
                "decoder": {"scheme": f"INT{bits} weight-only",
                            "weights": "per output channel, symmetric" if bits == 8 else
                            f"blocks of {INT4_BLOCK} along K, symmetric, round-to-nearest (RTN)",
                            "kept_fp32": ["RMSNorm", "RoPE", "softmax", "lm_head"],
                "fp16_copy": {"file": "decoder.fp16.onnx", "keeps_fp32": FP16_KEEP_FP32},
                "cpu_form": {"file": "decoder.cpu.onnx", "op": "com.microsoft.MatMulNBits",
                             "weights": "the same integers and scales", "rewritten": cpu_counts,
                             "lm_head": f"{head_bits}-bit, blocks of {head_block} "
                                        "along K, symmetric, round-to-nearest",
                             "accuracy_level": matmul_nbits.ACCURACY_LEVEL,
                             "static_attention": "com.microsoft.GroupQueryAttention per layer"
                             if static and static_counts.get("attention_fused") else "as exported"},
                # min logits cosine over a prefill and 4 decode steps vs decoder.onnx (the cpu static
                # twin: vs decoder.cpu.onnx)
                "derived_graphs_logits_cosine": {k: round(v, 6) for k, v in cosines.items()}},
                "source_onnx": str(src.root.resolve()), "source_digest": src.digest},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_manifest(tmp, manifest, hashes=False)  # final one below
        log("quantize: checking the Q/DQ graphs and the cpu target's forms against FP32 with ONNX Runtime")
        # the static graphs where the export has them: what the cpu target serves (the concat
        # twins agree with them, checked above), in a third of the KV memory
        decoders = ("decoder_static", "decoder_static_cpu") if static else ("decoder", "decoder_cpu")
        report, cpu_report = check_forms(src.root, tmp, images, [(decoders[0], "vision_encoder"),
                                                                 (decoders[1], "vision_encoder_cpu")])
        report.raise_if_failed(precision)  # nothing is left behind: the staged directory goes
        cpu_report.raise_if_failed(precision)
        manifest["quantization"]["decoder"]["cpu_form"]["accuracy"] = cpu_report.to_dict()
        manifest["quantization"].update(accuracy=report.to_dict(), seconds=round(time.perf_counter() - t0, 1))
        write_manifest(tmp, manifest)
    return {**report.to_dict(), "cpu_form": cpu_report.to_dict()}
