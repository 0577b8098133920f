"""make trt-api: our TensorRT code against the real Python API of every release we claim.

    python -m tools.trt_api [--release 10.3] [--exports artifacts/NAME/onnx ...]

One line per release; exit 1 if any name, enum member or keyword our code uses on that
release's path is missing there (bindings.py: how the real module is read without TensorRT;
uses.py: what is checked), or if a graph `make engines` would hand that release has an
operator or opset its ONNX parser does not take (graphs.py, onnx_ops.py). Exports checked:
those named, else every artifacts/*/onnx present.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgevlm.engines.features import Features
from tools.trt_api import graphs
from tools.trt_api.bindings import RELEASES, BindingsError, describe
from tools.trt_api.uses import Checker, files_using_tensorrt, shadow_module

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("edgevlm", "build", "tools")


def check_release(rel, files: list[Path], log=print) -> Checker:
    api = describe(rel, log)
    checker = Checker(api, Features.of(shadow_module(api)), rel.name)
    for path in files:
        checker.check_file(path, str(path.relative_to(ROOT)))
    return checker


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", action="append", help="only these (e.g. 10.3); default: all")
    ap.add_argument("--exports", action="append", type=Path,
                    help="FP32 export directories whose graphs to check (default: artifacts/*/onnx)")
    args = ap.parse_args(argv)
    exports = args.exports or sorted(p for p in (ROOT / "artifacts").glob("*/onnx") if (p / "manifest.json").is_file())
    t0 = time.perf_counter()
    files = list(files_using_tensorrt([ROOT / d for d in SCANNED]))
    failed = False
    for rel in RELEASES:
        if args.release and rel.name not in args.release:
            continue
        try:
            checker = check_release(rel, files, log=lambda m: print(m, flush=True))
        except BindingsError as e:
            print(f"trt-api: {rel.name}: cannot read the bindings: {e}", file=sys.stderr)
            failed = True
            continue
        r, f = checker.report, checker.features
        n_graphs, graph_problems = 0, []
        for export in exports:
            n, found = graphs.problems(export, rel.version, f)
            n_graphs += n
            graph_problems += [f"{export.parent.name}: {p}" for p in found]
        gates = ", ".join(k for k in ("strongly_typed", "weak_typing", "int4", "inplace_kv") if getattr(f, k))
        bad = len(r.misses) + len(graph_problems)
        print(f"trt-api: TensorRT {rel.version:<11} ({rel.why}; {gates}): {r.checked} uses in "
              f"{len(r.files)} files, {n_graphs} graphs: {'OK' if not bad else f'{bad} PROBLEMS'}", flush=True)
        for problem in [*map(str, r.misses), *graph_problems]:
            print(f"  {problem}", flush=True)
        failed |= bool(bad)
    print(f"trt-api: {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
