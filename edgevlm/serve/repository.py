"""Render model_repository/ into a Triton model repository for one target.

    cpu     vision_encoder and mobilevlm run the ONNX graphs with ONNX Runtime
    jetson  the same models run TensorRT engines built on the device by `make engines`

Both targets share the configs and the tensor contract; only parameters differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from string import Template

from edgevlm_client import contract
from edgevlm_client.contract import MAX_IMAGE_PIXELS
from edgevlm.manifest import ManifestError, OnnxArtifacts, read_manifest
from edgevlm.runtime.runners import kv_layout
from edgevlm.staging import staged_dir

SOURCE = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = ("mobilevlm", "vision_encoder")
TARGETS = ("cpu", "jetson")


def device_tag() -> str:
    """`<TensorRT version>-sm<compute capability>` of this machine, the engine folder name.

    EDGEVLM_TRT_VERSION / EDGEVLM_SM override detection (tests, cross-checks)."""
    from edgevlm.jetson.device import detect
    d = detect()
    if not d.tensorrt:
        raise ManifestError("no TensorRT on this machine: run `make engines` and `make repo "
                            "TARGET=jetson` on the Orin, or pass ENGINES=dir")
    if not d.sm:
        raise ManifestError("cannot tell the GPU's compute capability (no device tree, no cuda-python); "
                            "set EDGEVLM_SM=87 on an Orin or pass ENGINES=")
    return d.tag


def select_engines(onnx_root: Path) -> Path:
    """The engine folder beside the export that was built for this device."""
    root = Path(onnx_root).parent / "engines"
    tag = device_tag()
    if not (root / tag).is_dir():
        have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise ManifestError(f"no engines for this device ({tag}) in {root}"
                            + (f"; found {', '.join(have)}" if have else "") + ": run `make engines`")
    return root / tag


def check_engines(engine_dir: Path, art: OnnxArtifacts, tag: str | None = None) -> None:
    """The engines must be TensorRT engines built from these ONNX graphs (for this device)."""
    m = read_manifest(engine_dir)
    if m.get("kind") != "tensorrt":
        raise ManifestError(f"{engine_dir}: not a TensorRT engine directory (kind {m.get('kind')!r})")
    if m.get("onnx_sha256") not in _exports_served_with(art, m.get("precision", "fp16")):
        raise ManifestError(f"{engine_dir}: engines were built from another export "
                            "(the ONNX files' hash differs); run `make engines` again")
    if tag is not None and m.get("device_tag") != tag:
        raise ManifestError(f"{engine_dir}: engines are for {m.get('device_tag')!r}, "
                            f"this device is {tag!r}; run `make engines` here")


def _exports_served_with(art: OnnxArtifacts, precision: str) -> set[str]:
    """Digests of the exports engines may come from when `art` is served: `art` itself (fp16
    engines on TensorRT 8.x), or the export beside it that was made from `art` for that
    precision (`onnx-fp16/`, `onnx-int8/`, `onnx-int4/`)."""
    digests = {art.digest}
    quantized = art.root.parent / f"onnx-{precision}"
    if (quantized / "manifest.json").is_file():
        q = OnnxArtifacts.open(quantized)
        if q.manifest.get("quantization", {}).get("source_digest") == art.digest:
            digests.add(q.digest)
    return digests


BATCHING = ("continuous", "off")
# Cache defaults, modest for an 8 GB Orin: 512 MiB holds ~1,300 positions of 1.7B FP32 KV
# (2,600 in FP16: several conversations about a frame); 64 MiB holds ~50 images' embeddings.
PREFIX_CACHE_MIB = 512
IMAGE_CACHE_MIB = 64


def _template(art: OnnxArtifacts, name: str | None) -> str:
    """The layout the model serves: the export's, or one named (checked now, not at load)."""
    from edgevlm.runtime.prompt import check_template
    default = art.config.template
    if name is None or name == default:
        return default
    if art.config.cross_length:
        raise ManifestError(f"{art.config.name}: prompts come from its checkpoint's chat template; "
                            f"TEMPLATE={name} is not for it")
    try:
        return check_template(name, "chat_template" in art.manifest["files"])
    except ValueError as e:
        raise ManifestError(f"TEMPLATE={name}: {e}") from None


