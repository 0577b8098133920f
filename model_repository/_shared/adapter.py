"""Shared by every model.py: read config.pbtxt parameters, make edgevlm importable, and turn
an exception into a Triton error whose status code says whose fault it was.

One source file; `make repo` copies it beside each model.py (Triton puts a model's version
directory on sys.path).
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils


def model_params(args) -> dict:
    params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
    src = params.get("edgevlm_src")
    # where edgevlm and its client package are not installed (e.g. a stock Triton container)
    for path in filter(None, (src, src and os.path.join(src, "client"))):
        if path not in sys.path:
            sys.path.append(path)
    return params


class ComposedModelError(RuntimeError):
    """A composing model failed. Python-backend BLS hands its error back as INTERNAL whatever
    code it was sent with (triton-inference-server/server#7804), so only composing models
    whose failures are server faults (vision_encoder) are called through BLS."""


def bls(model, inputs, outputs):
    """Run a composing model; its failure raises ComposedModelError (sent on as INTERNAL)."""
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                         requested_output_names=outputs).exec()
    if response.has_error():
        raise ComposedModelError(response.error().message())
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]


def triton_error(exc, model):
    """The TritonError to send for `exc`: a RequestError (edgevlm.runtime.errors) with its own
    status, anything else INTERNAL (and logged)."""
    status = getattr(exc, "status", None)
    if status in ("INVALID_ARG", "UNAVAILABLE"):
        return pb_utils.TritonError(str(exc), getattr(pb_utils.TritonError, status))
    pb_utils.Logger.log_error(f"{model}: {type(exc).__name__}: {exc}")
    return pb_utils.TritonError(f"{model}: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
