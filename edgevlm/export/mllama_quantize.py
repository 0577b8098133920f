"""Llama-3.2-Vision's precision exports, each checked against FP32:

  fp16       what strongly typed TensorRT (10, 11) builds fp16 engines from: FP16 weights and
             activations in all four graphs, the norm reductions, softmax and lm_head FP32;
             the self-attention cache and the image's K/V cross the graph boundary in FP16
             (half of a row's memory on the device), pixels, embeddings, the cross mask and
             the logits in FP32.
  int8/int4  weight-only text decoder: its weight MatMuls (self- and cross-attention
             projections, MLPs) quantized as the other families' are (quantize.py: per output
             channel for INT8, blocks of 128 along K for INT4, symmetric, round-to-nearest), in
             both forms: explicit Q/DQ (TensorRT's) and the cpu target's MatMulNBits twin. The
             vision encoder and the cross-attention K/V graph are carried over in FP32: they
             run once per image, and the K/V they make is what every later token attends to.
             FP16 copies of all four graphs go beside them for strongly typed TensorRT builds.

The gate runs each export the way serving does (its own vision encoder and K/V graph, the KV
pool, the checkpoint's prompt) on the sample photos and a text-only prompt: the image's K/V
must stay close to FP32's (cosine over the real tiles), and the decoder, fed the FP32 greedy
tokens, must keep its logits close (cosine) and pick the same next token often enough
(quant_check.THRESHOLDS); an export that fails is not written.
"""

from __future__ import annotations

import filecmp
import gc
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgevlm.export import cleanup, matmul_nbits, static_cache
from edgevlm.export.half import to_fp16
from edgevlm.export.isolated import run_isolated
from edgevlm.export.mllama_parity import ServedDecoder
from edgevlm.export.parity import QUESTION, TEXT_ONLY
from edgevlm.export.quant_check import STEPS, QuantReport, _cosine, _size_mb, weights_stem
from edgevlm.export.quantize import (FP16_DQ_OPSET, FP16_KEEP_FP32, INT4_BLOCK, PRECISIONS, VISION_KEEP_FP32,
                                     calibration_images, cast_decoder_fp16, cast_vision_fp16,
                                     quantize_decoder_weights)
from edgevlm.manifest import OnnxArtifacts, write_manifest
from edgevlm.runtime.cross_attention import CrossImage
from edgevlm.runtime.cross_requests import CrossImageEncoder, CrossPreprocessor
from edgevlm.staging import staged_dir

TEXT_FILES = ("embed_tokens", "tokenizer", "tokenizer_config", "chat_template")
GRAPHS = ("vision_encoder", "cross_kv", "decoder", "decoder_static")
# FP32 at the FP16 decoder's boundary: what the runtime writes and reads as FP32 anyway
DECODER_FP32_IO = ("inputs_embeds", "logits", "cross_mask", "has_image")


@dataclass
class _Case:
    """One prompt of the check, with its image's inputs and the FP32 export's answer."""
    ids: list[int]
    image: object = None        # the prepared image (tiles, arrangement, mask), None: text only
    want: np.ndarray = None     # FP32's logits over STEPS positions, fed its own greedy tokens
    fp32_cross: object = None   # the FP32 export's CrossRow for the image


# Image positions (every tile slot's) the check encodes per form, over its photos: up to 4
# photos, fewer when each is long (at 11B a picture is 6404 positions through a 0.9B vision
# encoder, minutes on a CPU: two photos), never fewer than one.
CROSS_POSITIONS = 13000


def _crosses(root: Path, keys: tuple[str, str], cases: list[_Case]) -> list:
    """Each case's CrossRow (None: text only) from the export's two image graphs, which are
    released on return: at 11B they are not in memory beside a decoder."""
    pre = CrossPreprocessor(root)
    encoder, out = CrossImageEncoder(root, keys=keys), []
    real = pre.cfg.vision.tile_tokens
    for case in cases:
        if case.image is None:
            out.append(None)
            continue
        kv, _ = encoder(case.image.pixel_values)
        out.append(pre.attach(case.ids, [CrossImage([a[0] for a in kv], case.image.tiles, real)])["cross"])
    del encoder
    gc.collect()
    return out


def _check(fp32_dir: Path, quant_dir: Path, forms: dict[str, tuple[str, str]],
           images: dict[str, bytes]) -> dict[str, QuantReport]:
    """Each form of the export at quant_dir (its decoder key -> its two image graphs' keys)
    against the FP32 export, as served. The FP32 graphs run once for every form; they and each
    form run in a process of their own (isolated.py: at 11B the 16-bit-stored FP32 decoder
    maps 19 GB of this machine's 24 GiB, and a released session keeps its arenas)."""
    pre = CrossPreprocessor(fp32_dir)
    cases, positions = [], 0
    for data in [*list(images.values())[:4], None]:
        inputs = {"prompt": np.array([(QUESTION if data else TEXT_ONLY).encode()], dtype=object)}
        if data is not None:
            if positions + pre.cfg.cross_length > CROSS_POSITIONS and positions:
                continue
            positions += pre.cfg.cross_length
            inputs["image"] = np.array([data], dtype=object)
        prepared = pre.from_inputs(inputs)
        cases.append(_Case(prepared.input_ids.tolist(), prepared.image if data is not None else None))
    cases = run_isolated(_fp32_answers, fp32_dir, cases)
    return {key: run_isolated(_measure, fp32_dir, quant_dir, key, keys, cases) for key, keys in forms.items()}


