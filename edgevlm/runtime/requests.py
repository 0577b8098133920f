"""A request to `mobilevlm`, checked against the wire contract: its tensors become a prompt's
token ids, pixel values and generation parameters, or a BadRequest with a one-line reason.

No Triton here: the model.py adapters move tensors between pb_utils and these functions, so
everything is tested in-process and the same code runs on the cpu and jetson targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgevlm_client.contract import (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_PROMPT_CHARS,
                                     MAX_TURNS, PARAMETERS)

from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.errors import BadRequest
from edgevlm.presets import ANYRES, CROP
from edgevlm.runtime import anyres
from edgevlm.runtime.image import ImageError, load_image, preprocess_tiles
from edgevlm.runtime.chat_template import ChatTemplate
from edgevlm.runtime.prompt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Layouts, placeholders, tokenize_prompt
from edgevlm.runtime.video import DEFAULT_FRAMES, MAX_FRAMES, decode_clip
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
class PreparedImage:
    """One image (or clip) of a request, checked: what the vision encoder needs of it."""

    pixel_values: np.ndarray | tuple | None  # [tiles, 3, S, S] (> 1 tile for anyres; a clip's
    #   frames); None if cached (a cross-attention model: its encoder's inputs, cross_requests.py)
    size: tuple[int, int] | None = None  # the picture's (H, W), when decoded
    tokens: int = 0  # positions it takes (0: an anyres picture or a clip not decoded)
    tiles: int = 0  # a cross-attention model's: the picture's tiles
    digest: bytes = b""  # its bytes' hash (the intake's)
    kind: str = "image"  # or "video": a clip, through the video encoder (or as pictures)
    frames: int = 0  # a clip's frames: asked for, then as read
    decode_ms: float = 0.0  # a clip's decoding
    data: bytes | None = None  # a clip's bytes until Preprocessor.decode_clip reads them


@dataclass
class Prepared:
    """A checked request's prompt and images: what the vision encoder and the decoder need."""

    input_ids: np.ndarray  # int64, IMAGE_TOKEN_INDEX where each image goes, in order
    images: list[PreparedImage] = field(default_factory=list)  # the images as sent, then the clip
    order: list[int] | None = None  # images[order[k]] is at the k-th placeholder (None: as listed)

    def placed(self, items: list) -> list:
        """Per-image things (as `images` lists them) in the order of their placeholders."""
        return items if self.order is None else [items[i] for i in self.order]

    @property
    def image(self) -> PreparedImage:
        """The one image of a model that takes one (a cross-attention model)."""
        (image,) = self.images
        return image


