"""Shared by every model.py: read config.pbtxt parameters, make edgevlm importable, and turn
an exception into a Triton error whose status code says whose fault it was.

One source file; `make repo` copies it beside each model.py (Triton puts a model's version
directory on sys.path).
"""

import json
import os
import sys

import numpy as np

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
    """A composing model failed (sent on as INTERNAL). Python-backend BLS hands its error back
    as INTERNAL whatever code it was sent with (triton-inference-server/server#7804), so only
    composing models whose failures are server faults (vision_encoder) are called through BLS."""


def status_of(exc, model):
    """(Triton status name, one-line reason) for `exc`: a RequestError (edgevlm.runtime.errors)
    keeps its own status, anything else is INTERNAL (and logged)."""
    status = getattr(exc, "status", None)
    if status in ("INVALID_ARG", "UNAVAILABLE"):
        return status, str(exc)
    pb_utils.Logger.log_error(f"{model}: {type(exc).__name__}: {exc}")
    return "INTERNAL", f"{model}: {type(exc).__name__}: {exc}"


def triton_error(exc, model):
    """The TritonError to answer `exc` with, its code set by status_of."""
    status, reason = status_of(exc, model)
    return pb_utils.TritonError(reason, getattr(pb_utils.TritonError, status))


def send_error(sender, exc, model):
    """End a decoupled stream with `exc`. Triton delivers a streamed error as its message
    only (its status-code header crashes tritonserver 2.51), so the status goes first in the
    `stats` of one response (edgevlm_client.contract.STATS_ERROR), then the error itself."""
    status, reason = status_of(exc, model)
    stats = json.dumps({"error": {"status": status, "message": reason}}).encode()
    sender.send(pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([b""], dtype=object)),
        pb_utils.Tensor("stats", np.array([stats], dtype=object))]))
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(reason, getattr(pb_utils.TritonError, status))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
