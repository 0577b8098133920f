"""A request to `mobilevlm`, checked against the wire contract: its tensors become a prompt's
token ids, pixel values and generation parameters, or a BadRequest with a one-line reason.

No Triton here: the model.py adapters move tensors between pb_utils and these functions, so
everything is tested in-process and the same code runs on the cpu and jetson targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgevlm_client.contract import (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_PROMPT_CHARS, MAX_TURNS,
                                     PARAMETERS)

from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.errors import BadRequest
from edgevlm.presets import ANYRES
from edgevlm.runtime import anyres
from edgevlm.runtime.image import ImageError, load_image, preprocess_tiles
from edgevlm.runtime.chat_template import ChatTemplate
from edgevlm.runtime.prompt import IMAGE_PLACEHOLDER, Layouts, tokenize_prompt
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.tokenizer import Tokenizer

# numpy kinds each contract datatype accepts, and the python type it becomes
_KINDS = {"INT32": ("iu", int), "INT64": ("iu", int), "FP32": ("f", float), "BOOL": ("b", bool)}


def scalar(inputs: dict, name: str, kinds: str, cast):
    """An optional one-element input, type-checked; None when absent."""
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise BadRequest(f"{name} must hold one value, got shape {list(arr.shape)}")
    if arr.dtype.kind not in kinds:
        raise BadRequest(f"{name} has type {arr.dtype}, expected {'an integer' if 'i' in kinds else 'a float'}")
    return cast(arr.reshape(-1)[0])


def text(value, name: str) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not valid UTF-8") from None
    return str(value)


def toolset(inputs: dict, style: str = "array"):
    """The request's tools (tools.Toolset), None without tools or with tool_choice "none";
    style: how this model calls (the preprocessor's `tool_style`)."""
    from edgevlm.runtime.tools import parse_tools
    raw, choice = inputs.get("tools"), inputs.get("tool_choice")
    if raw is None:
        if choice is not None or inputs.get("parallel_tool_calls") is not None:
            raise BadRequest("tool_choice and parallel_tool_calls need tools")
        return None
    return parse_tools(text(raw, "tools"), None if choice is None else text(choice, "tool_choice"),
                       scalar(inputs, "parallel_tool_calls", "b", bool), style)


def sampling_params(inputs: dict, default_max_tokens: int) -> SamplingParams:
    """Generation parameters from optional request inputs (numpy arrays by name)."""
    values = {}
    for param in PARAMETERS:
        v = scalar(inputs, param.name, *_KINDS[param.datatype])
        if v is not None:
            values[param.name] = v
    stop = inputs.get("stop")
    if stop is not None:
        values["stop"] = tuple(text(s, "stop") for s in np.asarray(stop, dtype=object).reshape(-1))
    fmt = inputs.get("response_format")
    if fmt is not None:
        values["response_format"] = text(fmt, "response_format")
    values.setdefault("max_tokens", default_max_tokens)
    return SamplingParams(**values).validate()


@dataclass
class Prepared:
    """A checked request's prompt: what the vision encoder and the decoder need."""

    pixel_values: np.ndarray | tuple | None  # [tiles, 3, S, S]: 0 without an image, > 1 for anyres;
    #   None if cached (a cross-attention model: its encoder's inputs, cross_requests.py)
    input_ids: np.ndarray  # int64, IMAGE_TOKEN_INDEX where the image goes
    image_size: tuple[int, int] | None = None  # the picture's (H, W), when decoded
    image_tokens: int = 0  # positions the image takes (0: none, or an anyres picture not decoded)
    tiles: int = 0  # a cross-attention model's: the picture's tiles
    digest: bytes = b""  # the image bytes' hash (the intake's)


class Preprocessor:
    """image bytes + prompt -> Prepared; the vision encoder's tile features -> the image's tokens.

    decode_image=False (the image's embeddings are cached) skips decoding and resizing: the
    prompt is built for the image and pixel_values is None.
    """

    def __init__(self, onnx_dir: str | Path, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 tokenizer: Tokenizer | None = None, template: str | None = None):
        """template: the prompt layout served by default (make repo TEMPLATE=); None: the
        export's (its manifest's `prompt.template`)."""
        art = OnnxArtifacts.open(onnx_dir)
        self.cfg = art.config
        self.tok = tokenizer or Tokenizer(art.path("tokenizer"))  # the generator's, where it has one
        self.max_image_pixels = max_image_pixels
        chat = None
        if "chat_template" in art.manifest["files"]:
            special = (json.loads(art.path("tokenizer_config").read_text())
                       if "tokenizer_config" in art.manifest["files"] else {})
            chat = ChatTemplate(art.path("chat_template").read_text(), special)
        self.layouts = Layouts(template or self.cfg.template, chat)
        self.newline = np.load(art.path("image_newline")) if self.cfg.image_aspect == ANYRES else None

    def tokens_for(self, size_hw: tuple[int, int]) -> int:
        """Positions a picture of (H, W) takes."""
        if self.cfg.image_aspect != ANYRES:
            return self.cfg.image_tokens
        v = self.cfg.vision
        return anyres.token_count(size_hw, self.cfg.grid_pinpoints, v.image_size, v.grid)

    tool_style = "array"  # tools are described in the system line (tools.py)

    def image_positions(self, image: np.ndarray | None, prepared: Prepared) -> int:
        """Positions the image takes in the prompt: its cached embeddings' rows, or as prepared."""
        return image.shape[1] if image is not None else prepared.image_tokens

    def attach(self, ids: list[int], image: np.ndarray | None) -> dict:
        """The Request fields that carry the image: its embeddings, spliced at the placeholder."""
        return {"image_embeds": image}

    def pack(self, features: np.ndarray, prepared: Prepared) -> np.ndarray:
        """The vision encoder's rows for one request ([tiles, T, D]) -> image_embeds [1, N, D]."""
        if self.cfg.image_aspect != ANYRES:
            return features
        return anyres.pack(features, prepared.image_size, self.cfg.grid_pinpoints,
                           self.cfg.vision.image_size, self.newline)[None]

    def from_inputs(self, inputs: dict, decode_image: bool = True, tools=None) -> Prepared:
        """The request's prompt inputs (contract.PROMPT_INPUTS, numpy arrays by name); tools: its
        Toolset, described to the model in the system line."""
        if inputs.get("prompt") is None:
            raise BadRequest("prompt is required")
        raw = inputs.get("raw_prompt")
        return self(image_bytes(inputs), inputs["prompt"],
                    bool(np.asarray(raw).reshape(-1)[0]) if raw is not None else False,
                    inputs.get("history"), inputs.get("system"), decode_image, tools, inputs.get("template"))

    def __call__(self, image: bytes | None, prompt, raw_prompt: bool = False, history=None, system=None,
                 decode_image: bool = True, tools=None, template=None):
        prompt = text(prompt, "prompt")
        turns = parse_history(history)
        for name, given in (("history", bool(turns)), ("system", system is not None),
                            ("template", template is not None), ("tools", tools is not None)):
            if raw_prompt and given:
                raise BadRequest(f"{name} and raw_prompt exclude each other (a raw prompt is laid out already)")
        layout = self.layouts.default
        if template is not None:
            try:
                layout = self.layouts.check(text(template, "template"))
            except ValueError as e:
                raise BadRequest(str(e)) from None
        system = text(system, "system").strip() if system is not None else self.layouts.system(layout)
        if system is not None and len(system) > MAX_PROMPT_CHARS:
            raise BadRequest(f"system is {len(system)} characters, over the {MAX_PROMPT_CHARS} limit")
        if tools is not None:
            system = ((system or "") + "\n\n" + tools.prompt()).strip()
        if not prompt.strip():
            raise BadRequest("prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"prompt is {len(prompt)} characters, over the {MAX_PROMPT_CHARS} limit")
        s = self.cfg.vision.image_size
        size_hw, tokens = None, 0
        if image is not None:
            if len(image) > MAX_IMAGE_BYTES:
                raise BadRequest(f"image is {len(image)} bytes, over the {MAX_IMAGE_BYTES} limit")
            pixel_values = None
            if self.cfg.image_aspect != ANYRES:
                tokens = self.cfg.image_tokens  # known without decoding
            try:
                if decode_image:
                    pixel_values, size_hw = preprocess_tiles(load_image(image, self.max_image_pixels), s,
                                                             self.cfg.image_aspect, self.cfg.grid_pinpoints)
                    tokens = self.tokens_for(size_hw)
            except ImageError as e:
                raise BadRequest(f"image: {e}") from None
        else:
            pixel_values = np.zeros((0, 3, s, s), np.float32)
        n_images = int(image is not None)
        if raw_prompt:
            placeholders = prompt.count(IMAGE_PLACEHOLDER)
            if placeholders != n_images:
                raise BadRequest(f"raw prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                                     f"for {n_images} image(s)")
            ids = tokenize_prompt(self.tok, prompt)
        else:
            ids = self.prompt_ids(prompt, n_images, turns, system, layout)
        # its length against the context is the scheduler's check (Scheduler.check)
        return Prepared(pixel_values, np.asarray(ids, np.int64), size_hw, tokens)

    def prompt_ids(self, question: str, images: int = 0, history=(), system: str | None = None,
                   layout: str | None = None) -> list[int]:
        """The ids a question is served as (IMAGE_TOKEN_INDEX where each image goes), in the
        served layout or `layout`; system None: the layout's own line."""
        layout = layout or self.layouts.default
        system = self.layouts.system(layout) if system is None else system
        return tokenize_prompt(self.tok, self.layouts.render(layout, question, images, history, system))


def image_bytes(inputs: dict) -> bytes | None:
    """The request's encoded image, or None for a text-only request."""
    image = inputs.get("image")
    return None if image is None else bytes(np.asarray(image, dtype=object).reshape(-1)[0])


def parse_history(value) -> list[tuple[str, str]]:
    """history input: JSON [[question, answer], ...] -> turns for build_prompt."""
    if value is None:
        return []
    raw = text(value, "history")
    try:
        turns = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError as e:
        raise BadRequest(f"history is not JSON: {e.msg} at character {e.pos}") from None
    except RecursionError:  # found by fuzzing: "[[[[..." exhausts the parser's stack
        raise BadRequest("history nests too deeply") from None
    if (not isinstance(turns, list) or len(turns) > MAX_TURNS
            or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns)):
        raise BadRequest(f"history must be a JSON list of at most {MAX_TURNS} [question, answer] string pairs")
    return [(q, a) for q, a in turns]