def render_repository(onnx_dir: str | Path, out_dir: str | Path, target: str = "cpu", *,
                      engine_dir: str | Path | None = None, max_sequences: int = 8,
                      default_max_tokens: int = 256, max_image_pixels: int = MAX_IMAGE_PIXELS,
                      kv_cache: str = "auto", batching: str = "continuous", max_queue: int | None = None,
                      prefill_chunk: int = 64, kv_budget_mib: int = 0,
                      prefix_cache_mib: int = PREFIX_CACHE_MIB, image_cache_mib: int = IMAGE_CACHE_MIB,
                      template: str | None = None) -> Path:
    """kv_cache (cpu target): "concat" (decoder.onnx), "static" (decoder.static.onnx, one
    in-place cache buffer per tensor: half the KV memory) or "auto" (static where the export
    has it). Jetson engines record their own. batching: "continuous" (max_sequences rows
    decoded together) or "off" (one sequence at a time: what make bench compares with); max_queue defaults to twice max_sequences. prefix_cache_mib
    and image_cache_mib size the caches (0: off). template: the prompt layout served by default
    instead of the export's (contract.TEMPLATES)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if batching not in BATCHING:
        raise ValueError(f"unknown batching {batching!r}; use one of {', '.join(BATCHING)}")
    if max_sequences < 1 or prefill_chunk < 1 or min(kv_budget_mib, prefix_cache_mib, image_cache_mib) < 0 \
            or (max_queue is not None and max_queue < 0):
        raise ValueError("max_sequences and prefill_chunk must be at least 1; max_queue, kv_budget_mib, "
                         "prefix_cache_mib and image_cache_mib at least 0")
    art = OnnxArtifacts.open(onnx_dir)
    cfg = art.config
    kv_cache = kv_layout(art, kv_cache)
    if cfg.cross_length and target == "jetson":
        raise ManifestError(f"{cfg.name}: the jetson target does not serve cross-attention models yet (make "
                            "engines builds their engines, the TensorRT runner for them is not written); "
                            "serve it with TARGET=cpu")
    if cfg.cross_length and kv_cache == "concat":
        raise ManifestError(f"{cfg.name}: KV=concat is not built for cross-attention models; use KV=static (or auto)")
    template = _template(art, template)
    max_context = cfg.text.max_position
    if target == "jetson":
        tag = None
        if engine_dir is None:
            engine_dir = select_engines(art.root)  # this device's folder, by TensorRT + SM
            tag = device_tag()
        engine_dir = Path(engine_dir).resolve()
        check_engines(engine_dir, art, tag)
        engines = read_manifest(engine_dir)
        max_context = min(max_context, engines.get("max_context", max_context))  # MAX_CONTEXT=
        kv_cache = engines.get("kv_cache", "concat")
    values = {
        "image_size": cfg.vision.image_size, "tile_tokens": cfg.image_tokens,
        # the most context positions one image takes, and the fewest (they differ for LLaVA-1.6's
        # anyres; a cross-attention model's image takes one, its <|image|> token)
        "image_tokens": 1 if cfg.cross_length else cfg.max_image_tokens,
        "image_tokens_min": 1 if cfg.cross_length else cfg.image_tokens,
        "hidden_size": cfg.text.hidden_size, "onnx_dir": str(art.root.resolve()),
        "engine_dir": str(engine_dir or ""), "runner": "tensorrt" if target == "jetson" else "onnxruntime",
        "max_sequences": max_sequences, "default_max_tokens": default_max_tokens,
        "batching": batching, "max_queue": 2 * max_sequences if max_queue is None else max_queue,
        "prefill_chunk": prefill_chunk, "kv_budget_mib": kv_budget_mib,
        "prefix_cache_mib": prefix_cache_mib, "image_cache_mib": image_cache_mib,
        "max_image_pixels": max_image_pixels,
        "edgevlm_src": str(SOURCE.parent),
        "inputs": contract.pbtxt(contract.INPUTS), "outputs": contract.pbtxt(contract.OUTPUTS),
        "model_name": cfg.name, "family": cfg.family, "max_context": max_context, "kv_cache": kv_cache,
        "template": template,
    }
    out_dir = Path(out_dir)
    # a cross-attention model encodes its images in process (runtime/cross_requests.py)
    models = MODELS[:1] if cfg.cross_length else MODELS
    with staged_dir(out_dir) as tmp:
        for model in models:
            shutil.copytree(SOURCE / model, tmp / model, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(SOURCE / "_shared" / "adapter.py", tmp / model / "1")
            config = tmp / model / "config.pbtxt"
            config.write_text(Template(config.read_text()).substitute(values))
    return out_dir
