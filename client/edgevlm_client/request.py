"""What crosses the wire: request tensors for `mobilevlm`, and what comes back.

Shared by the sync and asyncio clients, so both send exactly the same requests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from edgevlm_client.contract import (BY_NAME, CANCEL, MAX_IMAGES, MAX_VIDEO_BYTES, PARAMETERS, RESPONSE_FORMATS,
                                     value_reason)
from edgevlm_client.errors import IncompleteAnswer, InvalidRequest
from edgevlm_client.images import image_bytes

_NP = {"BYTES": object, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


@dataclass
class Result:
    """A finished answer: its text and the server's stats (see `timing_line`)."""
    text: str
    stats: dict = field(default_factory=dict)
    response_format: dict | None = None  # what the answer was constrained to, if anything
    logprobs: list[dict] | None = None  # with logprobs=k: each token's (contract.LOGPROBS)

    @property
    def parsed(self):
        """The answer as a program wants it: the object of a json_schema or json_object answer
        (parsed), the text of a regex or choice one. Raises IncompleteAnswer when max_tokens
        cut it short (finish_reason "length"), so a truncated answer is never half-used."""
        if self.finish_reason == "length" and self.response_format is not None:
            raise IncompleteAnswer(f"the answer was cut at max_tokens ({self.tokens} tokens) before it matched "
                                   f"its {self.response_format['type']}: ask for more max_tokens")
        if self.response_format is not None and self.response_format["type"] in ("json_schema", "json_object"):
            return json.loads(self.text)
        return self.text

    @property
    def tool_calls(self) -> list[dict]:
        """With tools: the calls the answer made ({"id", "name", "arguments": JSON text}), or []."""
        return self.stats.get("tool_calls") or []

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
    image_tokens: int         # context tokens one image takes, at most
    default_max_tokens: int
    max_sequences: int        # streams decoded at once; more wait their turn
    inputs: dict[str, str]    # input name -> Triton datatype
    image_tokens_min: int = 0  # at least (LLaVA-1.6's count depends on the picture's size)
    family: str = ""          # mobilevlm, llava or mllama (Llama-3.2-Vision: images by cross-attention)
    template: str = ""        # the prompt template it serves (contract.TEMPLATES)

    @classmethod
    def from_triton(cls, metadata: dict, config: dict) -> ModelInfo:
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        number = lambda key: int(params.get(key) or 0)  # noqa: E731
        return cls(name=metadata["name"], versions=list(metadata.get("versions", [])),
                   model_name=params.get("model_name", ""), max_context=number("max_context"),
                   image_size=number("image_size"), image_tokens=number("image_tokens"),
                   default_max_tokens=number("default_max_tokens"), max_sequences=number("max_sequences"),
                   inputs={t["name"]: t["datatype"] for t in metadata.get("inputs", [])},
                   image_tokens_min=number("image_tokens_min") or number("image_tokens"),
                   family=params.get("family", ""), template=params.get("template", ""))


