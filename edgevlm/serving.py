"""What the Triton models do, without Triton: request parsing, preprocessing, runner choice.

The model.py files under model_repository/ only move tensors between pb_utils and these
functions and turn `InvalidRequest` into an INVALID_ARG error, so everything here is tested
in-process and the same code runs on the cpu and jetson targets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgevlm.embedding import EmbeddingTable
from edgevlm.image import DEFAULT_MAX_PIXELS, ImageError, preprocess
from edgevlm.manifest import OnnxArtifacts
from edgevlm.presets import IMAGE_TOKEN_INDEX
from edgevlm.prompt import IMAGE_PLACEHOLDER, SYSTEM_V1, build_prompt, tokenize_prompt
from edgevlm.sampling import InvalidRequest, SamplingParams
from edgevlm.tokenizer import Tokenizer

MAX_PROMPT_CHARS = 100_000
MAX_IMAGE_BYTES = 32 << 20
MAX_TURNS = 64

# Optional generation inputs: name -> (numpy kinds accepted, python type)
PARAM_INPUTS = {"max_tokens": ("iu", int), "temperature": ("f", float), "top_p": ("f", float),
                "top_k": ("iu", int), "repetition_penalty": ("f", float), "seed": ("iu", int)}


def scalar(inputs: dict, name: str, kinds: str, cast):
    """An optional one-element input, type-checked; None when absent."""
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise InvalidRequest(f"{name} must hold one value, got shape {list(arr.shape)}")
    if arr.dtype.kind not in kinds:
        raise InvalidRequest(f"{name} has type {arr.dtype}, expected {'an integer' if 'i' in kinds else 'a float'}")
    return cast(arr.reshape(-1)[0])


def text(value, name: str) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{name} is not valid UTF-8") from None
    return str(value)


def sampling_params(inputs: dict, default_max_tokens: int) -> SamplingParams:
    """Generation parameters from optional request inputs (numpy arrays by name)."""
    values = {}
    for name, (kinds, cast) in PARAM_INPUTS.items():
        v = scalar(inputs, name, kinds, cast)
        if v is not None:
            values[name] = v
    stop = inputs.get("stop")
    if stop is not None:
        values["stop"] = tuple(text(s, "stop") for s in np.asarray(stop, dtype=object).reshape(-1))
    values.setdefault("max_tokens", default_max_tokens)
    return SamplingParams(**values).validate()


class Preprocessor:
    """image bytes + prompt -> (pixel_values [N, 3, S, S], input_ids [L]), N = 0 or 1."""

    def __init__(self, onnx_dir: str | Path, max_image_pixels: int = DEFAULT_MAX_PIXELS):
        art = OnnxArtifacts.open(onnx_dir)
        self.cfg = art.config
        self.tok = Tokenizer(art.path("tokenizer"))
        self.max_image_pixels = max_image_pixels

    def __call__(self, image: bytes | None, prompt, raw_prompt: bool = False, history=None, system=None):
        prompt = text(prompt, "prompt")
        turns = parse_history(history)
        if turns and raw_prompt:
            raise InvalidRequest("history and raw_prompt exclude each other (a raw prompt holds its history)")
        system = text(system, "system").strip() if system is not None else SYSTEM_V1
        if raw_prompt and system != SYSTEM_V1:
            raise InvalidRequest("system and raw_prompt exclude each other (a raw prompt holds its system line)")
        if len(system) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"system is {len(system)} characters, over the {MAX_PROMPT_CHARS} limit")
        if not prompt.strip():
            raise InvalidRequest("prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"prompt is {len(prompt)} characters, over the {MAX_PROMPT_CHARS} limit")
        s = self.cfg.vision.image_size
        if image is not None:
            if len(image) > MAX_IMAGE_BYTES:
                raise InvalidRequest(f"image is {len(image)} bytes, over the {MAX_IMAGE_BYTES} limit")
            try:
                pixel_values = preprocess(image, s, self.max_image_pixels)[None]
            except ImageError as e:
                raise InvalidRequest(f"image: {e}") from None
        else:
            pixel_values = np.zeros((0, 3, s, s), np.float32)
        n_images = pixel_values.shape[0]
        if raw_prompt:
            placeholders = prompt.count(IMAGE_PLACEHOLDER)
            if placeholders != n_images:
                raise InvalidRequest(f"raw prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                                     f"for {n_images} image(s)")
        else:
            prompt = build_prompt(prompt, image=n_images > 0, history=turns, system=system)
        ids = np.asarray(tokenize_prompt(self.tok, prompt), np.int64)
        n = len(ids) + n_images * (self.cfg.image_tokens - 1)
        if n >= self.cfg.text.max_position:
            raise InvalidRequest(f"prompt is {n} tokens, the context holds {self.cfg.text.max_position}")
        return pixel_values, ids


def parse_history(value) -> list[tuple[str, str]]:
    """history input: JSON [[question, answer], ...] -> turns for build_prompt."""
    if value is None:
        return []
    raw = text(value, "history")
    try:
        turns = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"history is not JSON: {e.msg} at character {e.pos}") from None
    except RecursionError:  # found by fuzzing: "[[[[..." exhausts the parser's stack
        raise InvalidRequest("history nests too deeply") from None
    if (not isinstance(turns, list) or len(turns) > MAX_TURNS
            or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns)):
        raise InvalidRequest(f"history must be a JSON list of at most {MAX_TURNS} [question, answer] string pairs")
    return [(q, a) for q, a in turns]


class VisionEncoder:
    """pixel_values [N, 3, S, S] -> (image_embeds [N, T, D], encode ms); N = 0 costs nothing."""

    def __init__(self, onnx_dir: str | Path, runner: str = "onnxruntime", engine_dir: str | Path = ""):
        art = OnnxArtifacts.open(onnx_dir)
        self.cfg = art.config
        if runner == "onnxruntime":
            from edgevlm.engines.onnxruntime import OrtVisionEncoder
            self.run = OrtVisionEncoder(art.path("vision_encoder"))
        elif runner == "tensorrt":
            from edgevlm.engines.tensorrt import TrtVisionEncoder
            self.run = TrtVisionEncoder(engine_dir)
        else:
            raise ValueError(f"unknown runner {runner!r} (onnxruntime or tensorrt)")

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, float]:
        if pixel_values.shape[0] == 0:
            return np.zeros((0, self.cfg.image_tokens, self.cfg.text.hidden_size), np.float32), 0.0
        t0 = time.perf_counter()
        embeds = self.run(np.ascontiguousarray(pixel_values, np.float32))
        return embeds, (time.perf_counter() - t0) * 1e3


KV_CACHES = ("auto", "concat", "static")


def kv_layout(art: OnnxArtifacts, kv_cache: str = "auto") -> str:
    """auto: the in-place static cache where the export has decoder.static.onnx (half the KV
    memory, no slower in `make bench`), concat for exports made before it existed."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"unknown kv_cache {kv_cache!r}; use one of {', '.join(KV_CACHES)}")
    if kv_cache == "auto":
        return "static" if "decoder_static" in art.manifest["files"] else "concat"
    art.path("decoder_static" if kv_cache == "static" else "decoder")  # says so if the file is missing
    return kv_cache


