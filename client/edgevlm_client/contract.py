"""The wire contract of the `mobilevlm` model, written once.

Tensor names, Triton datatypes, shapes, defaults and limits of every input and output, the
image formats the server decodes, and which Triton status code means what. The server
(request checking, the rendered config.pbtxt), the client (request tensors, local checks,
typed errors) and the README all read this module; a test compares it with what a running
tritonserver reports. Pure Python: the server imports it without tritonclient or numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODEL = "mobilevlm"


@dataclass(frozen=True)
class Limit:
    """A numeric range; `open_low` excludes the lower end (top_p > 0)."""
    low: float
    high: float | None = None
    open_low: bool = False

    def reason(self, name: str, value) -> str | None:
        """None when `value` is in range, else the one-line reason."""
        ok = math.isfinite(value) and (value > self.low if self.open_low else value >= self.low) \
            and (self.high is None or value <= self.high)
        if ok:
            return None
        if self.high is None:
            return f"{name} must be >= {_num(self.low)}, got {value}"
        return f"{name} must be in {'(' if self.open_low else '['}{_num(self.low)}, {_num(self.high)}], got {value}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str             # Triton's: BYTES, BOOL, INT32, INT64, FP32
    dims: tuple[int, ...]     # -1: any length
    doc: str
    optional: bool = True
    default: object = None    # what the server assumes when the input is absent
    limit: Limit | None = None


# Generation parameters: the scalars every request may set, with the server's defaults.
# max_tokens' default is the repository's `default_max_tokens` (256 unless rendered otherwise).
PARAMETERS = (
    Tensor("max_tokens", "INT32", (1,), "most tokens to generate", default=256, limit=Limit(1, 1_000_000)),
    Tensor("temperature", "FP32", (1,), "0 is greedy", default=0.0, limit=Limit(0.0, 100.0)),
    Tensor("top_p", "FP32", (1,), "nucleus mass", default=1.0, limit=Limit(0.0, 1.0, open_low=True)),
    Tensor("top_k", "INT32", (1,), "0 is no limit", default=0, limit=Limit(0)),
    Tensor("repetition_penalty", "FP32", (1,), "1 is none", default=1.0,
           limit=Limit(0.0, 10.0, open_low=True)),
    Tensor("seed", "INT64", (1,), "reproducible sampling", default=None, limit=Limit(0)),
    # OpenAI's definitions: minus penalty x (times generated so far), minus penalty if generated at all
    Tensor("presence_penalty", "FP32", (1,), "0 is none; > 0 favours new tokens", default=0.0,
           limit=Limit(-2.0, 2.0)),
    Tensor("frequency_penalty", "FP32", (1,), "0 is none; > 0 discourages repeats by their count", default=0.0,
           limit=Limit(-2.0, 2.0)),
    # vLLM's names, for benchmark clients that need answers of a fixed length
    Tensor("min_tokens", "INT32", (1,), "the end-of-answer tokens are not chosen before this many",
           default=0, limit=Limit(0, 1_000_000)),
    Tensor("ignore_eos", "BOOL", (1,), "the end-of-answer tokens are never chosen: max_tokens are generated "
           "(unless a stop string or the grammar ends the answer)", default=False),
    Tensor("logprobs", "INT32", (1,), "send each generated token's log-probability and this many most "
           "likely alternatives (see LOGPROBS); absent: none", default=None, limit=Limit(0, 20)),
)

INPUTS = (
    Tensor("image", "BYTES", (-1,), "encoded images (see IMAGE_FORMATS), at most MAX_IMAGES, in the order of "
           "their <image> placeholders (see IMAGES); omit for text-only"),
    # optional for Triton, so that a missing prompt gets our reason rather than Triton's
    Tensor("video", "BYTES", (1,), "a video clip (mp4, webm, mkv: what FFmpeg decodes), its frames sampled evenly, "
           "at its <video> placeholder or after the images (see VIDEO)"),
    Tensor("video_frames", "INT32", (1,), "frames sampled from the clip", default=8, limit=Limit(1, 32)),
    Tensor("prompt", "BYTES", (1,), "the question (or a full `v1` prompt with raw_prompt)"),
    Tensor("raw_prompt", "BOOL", (1,), "the prompt is already templated, <image> where the image goes",
           default=False),
    Tensor("history", "BYTES", (1,), "earlier turns as JSON [[question, answer], ...]; "
           "the image belongs to the first"),
    Tensor("system", "BYTES", (1,), "replaces the template's system line"),
    Tensor("template", "BYTES", (1,), "lay the prompt out in this template instead of the model's (see "
           "TEMPLATES; `edgevlm-client health` names the model's)"),
    *PARAMETERS,
    Tensor("stop", "BYTES", (-1,), "stop strings (never streamed)"),
    Tensor("response_format", "BYTES", (1,), "JSON: the answer must match a JSON schema, any JSON object, a "
           "regex or one of some choices (see RESPONSE_FORMATS)"),
    Tensor("cancel", "BYTES", (1,), "a cancel message (see CANCEL): the request id of a generation to stop; "
           "sent alone, on the stream that carries the generation"),
    Tensor("tools", "BYTES", (1,), "JSON: functions the model may call, as OpenAI's `tools` list (see TOOLS)"),
    Tensor("tool_choice", "BYTES", (1,), "with tools: none, auto, required, or the name of the one function to call",
           default="auto"),
    Tensor("parallel_tool_calls", "BOOL", (1,), "with tools: an answer may hold several calls", default=True),
)

# Tool calls. A request with `tools` gets, instead of text, a JSON array of calls
# [{"name", "arguments"}] whose arguments match the function's JSON Schema (the server's grammar
# guarantees it); its last `stats` then hold `tool_calls` [{"id", "name", "arguments": JSON
# text}] and finish_reason "tool_calls". With tool_choice "auto" the model may answer in text.
TOOL_CHOICES = ("none", "auto", "required")
MAX_TOOLS = 32

# response_format, by its "type": the other key it needs (None: none)
RESPONSE_FORMATS = {"json_schema": "schema", "json_object": None, "regex": "pattern", "choice": "choices"}

# The inputs that make the prompt (image, template, tokens); the rest steer decoding.
PROMPT_INPUTS = ("image", "video", "video_frames", "prompt", "raw_prompt", "history", "system", "template")

# A video clip: decoded in the server with FFmpeg's libraries, `video_frames` frames taken
# evenly from first to last (every frame of a shorter clip); LLaVA-NeXT-Video pools each frame's
# tokens 2x2 (144 a frame at 7B), a model without a video mode reads each frame as a picture
# (stats frame_tokens), Llama-3.2-Vision takes none. At most MAX_VIDEO_BYTES, one clip per request.
MAX_VIDEO_BYTES = 64 << 20

# Several images. Each image of a request takes its place at an `<image>` placeholder, in
# order: written into the prompt or history turns, there; written nowhere, all go to the first
# turn, before its text (as LLaVA lays out one). A history turn keeps its images that way.
# A cross-attention model (Llama-3.2-Vision) takes one image per request.
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # a clip's place

# Prompt templates by name (LLaVA's conversation.py names), and `checkpoint`: the model's own
# chat template (llava-hf, Llama-3.2-Vision). A model serves the one its checkpoint calls for
# (for an original LLaVA checkpoint, what LLaVA's run_llava picks by its directory's name).
TEMPLATES = ("vicuna_v1", "llava_v1", "llava_v0", "mistral_instruct", "llava_llama_2", "chatml_direct", "mpt",
             "checkpoint")

# In-band cancellation. A client stops a generation by sending, on the same gRPC stream, a
# request holding only `cancel` = the generation's request id (a random id the client gave
# it). The model ends that generation at its next step: its last response carries `stats`
# with finish_reason "cancelled", and the cancel message gets one final response whose `stats`
# are {"cancel": true} (false: no generation by that id was running; it may have ended). The
# client then half-closes the stream. Why not gRPC's own cancel: tritonserver 2.51's gRPC
# frontend can crash (SIGSEGV) when a response is written while the client cancels the
# stream (triton-inference-server/server#7368, #7472, #8034; fixed in 2.67); an in-band
# cancel never races a response. A client that goes away is still cancelled by Triton.
CANCEL = "cancel"
MAX_REQUEST_ID_CHARS = 128

OUTPUTS = (
    Tensor("text", "BYTES", (1,), "the new text since the previous response", optional=False),
    Tensor("stats", "BYTES", (1,), "JSON, on the last response only (see STATS)", optional=False),
    Tensor("logprobs", "BYTES", (1,), "JSON, with the logprobs input: the tokens generated since the previous "
           "response (see LOGPROBS); empty otherwise", optional=False),
)

# One entry of the `logprobs` output's JSON list, per generated token (docs/CONTRACT.md says the rest).
LOGPROBS = ("token", "logprob", "bytes", "top_logprobs")  # top_logprobs: [{token, logprob, bytes}]

# Keys of the JSON in the last response's `stats`.
STATS = ("images", "frames", "frame_tokens", "video_decode_ms", "image_encode_ms", "image_cached", "image_tokens", "image_tiles", "queue_ms", "prefill_tokens",
         "cached_tokens", "prefill_ms", "decode_tokens", "decode_ms", "decode_tokens_per_s", "prefill_tokens_per_s",
         "finish_reason", "tool_calls")
# images: the request's images; frames: its clip's frames read (frame_tokens positions each;
# video_decode_ms decoding them);
# image_encode_ms: encoding them all, a clip included; image_cached: every image's
# embeddings came from the server's image cache (image_encode_ms 0);
# image_tokens: context positions the images took (LLaVA-1.6: depends on the picture's size);
# cached_tokens: prompt positions whose KV came from the prefix cache instead of prefill;
# image_tiles: a cross-attention model's tiles; tool_calls: see TOOL_CHOICES (null without).
FINISH_REASONS = ("stop", "length", "cancelled", "tool_calls")

# Request limits (the server refuses past them with INVALID_ARG and the reason).
MAX_PROMPT_CHARS = 100_000     # prompt and system, each
MAX_IMAGE_BYTES = 32 << 20      # each
MAX_IMAGES = 8                 # per request; their positions count against the context too
MAX_IMAGE_PIXELS = 50_000_000  # refused from the header, before decoding (decompression bombs)
MAX_TURNS = 64                 # history pairs
MAX_STOP = 16                  # stop strings per request ...
MAX_STOP_CHARS = 256           # ... each at most this long

# What cameras and services send, by leading bytes (WebP: RIFF....WEBP). Pillow opens dozens
# more; each is parser surface a network-facing server does not need.
IMAGE_FORMATS = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "GIF": (b"GIF87a", b"GIF89a"),
                 "BMP": (b"BM",), "WEBP": ()}
IMAGE_FORMATS_TEXT = "JPEG, PNG, WebP, BMP or GIF"


def image_format(data: bytes) -> str | None:
    """The accepted format named by the leading bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, magics in IMAGE_FORMATS.items() if data.startswith(magics)), None) \
        if data else None


