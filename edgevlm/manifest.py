"""manifest.json: what a build directory holds, how it was made, and its tensor contract.

Build stages write it last (inside their staged directory); every consumer (verify, the
Triton models, the engine builder) opens artifacts through `OnnxArtifacts`, which checks it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevlm.presets import ModelConfig

MANIFEST = "manifest.json"
FORMAT = 1


class ManifestError(ValueError):
    pass


def write_manifest(root: Path, data: dict) -> None:
    (root / MANIFEST).write_text(json.dumps({"format": FORMAT, **data}, indent=2) + "\n")


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST} (run `make onnx` first)")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path}: manifest format {data.get('format')!r}, this build reads {FORMAT}")
    return data


@dataclass
class OnnxArtifacts:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> OnnxArtifacts:
        root = Path(root)
        art = cls(root, read_manifest(root))
        missing = [f for f in art.manifest["files"].values() if not (root / f).is_file()]
        if missing:
            raise ManifestError(f"{root}: manifest lists missing file(s): {', '.join(missing)}")
        return art

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    def path(self, key: str) -> Path:
        files = self.manifest["files"]
        if key not in files:  # an export from before that file existed
            raise ManifestError(f"{self.root}: this export has no {key} file; run `make onnx` again")
        return self.root / files[key]
