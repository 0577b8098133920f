"""manifest.json: what a build directory holds, how it was made, and its tensor contract.

Build stages write it last (inside their staged directory); every consumer (verify, the
Triton models, the engine builder) opens artifacts through `OnnxArtifacts`, which checks it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgevlm.presets import ModelConfig, config_from_dict

MANIFEST = "manifest.json"
FORMAT = 1


class ManifestError(ValueError):
    pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MiB at a time: a 5 GB weights file never sits in memory
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path, data: dict, hashes: bool = True) -> None:
    """Written last by every stage. Where it lists `files`, it also records each one's SHA-256:
    what later stages (engines, the repository check) identify an export by. hashes=False for a
    provisional manifest that only lets a check open the directory before the final one."""
    if "files" in data and hashes:
        data = {**data, "sha256": {key: file_sha256(Path(root) / name) for key, name in data["files"].items()}}
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
        return config_from_dict(self.manifest["model"])

    @property
    def digest(self) -> str:
        """One SHA-256 over the hashes of every file of this export: two exports of the same
        checkpoint (another opset, another quantization) differ here."""
        hashes = self.manifest.get("sha256")
        if not hashes:
            raise ManifestError(f"{self.root}: this export records no file hashes (made by an older "
                                "version); run `make onnx` again")
        return hashlib.sha256("".join(f"{k} {hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()

    def path(self, key: str) -> Path:
        files = self.manifest["files"]
        if key not in files:  # an export from before that file existed
            raise ManifestError(f"{self.root}: this export has no {key} file; run `make onnx` again")
        return self.root / files[key]