def load_generator(onnx_dir: str | Path, runner: str = "onnxruntime", engine_dir: str | Path = "",
                   kv_cache: str = "auto"):
    """kv_cache picks the ONNX Runtime decoder graph (the TensorRT engine folder records its own)."""
    from edgevlm.generation import Generator
    art = OnnxArtifacts.open(onnx_dir)
    cfg = art.config
    kv_cache = kv_layout(art, kv_cache)
    if runner == "onnxruntime":
        from edgevlm.engines.onnxruntime import OrtDecoder
        static = kv_cache == "static"
        decoder = OrtDecoder(art.path("decoder_static" if static else "decoder"), cfg.text, static=static)
    elif runner == "tensorrt":
        from edgevlm.engines.tensorrt import TrtDecoder
        decoder = TrtDecoder(engine_dir, cfg.text)
    else:
        raise ValueError(f"unknown runner {runner!r} (onnxruntime or tensorrt)")
    # a TensorRT engine may hold less than the model (make engines MAX_CONTEXT=)
    max_context = min(cfg.text.max_position, getattr(decoder, "max_context", cfg.text.max_position))
    return Generator(decoder, EmbeddingTable(art.path("embed_tokens")), Tokenizer(art.path("tokenizer")),
                     max_context=max_context)


def image_embeds_or_none(embeds: np.ndarray | None) -> np.ndarray | None:
    return None if embeds is None or embeds.shape[0] == 0 else embeds


def check_ids(ids: np.ndarray, vocab: int) -> list[int]:
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise InvalidRequest(f"input_ids has type {ids.dtype}, expected int64")
    bad = ids[(ids != IMAGE_TOKEN_INDEX) & ((ids < 0) | (ids >= vocab))]
    if bad.size:
        raise InvalidRequest(f"input_ids holds {int(bad[0])}, outside the vocabulary of {vocab}")
    return ids.tolist()