def stop_reason(stop) -> str | None:
    if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        return f"stop takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters"
    return None


# What a failure's status means: Triton's codes as the model sends them (pb_utils.TritonError.X).
STATUS = {
    "INVALID_ARG": "the request is wrong: fix it, do not retry",
    "UNAVAILABLE": "overloaded, starting or restarting: retry before the first token",
    "INTERNAL": "a server bug or a failed model: report it",
}
# How the status reaches a streaming client. Triton sends an error on a gRPC stream as a bare
# message; its opt-in header for real status codes (`triton_grpc_error: true`) crashes
# tritonserver 2.51 with decoupled models (SIGSEGV, seen here within seconds). So a refused
# request first gets one response whose `stats` is {"error": {"status": <STATUS key>,
# "message": <reason>}}, then the Triton error (same reason, same code) that ends the stream.
STATS_ERROR = "error"

BY_NAME = {t.name: t for t in INPUTS}

# What each numeric datatype holds: a value is checked as the number the user sent, before any
# conversion (numpy turns 2**32 + 5 into 5 as an int32 without a word).
_INT_RANGE = {"INT32": (-2 ** 31, 2 ** 31 - 1), "INT64": (-2 ** 63, 2 ** 63 - 1)}


def value_reason(tensor: Tensor, value) -> str | None:
    """None when `value` is a number this scalar input takes, else the one-line reason."""
    name, limit = tensor.name, tensor.limit
    if tensor.datatype == "BOOL":
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if tensor.datatype in _INT_RANGE:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an integer, got {value!r}"
        low, high = _INT_RANGE[tensor.datatype]
        if not low <= value <= high:
            if limit is not None:
                low, high = max(low, int(limit.low)), high if limit.high is None else int(limit.high)
            return f"{name} must be in [{low}, {high}], got {value}"
    elif tensor.datatype == "FP32":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        if isinstance(value, int) and abs(value) > 2 ** 128:  # float() of it would overflow
            return f"{name} must be a finite number, got {value}"
    return None if limit is None else limit.reason(name, value)


def pbtxt(tensors) -> str:
    """The tensors as config.pbtxt entries (the repository renders its input/output lists here)."""
    lines = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        opt = " optional: true" if t.optional else ""
        lines.append(f'  {{ name: "{t.name}" data_type: TYPE_{"STRING" if t.datatype == "BYTES" else t.datatype} '
                     f"dims: [ {dims} ]{opt} }}")
    return ",\n".join(lines)