class Preprocessor:
    """images' bytes + prompt -> Prepared; the vision encoder's tile features -> an image's tokens.

    decode[i] False (image i's embeddings are cached) skips decoding and resizing it: the
    prompt is built for it and its pixel_values is None.
    """

    def __init__(self, onnx_dir: str | Path, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 tokenizer: Tokenizer | None = None, template: str | None = None):
        """template: the prompt layout served by default (make repo TEMPLATE=); None: the
        export's (its manifest's `prompt.template`)."""
        art = OnnxArtifacts.open(onnx_dir)
        self.cfg = art.config
        self.tok = tokenizer or Tokenizer(art.path("tokenizer"), self.cfg.text.eos_token_id)  # the generator's
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

    def image_positions(self, image: np.ndarray | None, prepared: PreparedImage) -> int:
        """Positions an image takes in the prompt: its cached embeddings' rows, or as prepared."""
        return image.shape[0] if image is not None else prepared.tokens

    def attach(self, ids: list[int], images: list[np.ndarray]) -> dict:
        """The Request fields that carry the images: their embeddings, each spliced at its
        placeholder."""
        return {"image_embeds": images or None}

    def pack(self, features: np.ndarray, prepared: PreparedImage) -> np.ndarray:
        """The vision encoder's rows for one image ([tiles, T, D]) -> its embeddings [N, D]
        (a clip: the video encoder's [frames, T, D], its frames one after another)."""
        if prepared.kind == "video":
            return features.reshape(-1, features.shape[-1])
        if self.cfg.image_aspect != ANYRES:
            return features[0]
        return anyres.pack(features, prepared.size, self.cfg.grid_pinpoints, self.cfg.vision.image_size,
                           self.newline)

    def from_inputs(self, inputs: dict, decode: list[bool] | None = None, tools=None) -> Prepared:
        """The request's prompt inputs (contract.PROMPT_INPUTS, numpy arrays by name); decode:
        per image, whether to decode it (False: its embeddings are cached); tools: its Toolset,
        described to the model in the system line."""
        if inputs.get("prompt") is None:
            raise BadRequest("prompt is required")
        raw = inputs.get("raw_prompt")
        return self(image_list(inputs), inputs["prompt"],
                    bool(np.asarray(raw).reshape(-1)[0]) if raw is not None else False,
                    inputs.get("history"), inputs.get("system"), decode, tools, inputs.get("template"),
                    clip_bytes(inputs), scalar(inputs, "video_frames", "iu", int))

    def __call__(self, images: list[bytes] | bytes | None, prompt, raw_prompt: bool = False, history=None,
                 system=None, decode: list[bool] | None = None, tools=None, template=None,
                 video: bytes | None = None, frames: int | None = None) -> Prepared:
        """decode: per image, then the clip, whether to decode it (False: cached)."""
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
        images = check_images(images)
        n_images, n_videos = len(images), int(video is not None)
        decode = [True] * (n_images + n_videos) if decode is None else decode
        texts = [prompt, *(q + a for q, a in turns)]
        written = [placeholders(t) for t in texts]
        marks = {kind: sum(w.count(kind) for w in written) for kind in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)}
        explicit = raw_prompt or any(marks.values())
        for kind, n, what in ((IMAGE_PLACEHOLDER, n_images, "image"), (VIDEO_PLACEHOLDER, n_videos, "video")):
            if explicit and marks[kind] != n:
                raise BadRequest(f"{'raw prompt' if raw_prompt else 'the conversation'} has {marks[kind]} "
                                 f"{kind} placeholder(s) for {n} {what}(s)")
        prepared = [self._image("image" if n_images == 1 else f"image {i + 1}", data, decode[i])
                    for i, data in enumerate(images)]
        if video is not None:
            prepared.append(self._clip(video, frames, decode[-1]))
        if raw_prompt:
            laid_out = prompt
        else:  # no placeholder written: the images (then the clip) open the first turn
            laid_out = self._lay_out(prompt, 0 if explicit else n_images, turns, system, layout,
                                     0 if explicit else n_videos)
        kinds = placeholders(laid_out)
        if len(kinds) != n_images + n_videos:  # a chat template that drops or adds images
            raise BadRequest(f"the {layout} template laid out {len(kinds)} of the {n_images + n_videos} "
                             "image(s) and clip(s)")
        image_at = iter(range(n_images))
        order = [n_images if k == VIDEO_PLACEHOLDER else next(image_at) for k in kinds]
        ids = tokenize_prompt(self.tok, laid_out)
        # its length against the context is the scheduler's check (Scheduler.check)
        return Prepared(np.asarray(ids, np.int64), prepared, None if order == sorted(order) else order)

    def _clip(self, data: bytes, frames: int | None, decode: bool) -> PreparedImage:
        frames = DEFAULT_FRAMES if frames is None else frames
        if not 1 <= frames <= MAX_FRAMES:
            raise BadRequest(f"video_frames must be in [1, {MAX_FRAMES}], got {frames}")
        # positions counted at the frames asked for (a shorter clip gives fewer); decoded later,
        # off the request thread (decode_clip), unless its embeddings are cached
        return PreparedImage(None, kind="video", frames=frames, tokens=frames * self.cfg.frame_tokens,
                             data=data if decode else None)

    def decode_clip(self, clip: PreparedImage) -> None:
        """Read a clip's frames into its pixel values (BadRequest for a clip that does not
        decode): two passes over the file, so the intake runs it on a thread of its own."""
        pictures, clip.decode_ms = decode_clip(clip.data, clip.frames, self.max_image_pixels)
        s, aspect = self.cfg.vision.image_size, self.frame_aspect
        clip.pixel_values = np.concatenate([preprocess_tiles(p, s, aspect)[0] for p in pictures])
        clip.frames, clip.data = len(pictures), None
        clip.tokens = clip.frames * self.cfg.frame_tokens

    @property
    def frame_aspect(self) -> str:
        """How a clip's frame is resized: as LLaVA-NeXT-Video's processor does (shortest side,
        centre crop; one view per frame, no tiles), for an anyres model without a video mode
        too; a fixed-size model without one reads each frame as it reads a picture."""
        return CROP if self.cfg.video_pool or self.cfg.image_aspect == ANYRES else self.cfg.image_aspect

    def _image(self, name: str, data: bytes, decode: bool) -> PreparedImage:
        # a fixed-size picture's positions are known without decoding it
        image = PreparedImage(None, tokens=self.cfg.image_tokens if self.cfg.image_aspect != ANYRES else 0)
        if decode:
            s = self.cfg.vision.image_size
            try:
                image.pixel_values, image.size = preprocess_tiles(load_image(data, self.max_image_pixels), s,
                                                                  self.cfg.image_aspect, self.cfg.grid_pinpoints)
            except ImageError as e:
                raise BadRequest(f"{name}: {e}") from None
            image.tokens = self.tokens_for(image.size)
        return image

    def prompt_ids(self, question: str, images: int = 0, history=(), system: str | None = None,
                   layout: str | None = None) -> list[int]:
        """The ids a question is served as (IMAGE_TOKEN_INDEX where each image goes), in the
        served layout or `layout`; system None: the layout's own line."""
        return tokenize_prompt(self.tok, self._lay_out(question, images, history, system, layout))

    def _lay_out(self, question: str, images: int, history, system: str | None, layout: str | None,
                 videos: int = 0) -> str:
        layout = layout or self.layouts.default
        system = self.layouts.system(layout) if system is None else system
        return self.layouts.render(layout, question, images, history, system, videos)


def clip_bytes(inputs: dict) -> bytes | None:
    """The request's video clip (one), or None."""
    clip = inputs.get("video")
    return None if clip is None else bytes(np.asarray(clip, dtype=object).reshape(-1)[0])


def image_list(inputs: dict) -> list[bytes]:
    """The request's encoded images, in order (none for a text-only request)."""
    images = inputs.get("image")
    return [] if images is None else [bytes(b) for b in np.asarray(images, dtype=object).reshape(-1)]


def check_images(images: list[bytes] | bytes | None) -> list[bytes]:
    """A request's images within the contract's limits (one image may be given bare)."""
    images = [] if images is None else [images] if isinstance(images, (bytes, bytearray)) else list(images)
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"{len(images)} images, over the {MAX_IMAGES} a request may hold")
    for i, data in enumerate(images):
        if len(data) > MAX_IMAGE_BYTES:
            raise BadRequest(f"image{'' if len(images) == 1 else f' {i + 1}'} is {len(data)} bytes, "
                             f"over the {MAX_IMAGE_BYTES} limit")
    return images


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