def _fp32_answers(fp32_dir: Path, cases: list[_Case]) -> list[_Case]:
    """The cases with the FP32 export's image K/V and its logits over its own greedy tokens."""
    for case, cross in zip(cases, _crosses(fp32_dir, ("vision_encoder", "cross_kv"), cases)):
        case.fp32_cross = cross
    ref = ServedDecoder(fp32_dir, "decoder_static")
    for case in cases:
        case.want = ref.logits(case.ids, case.fp32_cross, STEPS)
    return cases


def _carried(fp32_dir: Path, quant_dir: Path, keys: tuple[str, str]) -> bool:
    """Are the form's image graphs the FP32 export's, copied unchanged (size and mtime kept)?"""
    src, dst = OnnxArtifacts.open(fp32_dir), OnnxArtifacts.open(quant_dir)
    names = [k for key in keys for k in (key, f"{key}_data")]
    have = [k for k in names if k in src.manifest["files"]]
    return (have == [k for k in names if k in dst.manifest["files"]]
            and all(filecmp.cmp(src.path(k), dst.path(k), shallow=True) for k in have))


def _measure(fp32_dir: Path, quant_dir: Path, decoder_key: str, encoder_keys: tuple[str, str],
             cases: list[_Case]) -> QuantReport:
    # image graphs carried over from FP32 make its K/V: computing it again is minutes at 11B
    crosses = ([case.fp32_cross for case in cases] if _carried(fp32_dir, quant_dir, encoder_keys)
               else _crosses(quant_dir, encoder_keys, cases))
    quant = ServedDecoder(quant_dir, decoder_key)
    real = quant.cfg.vision.tile_tokens
    report, agree, top5, cosines, image_cosines = QuantReport(), [], [], [], []
    for case, cross in zip(cases, crosses):
        if cross is not None:
            n = case.image.tiles * real  # the real tiles' positions
            for a, b in zip(case.fp32_cross.image.kv, cross.image.kv):
                image_cosines.extend(_cosine(a[:, :n], b[:, :n]))
        want = case.want
        got = quant.logits(case.ids, cross, STEPS, [int(r.argmax()) for r in want[:-1]])
        cosines.extend(_cosine(want, got))
        agree.extend(got.argmax(-1) == want.argmax(-1))
        top5.extend(int(w.argmax()) in np.argsort(g)[-5:] for w, g in zip(want, got))
        report.logits_max_abs_err = max(report.logits_max_abs_err, float(np.abs(want - got).max()))
        report.logits_max_abs = max(report.logits_max_abs, float(np.abs(want).max()))
        same = bool((got.argmax(-1) == want.argmax(-1)).all())
        report.greedy_identical += same
        report.first_divergence.append(-1 if same else int(np.flatnonzero(got.argmax(-1) != want.argmax(-1))[0]))
        report.cases += 1
    report.image_cosine_min = float(min(image_cosines))
    report.image_cosine_mean = float(np.mean(image_cosines))
    report.logits_cosine_min = float(min(cosines))
    report.teacher_forced_agreement = float(np.mean(agree))
    report.teacher_forced_top5 = float(np.mean(top5))
    files = OnnxArtifacts.open(quant_dir).manifest["files"]
    report.size_mb = {"decoder_fp32": _size_mb(fp32_dir, "decoder"),
                      "decoder": _size_mb(quant_dir, weights_stem(files, decoder_key)),
                      "vision_fp32": _size_mb(fp32_dir, "vision_encoder"),
                      "vision": _size_mb(quant_dir, weights_stem(files, encoder_keys[0]))}
    return report


