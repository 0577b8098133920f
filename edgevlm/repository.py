"""Render model_repository/ into a Triton model repository for one target.

    cpu     vision_encoder and generate run the ONNX graphs with ONNX Runtime
    jetson  the same models run TensorRT engines built on the device by `make engines`

Both targets share the configs and the tensor contract; only parameters differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from string import Template

from edgevlm.image import DEFAULT_MAX_PIXELS
from edgevlm.manifest import ManifestError, OnnxArtifacts, read_manifest
from edgevlm.staging import staged_dir

SOURCE = Path(__file__).resolve().parents[1] / "model_repository"
MODELS = ("mobilevlm", "preprocess", "vision_encoder")
TARGETS = ("cpu", "jetson")


def check_engines(engine_dir: Path, art: OnnxArtifacts) -> None:
    """The engines must have been built from these ONNX graphs."""
    m = read_manifest(engine_dir)
    if m.get("kind") != "tensorrt":
        raise ManifestError(f"{engine_dir}: not a TensorRT engine directory (kind {m.get('kind')!r})")
    if m.get("onnx_sha256") != art.manifest["source"]["sha256"]:
        raise ManifestError(f"{engine_dir}: engines were built from another export "
                            "(checkpoint hash differs); run `make engines` again")


def render_repository(onnx_dir: str | Path, out_dir: str | Path, target: str = "cpu", *,
                      engine_dir: str | Path | None = None, max_sequences: int = 4,
                      default_max_tokens: int = 256, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    art = OnnxArtifacts.open(onnx_dir)
    cfg = art.config
    if target == "jetson":
        if engine_dir is None:
            raise ManifestError("the jetson target needs engines: run `make engines` on the Orin")
        engine_dir = Path(engine_dir).resolve()
        check_engines(engine_dir, art)
    values = {
        "image_size": cfg.vision.image_size, "image_tokens": cfg.image_tokens,
        "hidden_size": cfg.text.hidden_size, "onnx_dir": str(art.root.resolve()),
        "engine_dir": str(engine_dir or ""), "runner": "tensorrt" if target == "jetson" else "onnxruntime",
        "max_sequences": max_sequences, "default_max_tokens": default_max_tokens,
        "max_image_pixels": max_image_pixels, "preprocess_instances": 1,
        "edgevlm_src": str(SOURCE.parent),
    }
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        for model in MODELS:
            shutil.copytree(SOURCE / model, tmp / model, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(SOURCE / "_shared" / "model_params.py", tmp / model / "1")
            config = tmp / model / "config.pbtxt"
            config.write_text(Template(config.read_text()).substitute(values))
    return out_dir