def _tensor(name: str, value) -> grpcclient.InferInput:
    dtype = BY_NAME[name].datatype
    arr = np.array(value if isinstance(value, list) else [value], dtype=_NP[dtype])
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _clip(video) -> bytes:
    """A clip's bytes: given, read from a path, or encoded from a list of frames (clips.py)."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
    elif isinstance(video, (list, tuple)):
        from edgevlm_client.clips import encode_clip
        data = encode_clip(video)
    else:
        try:
            data = Path(video).read_bytes()
        except OSError as e:
            raise InvalidRequest(f"cannot read video {video}: {e.strerror}") from e
    if not data:
        raise InvalidRequest("video: empty")
    if len(data) > MAX_VIDEO_BYTES:
        raise InvalidRequest(f"video is {len(data)} bytes, over the {MAX_VIDEO_BYTES} limit")
    return data


def build_inputs(prompt: str, image=None, *, system: str | None = None, raw_prompt: bool = False,
                 history: Sequence[tuple[str, str]] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 min_tokens: int | None = None, ignore_eos: bool | None = None, logprobs: int | None = None,
                 stop: Sequence[str] | str | None = None, response_format: dict | None = None,
                 tools: Sequence[dict] | None = None, tool_choice: str | None = None,
                 parallel_tool_calls: bool | None = None, template: str | None = None, video=None,
                 video_frames: int | None = None) -> list[grpcclient.InferInput]:
    """Request tensors; options left as None take the server's defaults. image: one image (a
    path, bytes, a PIL image or an array) or a list of them, each at its `<image>` placeholder
    in order (contract IMAGES). response_format: see `response_format()`."""
    inputs = [_tensor("prompt", prompt.encode("utf-8"))]
    if image is not None:
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not 1 <= len(images) <= MAX_IMAGES:
            raise InvalidRequest(f"{len(images)} images: a request holds 1 to {MAX_IMAGES}")
        inputs.append(_tensor("image", [image_bytes(i) for i in images]))
    if system is not None:
        inputs.append(_tensor("system", system.encode("utf-8")))
    if raw_prompt:
        inputs.append(_tensor("raw_prompt", True))
    if template is not None:
        inputs.append(_tensor("template", template.encode("utf-8")))
    if video is not None:  # a clip: a path or its bytes (the server decodes it)
        inputs.append(_tensor("video", _clip(video)))
    if video_frames is not None:
        why = value_reason(BY_NAME["video_frames"], video_frames)
        if why:
            raise InvalidRequest(why)
        inputs.append(_tensor("video_frames", video_frames))
    if history:
        inputs.append(_tensor("history", json.dumps([list(t) for t in history]).encode("utf-8")))
    options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, seed=seed, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, min_tokens=min_tokens, ignore_eos=ignore_eos,
                   logprobs=logprobs)
    for param in PARAMETERS:
        value = options[param.name]
        if value is not None:
            why = value_reason(param, value)  # as sent, before numpy converts (and wraps) it
            if why:
                raise InvalidRequest(why)
            inputs.append(_tensor(param.name, value))
    if stop:
        stop = [stop] if isinstance(stop, str) else list(stop)
        inputs.append(_tensor("stop", [s.encode("utf-8") for s in stop]))
    if response_format is not None:
        inputs.append(_tensor("response_format", json.dumps(response_format).encode("utf-8")))
    if tools is not None:  # OpenAI's `tools` list; its functions' parameters are JSON Schemas
        inputs.append(_tensor("tools", json.dumps(list(tools)).encode("utf-8")))
    if tool_choice is not None:
        inputs.append(_tensor("tool_choice", tool_choice.encode("utf-8")))
    if parallel_tool_calls is not None:
        why = value_reason(BY_NAME["parallel_tool_calls"], parallel_tool_calls)
        if why:
            raise InvalidRequest(why)
        inputs.append(_tensor("parallel_tool_calls", parallel_tool_calls))
    return inputs


def response_format(json_schema: dict | None = None, json_object: bool = False, regex: str | None = None,
                    choices: Sequence[str] | None = None) -> dict | None:
    """The response_format of the wire contract from the client's keyword options (at most
    one): json_schema (a JSON Schema dict), json_object=True (any object), regex (the whole
    answer matches it), choices (exactly one of these strings)."""
    given = {k: v for k, v in (("json_schema", json_schema), ("json_object", json_object or None),
                               ("regex", regex), ("choice", choices)) if v is not None}
    if len(given) > 1:
        raise InvalidRequest(f"constrain the answer one way, not {len(given)}: {', '.join(given)}")
    if not given:
        return None
    (kind, value), = given.items()
    key = RESPONSE_FORMATS[kind]
    return {"type": kind} if key is None else {"type": kind, key: list(value) if kind == "choice" else value}


def split_options(options: dict) -> tuple[dict, dict | None]:
    """(request options, response_format) from a call's keyword options."""
    keys = ("json_schema", "json_object", "regex", "choices")
    fmt = response_format(**{k: options.pop(k) for k in keys if k in options})
    if fmt is not None and options.get("response_format") is not None:
        raise InvalidRequest("give response_format or json_schema / json_object / regex / choices, not both")
    fmt = fmt if fmt is not None else options.pop("response_format", None)
    return options, fmt


def read_logprobs(result) -> list[dict]:
    """One streamed response's logprobs entries (contract.LOGPROBS); empty without the option."""
    if result is None or not result.get_response().outputs:
        return []
    data = result.as_numpy("logprobs")
    return json.loads(data[0]) if data is not None and data[0] else []


def read_response(result) -> tuple[str, dict]:
    """One streamed response -> (text delta, stats); stats are empty except on the last one,
    or on the one before a refusal (then stats[contract.STATS_ERROR] holds its status)."""
    if result is None or not result.get_response().outputs:
        return "", {}
    delta = result.as_numpy("text")[0].decode("utf-8")
    stats = result.as_numpy("stats")[0]
    return delta, (json.loads(stats) if stats else {})


def new_request_id() -> str:
    """A request id a cancel message can name: random, so no other stream's id collides."""
    return uuid.uuid4().hex


def cancel_inputs(request_id: str) -> list[grpcclient.InferInput]:
    """A cancel message for the generation sent with `request_id` (contract.CANCEL)."""
    return [_tensor(CANCEL, request_id.encode("utf-8"))]


def cancel_wait_s(timeout_s: float) -> float:
    """How long a client waits for a cancelled generation's final response before it cancels
    at the gRPC level: the server ends it at its next step (a prompt's prefill, at worst), so
    the wait for any response (timeout_s), but never less than 10 s."""
    return max(timeout_s, 10.0)


def is_final(result) -> bool:
    """The last response of its request."""
    return result.get_response().parameters["triton_final_response"].bool_param