def _fp16_graphs(sources: dict[str, Path], tmp: Path, suffix: str = "", min_opset: int = 0,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """FP16 copies of the four graphs (GRAPHS -> their source files) as tmp/<name><suffix>.onnx;
    returns the manifest's files for them (keys with the suffix's `_fp16` when it has one)."""
    stems = {"vision_encoder": "vision_encoder", "cross_kv": "cross_kv", "decoder": "decoder",
             "decoder_static": "decoder.static"}
    names = {key: f"{stems[key]}{suffix}.onnx" for key in GRAPHS}
    log("fp16: vision encoder (LayerNorm and softmax FP32), cross-attention K/V (its norm FP32)")
    cast_vision_fp16(sources["vision_encoder"], tmp / names["vision_encoder"], min_opset=min_opset)
    to_fp16(sources["cross_kv"], tmp / names["cross_kv"], keep_io_types=["cross_states"],
            op_block_list=FP16_KEEP_FP32, min_opset=min_opset)
    log("fp16: decoders (norm reductions, softmax and lm_head FP32; FP16 caches and image K/V)")
    for key in ("decoder", "decoder_static"):
        cast_decoder_fp16(sources[key], tmp / names[key], fp16_cache=True, min_opset=min_opset,
                          fp32_io=DECODER_FP32_IO)
    static_cache.share_file_weights(tmp / names["decoder_static"], tmp / names["decoder"])
    key_of = {key: key + ("_fp16" if suffix else "") for key in GRAPHS}
    out = {key_of[key]: names[key] for key in GRAPHS}
    for key in ("vision_encoder", "cross_kv", "decoder"):
        if (tmp / f"{names[key]}.data").is_file():
            out[f"{key_of[key]}_data"] = f"{names[key]}.data"
    return out


def _carry(src: OnnxArtifacts, tmp: Path, keys) -> dict[str, str]:
    files = {}
    for key in keys:
        for k in (key, f"{key}_data"):
            if k in src.manifest["files"]:
                shutil.copy2(src.path(k), tmp / src.manifest["files"][k])
                files[k] = src.manifest["files"][k]
    return files


def _base_manifest(src: OnnxArtifacts, tmp: Path, files: dict[str, str]) -> dict:
    manifest = {k: v for k, v in src.manifest.items() if k not in ("format", "files", "sha256", "io", "created")}
    manifest.update(files=files, io={k: cleanup.io_specs(tmp / files[k]) for k in GRAPHS})
    return manifest


def fp16_mllama(onnx_dir: str | Path, out_dir: str | Path, *, calib_dir: str | Path | None = None,
                log: Callable[[str], None] = print) -> dict:
    """The FP16 export of a Llama-3.2-Vision FP32 one; returns its accuracy report."""
    src = OnnxArtifacts.open(onnx_dir)
    images = calibration_images(calib_dir)
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        files = _carry(src, tmp, TEXT_FILES)
        files.update(_fp16_graphs({key: src.path(key) for key in GRAPHS}, tmp, log=log))
        manifest = _base_manifest(src, tmp, files)
        write_manifest(tmp, manifest, hashes=False)  # provisional: lets the check open it
        log(f"fp16: checking the served graphs against FP32 ({len(images)} photos and a text-only prompt)")
        report = _check(src.root, tmp, {"decoder_static": ("vision_encoder", "cross_kv")}, images)["decoder_static"]
        report.raise_if_failed("fp16")  # nothing is left behind: the staged directory goes
        manifest["quantization"] = {
            "precision": "fp16", "source_onnx": str(src.root.resolve()), "source_digest": src.digest,
            "kept_fp32": {"vision_encoder": VISION_KEEP_FP32, "cross_kv": FP16_KEEP_FP32, "decoder": FP16_KEEP_FP32},
            "fp32_io": {"vision_encoder": "pixels in, states out", "cross_kv": ["cross_states"],
                        "decoder": list(DECODER_FP32_IO)},
            "accuracy": {"decoder_static": report.to_dict()}, "seconds": round(time.perf_counter() - t0, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_manifest(tmp, manifest)
        log(report.summary("fp16"))
    return report.to_dict()


def quantize_mllama(onnx_dir: str | Path, out_dir: str | Path, precision: str, *, calib_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> dict:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    src = OnnxArtifacts.open(onnx_dir)
    bits = 8 if precision == "int8" else 4
    images = calibration_images(calib_dir)
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        files = _carry(src, tmp, ("vision_encoder", "cross_kv", *TEXT_FILES))
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
        log("quantize: FP16 copies of the four graphs for strongly typed TensorRT builds")
        sources = {"vision_encoder": src.path("vision_encoder"), "cross_kv": src.path("cross_kv"),
                   "decoder": tmp / "decoder.onnx", "decoder_static": tmp / "decoder.static.onnx"}
        files.update(_fp16_graphs(sources, tmp, suffix=".fp16", min_opset=FP16_DQ_OPSET, log=log))
        manifest = _base_manifest(src, tmp, files)
        manifest["weights"] = {"storage": "quantized"}
        write_manifest(tmp, manifest, hashes=False)  # provisional: lets the check open it
        log(f"quantize: checking the served decoders and the FP16 copies against FP32 ({len(images)} photos "
            "and a text-only prompt)")
        checks = {"decoder_static_cpu": ("vision_encoder", "cross_kv"), "decoder_static": ("vision_encoder", "cross_kv"),
                  "decoder_static_fp16": ("vision_encoder_fp16", "cross_kv_fp16")}
        reports = _check(src.root, tmp, checks, images)
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
            "fp16_copies": {key: files[f"{key}_fp16"] for key in GRAPHS},
            "accuracy": {key: r.to_dict() for key, r in reports.items()},
            "seconds": round(time.perf_counter() - t0, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_manifest(tmp, manifest)
        log("quantize: " + reports["decoder_static_cpu"].summary(precision))
    return {key: r.to_dict() for key, r in reports.items()}
