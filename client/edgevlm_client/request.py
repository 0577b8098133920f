"""What crosses the wire: request tensors for `mobilevlm`, and what comes back.

Shared by the sync and asyncio clients, so both send exactly the same requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

from edgevlm_client.contract import BY_NAME, PARAMETERS
from edgevlm_client.images import image_bytes

_NP = {"BYTES": object, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


@dataclass
class Result:
    """A finished answer: its text and the server's stats (see `timing_line`)."""
    text: str
    stats: dict = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        """"stop" (end of answer or a stop string) or "length" (max_tokens reached)."""
        return self.stats.get("finish_reason", "")

    @property
    def tokens(self) -> int:
        """Generated tokens."""
        return int(self.stats.get("decode_tokens", 0))

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens the model read, image embeddings included."""
        return int(self.stats.get("prefill_tokens", 0))


@dataclass
class ModelInfo:
    """What the server says about the model it serves."""
    name: str                 # the Triton model clients call ("mobilevlm")
    versions: list[str]
    model_name: str           # the checkpoint behind it (e.g. "mobilevlm-v2-1.7b")
    max_context: int          # tokens: prompt, image embeddings and answer together
    image_size: int           # the vision tower's input side, pixels
    image_tokens: int         # context tokens one image takes
    default_max_tokens: int
    max_sequences: int        # streams decoded at once; more wait their turn
    inputs: dict[str, str]    # input name -> Triton datatype

    @classmethod
    def from_triton(cls, metadata: dict, config: dict) -> ModelInfo:
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        number = lambda key: int(params.get(key) or 0)  # noqa: E731
        return cls(name=metadata["name"], versions=list(metadata.get("versions", [])),
                   model_name=params.get("model_name", ""), max_context=number("max_context"),
                   image_size=number("image_size"), image_tokens=number("image_tokens"),
                   default_max_tokens=number("default_max_tokens"), max_sequences=number("max_sequences"),
                   inputs={t["name"]: t["datatype"] for t in metadata.get("inputs", [])})


def _tensor(name: str, value) -> grpcclient.InferInput:
    dtype = BY_NAME[name].datatype
    arr = np.array(value if isinstance(value, list) else [value], dtype=_NP[dtype])
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def build_inputs(prompt: str, image=None, *, system: str | None = None, raw_prompt: bool = False,
                 history: Sequence[tuple[str, str]] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | str | None = None) -> list[grpcclient.InferInput]:
    """Request tensors; options left as None take the server's defaults."""
    inputs = [_tensor("prompt", prompt.encode("utf-8"))]
    if image is not None:
        inputs.append(_tensor("image", image_bytes(image)))
    if system is not None:
        inputs.append(_tensor("system", system.encode("utf-8")))
    if raw_prompt:
        inputs.append(_tensor("raw_prompt", True))
    if history:
        inputs.append(_tensor("history", json.dumps([list(t) for t in history]).encode("utf-8")))
    options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, seed=seed)
    for param in PARAMETERS:
        if options[param.name] is not None:
            inputs.append(_tensor(param.name, options[param.name]))
    if stop:
        stop = [stop] if isinstance(stop, str) else list(stop)
        inputs.append(_tensor("stop", [s.encode("utf-8") for s in stop]))
    return inputs


def read_response(result) -> tuple[str, dict]:
    """One streamed response -> (text delta, stats); stats are empty except on the last one,
    or on the one before a refusal (then stats[contract.STATS_ERROR] holds its status)."""
    if result is None or not result.get_response().outputs:
        return "", {}
    delta = result.as_numpy("text")[0].decode("utf-8")
    stats = result.as_numpy("stats")[0]
    return delta, (json.loads(stats) if stats else {})
