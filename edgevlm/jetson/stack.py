"""The software each JetPack release pairs with edgevlm: its TensorRT and CUDA, the Triton image
that serves it, and the cuda-python that talks to its driver. The Dockerfile's build arguments,
jetson/compose.yaml's defaults, `make jetson-doctor` and the README's table come from here.

Why pins: cuda-python's runtime bindings need a driver at least as new as their CUDA version;
`cuda-python>=12,<13` resolves to 12.9.x, which JetPack 6's CUDA 12.6 driver refuses with
cudaErrorInsufficientDriver (error 35; seen on AGX Orin with JetPack 6.1), and 13.x needs a 580+
driver. So each JetPack gets the cuda-python of its own CUDA.

Why 24.08 for JetPack 6.1 / 6.2: its release notes base it on CUDA 12.6, JetPack 6.1/6.2's own,
with TensorRT 10.3 as JetPack 6.1/6.2 ship it. Why NVIDIA_DISABLE_REQUIRE: the same notes ask for
driver 560 or later in desktop numbering, and the image checks that at start; JetPack 6.2.1's
540.4.0 fails it although the CUDA versions match (triton-inference-server/server#8536, #7798).
"""

from __future__ import annotations

from dataclasses import dataclass


class StackError(ValueError):
    pass


@dataclass(frozen=True)
class Stack:
    jetpack: str
    l4t: str
    cuda: str
    tensorrt: str
    triton_image: str | None   # None: no container for this JetPack we could verify
    cuda_python: str           # pip requirement
    note: str = ""


STACKS = (
    Stack("6.0", "36.3.0", "12.2", "8.6", None, "cuda-python==12.2.*",
          note="no igpu Triton image verified for JetPack 6.0 here; TensorRT 8.6 builds weakly typed engines "
               "(no INT4); JetPack 6.1 or newer is the tested path"),
    Stack("6.1", "36.4.0", "12.6", "10.3", "nvcr.io/nvidia/tritonserver:24.08-py3-igpu", "cuda-python==12.6.*"),
    Stack("6.2", "36.4.3", "12.6", "10.3", "nvcr.io/nvidia/tritonserver:24.08-py3-igpu", "cuda-python==12.6.*"),
    Stack("6.2.1", "36.4.4", "12.6", "10.3", "nvcr.io/nvidia/tritonserver:24.08-py3-igpu", "cuda-python==12.6.*"),
    Stack("7.2.1", "39.2.1", "13.2", "10.16", None, "cuda-python==13.2.*",
          note="Triton 26.02 was the last Jetson (igpu) release; 26.03 names the SBSA arm64 image for Jetson "
               "AGX, unverified on Orin: serve from the device venv (`make setup` there) with a Triton "
               "built for it, or verify that image"),
)
UNSUPPORTED = {
    "5": "JetPack 5's TensorRT 8.5 cannot parse the vision encoder (onnx-tensorrt lists LayerNormalization "
         "as unsupported in 8.5) and Triton publishes no igpu container for it (igpu images need JetPack 6); "
         "flash JetPack 6.1 or newer",
}


def stack_for(jetpack: str | None) -> Stack:
    if not jetpack:
        raise StackError("unknown JetPack (no /etc/nv_tegra_release: set EDGEVLM_JETPACK, or mount the file)")
    for s in STACKS:
        if s.jetpack == jetpack:
            return s
    major_minor = ".".join(jetpack.split(".")[:2])
    for key, why in UNSUPPORTED.items():
        if jetpack == key or major_minor == key or jetpack.split(".")[0] == key:
            raise StackError(f"JetPack {jetpack}: {why}")
    newer = [s for s in STACKS if s.jetpack.split(".")[:2] == jetpack.split(".")[:2]]
    if newer:
        return newer[-1]
    raise StackError(f"JetPack {jetpack} is not one edgevlm has been set up for "
                     f"({', '.join(s.jetpack for s in STACKS)})")


def docker_build_args(jetpack: str) -> dict[str, str]:
    """The Dockerfile's build arguments for this JetPack."""
    s = stack_for(jetpack)
    if s.triton_image is None:
        raise StackError(f"JetPack {jetpack}: no verified Triton container. {s.note}")
    return {"TRITON_IMAGE": s.triton_image, "CUDA_PYTHON": s.cuda_python}


def main(argv=None) -> int:
    """`python -m edgevlm.jetson.stack [--requirement]`: this device's stack, or only its
    cuda-python requirement (what `make setup` installs on the device)."""
    import argparse
    import sys

    from edgevlm.jetson.device import detect
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--requirement", action="store_true", help="print only the cuda-python requirement")
    args = ap.parse_args(argv)
    try:
        s = stack_for(detect().jetpack)
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 2
    if args.requirement:
        print(s.cuda_python)
    else:
        print(f"JetPack {s.jetpack}: L4T {s.l4t}, CUDA {s.cuda}, TensorRT {s.tensorrt}, "
              f"TRITON_IMAGE={s.triton_image or '(none verified)'} CUDA_PYTHON='{s.cuda_python}'"
              + (f"\n  {s.note}" if s.note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
