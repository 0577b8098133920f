"""The tree's promises: what runs inside Triton never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every module of the packages Triton loads, imported in a fresh interpreter; the device-only
# ones (TensorRT, CUDA) may be absent here, nothing else may fail.
PROBE = """
import importlib, pkgutil, sys
import edgevlm.runtime, edgevlm.serve
device_only = {"tensorrt", "cuda"}
for pkg in (edgevlm.runtime, edgevlm.serve):
    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        if m.name.endswith(".__main__"):  # runs the CLI; cli.py is imported instead
            continue
        try:
            importlib.import_module(m.name)
        except ImportError as e:
            if e.name is None or e.name.split(".")[0] not in device_only:
                raise
heavy = sorted(n for n in ("torch", "transformers", "onnx", "onnxscript", "onnx_graphsurgeon")
               if n in sys.modules)
print(",".join(heavy))
"""


def test_runtime_and_serve_import_without_torch():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing edgevlm.runtime / edgevlm.serve loaded {r.stdout.strip()}"


def test_triton_models_import_only_the_runtime():
    """model.py adapters reach edgevlm through runtime/ (numpy), never model/ or export/."""
    for path in (ROOT / "model_repository").rglob("*.py"):
        for line in path.read_text().splitlines():
            if "import" in line and "edgevlm." in line:
                assert "edgevlm.runtime" in line, f"{path.relative_to(ROOT)}: {line.strip()}"



def test_no_import_cycles_inside_edgevlm():
    """The graph of imports inside the package, read from the source, has no cycle (a package
    and its own submodules aside): the tree reads in one direction, leaves first."""
    from tools.imports import cycles
    found = cycles()
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_readme_is_a_front_door_and_no_doc_line_is_over_120_characters():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250, "README.md: depth goes to docs/"
    for doc in [ROOT / "README.md", ROOT / "client" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        long = [i for i, line in enumerate(doc.read_text().splitlines(), 1) if len(line) > 120]
        assert not long, f"{doc.relative_to(ROOT)}: lines {long} are over 120 characters"
