"""Shared by every model.py: read config.pbtxt parameters and make edgevlm importable.

One source file; `make repo` copies it beside each model.py (Triton puts a model's version
directory on sys.path).
"""

import json
import sys


def model_params(args) -> dict:
    params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
    src = params.get("edgevlm_src")
    if src and src not in sys.path:  # where edgevlm is not installed (e.g. a stock container)
        sys.path.append(src)
    return params
