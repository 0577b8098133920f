"""The real TensorRT Python bindings of one release, importable without TensorRT.

PyPI carries each release's pybind11 module (`tensorrt-bindings`, `tensorrt-cu12-bindings`):
the whole Python API, linked against libnvinfer & co., which cannot be installed here. A
stand-in library per missing soname, defining each symbol the module imports from them as a
function returning null, lets it import; every class, method, enum member and signature can
then be read. Nothing can be built or run with it: a Builder cannot even be created (its C
entry point returns null), and nothing here tries.

Wheels and stand-ins are cached under $EDGEVLM_CACHE (default ~/.cache/edgevlm), outside the
venv, so reruns download nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm")) / "trt-api"
SYSTEM_LIBS = ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libdl.so.2", "libpthread.so.0",
               "librt.so.1", "ld-linux-x86-64.so.2")


@dataclass(frozen=True)
class Release:
    name: str        # what the table and our Features call it
    package: str     # PyPI distribution of its Python bindings
    version: str
    why: str         # which devices run it

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


# The releases our TensorRT code claims, one row each (see README, "TensorRT releases").
RELEASES = (
    Release("8.6", "tensorrt-bindings", "8.6.1", "JetPack 6.0"),
    Release("10.3", "tensorrt-cu12-bindings", "10.3.0", "JetPack 6.1 / 6.2"),
    Release("10.16", "tensorrt-cu12-bindings", "10.16.1.11", "JetPack 7.2 on Orin"),
    Release("11.4", "tensorrt-cu12-bindings", "11.4.0.106", "the newest release"),
)


class BindingsError(RuntimeError):
    pass


def _wheel(rel: Release, log) -> Path:
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    prefix = rel.package.replace("-", "_") + f"-{rel.version}-"
    found = sorted(p for p in wheels.glob("*.whl") if p.name.startswith(prefix))
    if found:
        return found[0]
    log(f"trt-api: downloading {rel.package}=={rel.version} (once; cached in {wheels})")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheels), f"{rel.package}=={rel.version}"], capture_output=True, text=True)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.startswith(prefix))
    if r.returncode != 0 or not found:
        raise BindingsError(f"cannot download {rel.package}=={rel.version}: {(r.stderr or r.stdout).strip()[-300:]}")
    return found[0]


def _elf_needs(so: Path) -> tuple[list[str], list[str]]:
    """(needed sonames, undefined non-weak dynamic symbols) of a shared object, via binutils."""
    dyn = subprocess.run(["readelf", "-d", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].split("]", 1)[0] for line in dyn.splitlines() if "(NEEDED)" in line]
    syms = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True,
                          check=True).stdout
    undefined = [line.split()[-1].split("@")[0] for line in syms.splitlines() if line.split()[:1] == ["U"]]
    return needed, undefined


def _defined_by_system(symbol: str, libs: list) -> bool:
    return any(hasattr(lib, symbol) for lib in libs)


def _stand_ins(so: Path) -> None:
    """Beside the module ($ORIGIN is on its rpath): one library per missing soname, each
    defining every symbol the module needs that no system library has, returning null."""
    needed, undefined = _elf_needs(so)
    missing_libs = [n for n in needed if n not in SYSTEM_LIBS and ctypes.util.find_library(n.split(".so")[0][3:]) is None
                    and not (so.parent / n).is_file()]
    if not missing_libs:
        return
    system = [ctypes.CDLL(None)] + [ctypes.CDLL(n) for n in SYSTEM_LIBS if _loadable(n)]
    missing = sorted({s for s in undefined if not _defined_by_system(s, system)})
    src = so.parent / "stand_in.c"
    src.write_text("/* null stand-ins for the TensorRT libraries this machine cannot have */\n"
                   + "".join(f"void *{s}(void) {{ return 0; }}\n" for s in missing))
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BindingsError("no C compiler (cc) to build the stand-in libraries")
    for soname in missing_libs:
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(so.parent / soname), f"-Wl,-soname,{soname}", str(src)],
                       check=True, capture_output=True)


def _loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def prepare(rel: Release, log=print) -> Path:
    """The directory to put on sys.path so that `import tensorrt_bindings.tensorrt` works."""
    root = CACHE / "bindings" / rel.version
    so = root / "tensorrt_bindings" / "tensorrt.so"
    if not so.is_file():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(_wheel(rel, log)) as z:
            z.extractall(tmp)
        _stand_ins(tmp / "tensorrt_bindings" / "tensorrt.so")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


# Run in a fresh interpreter per release (two releases cannot share a process): import the
# bindings and describe them as JSON.
DESCRIBE = r'''
import inspect, json, re, sys
sys.path.insert(0, sys.argv[1])
# the package's __init__ looks for the libraries wheel; the module itself is all we need
import importlib.util
spec = importlib.util.spec_from_file_location("tensorrt", sys.argv[1] + "/tensorrt_bindings/tensorrt.so")
trt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trt)
SIG = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\)(?: -> (.+))?$")

def signatures(obj):
    out = []
    for line in (getattr(obj, "__doc__", None) or "").splitlines():
        m = SIG.match(line.strip())
        if not m:
            continue
        params = [p.split(":")[0].split("=")[0].strip() for p in re.split(r",\s*(?![^\[\]]*\])", m.group(2)) if p.strip()]
        ret = (m.group(3) or "").strip()
        out.append({"params": [p for p in params if p not in ("self", "*", "/", "*args", "**kwargs")],
                    "varkw": "**kwargs" in m.group(2), "returns": ret.removeprefix("tensorrt.")})
    return out

def member(obj):
    if isinstance(obj, property):
        return {"kind": "property"}
    if callable(obj):
        return {"kind": "method", "signatures": signatures(obj)}
    return {"kind": "value"}

api = {"__version__": sys.argv[2], "module": {}, "classes": {}}  # the package __init__ sets it, not the module
for name, obj in vars(trt).items():
    if name.startswith("__"):
        continue
    if inspect.isclass(obj):
        members = {}
        for klass in reversed(obj.__mro__):
            for m, v in vars(klass).items():
                if not m.startswith("__") or m == "__init__":
                    members[m] = member(v)
        api["classes"][name] = {"members": members,
                                "enum": sorted(getattr(obj, "__members__", {})),
                                "bases": [b.__name__ for b in obj.__mro__[1:]],
                                "init": signatures(obj.__init__) if "__init__" in vars(obj) else []}
        api["module"][name] = {"kind": "class"}
    else:
        api["module"][name] = member(obj)
# what the package's own __init__.py adds in Python (nptype, volume, ...): read, not run
import ast
tree = ast.parse(open(sys.argv[1] + "/tensorrt_bindings/__init__.py").read())
for node in tree.body:
    names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
        [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
    for name in names:
        api["module"].setdefault(name, {"kind": "method", "signatures": []})
json.dump(api, sys.stdout)
'''


def describe(rel: Release, log=print) -> dict:
    """The release's API as data: module names; per class its members (with pybind signatures:
    parameter names and return class), enum members and bases. Cached beside the bindings."""
    root = prepare(rel, log)
    cached = root / "api.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    r = subprocess.run([sys.executable, "-c", DESCRIBE, str(root), rel.version], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise BindingsError(f"TensorRT {rel.version} bindings did not import: {r.stderr.strip()[-500:]}")
    api = json.loads(r.stdout)
    cached.write_text(json.dumps(api))
    return api
