"""A request to a cross-attention model (Llama-3.2-Vision), checked against the wire contract:
the same inputs as every model (requests.py), a different way in.

The prompt is the checkpoint's own chat template rendered over the conversation (the image in
the first user turn, as transformers' processor places it) and tokenized with its BPE
tokenizer; the image is cut into tiles (tiles.py), and once the vision encoder and the
cross-attention K/V graph have run, its K/V and the mask of which prompt positions attend to it
(cross_attention.py) travel with the request to its row. The image takes one position in the
prompt, its `<|image|>` token; its K/V does not take positions.

Special-token strings in a question are refused, not tokenized: `<|image|>` typed into a
prompt would otherwise claim an image that was never sent, and `<|eot_id|>` end a turn.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from edgevlm_client.contract import MAX_IMAGE_PIXELS, MAX_PROMPT_CHARS

from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.prompt import CHECKPOINT
from edgevlm.runtime.chat_template import ChatTemplate, conversation
from edgevlm.runtime.cross_attention import CrossImage, CrossRow, cross_mask
from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.image import ImageError, load_image
from edgevlm.runtime.onnxruntime import session
from edgevlm.runtime.requests import Prepared, PreparedImage, check_images, image_list, parse_history, text
from edgevlm.runtime.tiles import preprocess
from edgevlm.runtime.tokenizer import BPETokenizer

IMAGE_TOKEN = "<|image|>"


class CrossImageEncoder:
    """(pixel_values [N, tiles, 3, S, S], aspect_ratio_ids [N], aspect_ratio_mask [N, tiles]) ->
    (each cross-attention tensor's K/V [N, kv_heads, L, head_dim], ms): vision_encoder.onnx, then
    cross_kv.onnx, in the serving process. The states between them are ~50x a LLaVA image's
    embeddings (105 MB per 11B image in FP32), so they do not cross Triton; the image batcher
    still runs every image that arrived together in one call."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None,
                 keys: tuple[str, str] = ("vision_encoder", "cross_kv")):
        """keys: the export's two graphs to run (a quantized export's FP16 copies for its check)."""
        art = OnnxArtifacts.open(onnx_dir)
        self.vision = session(art.path(keys[0]), threads, arena=False)
        self.kv = session(art.path(keys[1]), threads, arena=False)
        self.names = [o.name for o in self.kv.get_outputs()]

    def __call__(self, batch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        px, ratio, mask = batch
        states = self.vision.run(["cross_states"], {"pixel_values": np.ascontiguousarray(px, np.float32),
                                                    "aspect_ratio_ids": ratio, "aspect_ratio_mask": mask})[0]
        kv = self.kv.run(self.names, {"cross_states": states})
        return kv, (time.perf_counter() - t0) * 1e3


class CrossPreprocessor:
    """image bytes + prompt -> Prepared (pixel_values: the (tiles, arrangement, tile mask) the
    encoder takes, batch axis 1); the encoder's K/V -> the image's CrossImage."""

    def __init__(self, onnx_dir: str | Path, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 tokenizer: BPETokenizer | None = None):
        art = OnnxArtifacts.open(onnx_dir)
        self.cfg = art.config
        self.tok = tokenizer or BPETokenizer(art.path("tokenizer"), self.cfg.text.vocab_size, self.cfg.stop_token_ids)
        special = json.loads(art.path("tokenizer_config").read_text())
        self.template = ChatTemplate(art.path("chat_template").read_text(), special)
        self.max_image_pixels = max_image_pixels
        self.specials = sorted(self.tok.special, key=len, reverse=True)
        # a template that renders tools tells the model its functions itself (tools.STYLES)
        self.tool_style = "object" if self.template.renders_tools else "array"

    # what the intake asks of every preprocessor
    def image_positions(self, image, prepared: PreparedImage) -> int:
        """Prompt positions the image adds beyond its token: none (it is attended to, not spliced)."""
        return 0

    def attach(self, ids: list[int], images: list[CrossImage]) -> dict:
        """The Request fields that carry the image: its K/V and the prompt's cross mask."""
        if not images:
            return {}
        (image,) = images
        v = self.cfg.vision
        mask = cross_mask(ids, self.cfg.image_token_id, [image.tiles], v.max_num_tiles, v.tile_tokens)
        return {"cross": CrossRow(image, mask)}

    def pack(self, features: list[np.ndarray], prepared: PreparedImage) -> CrossImage:
        """The encoder's K/V rows of one request ([1, kv_heads, L, head_dim] each) -> its image."""
        return CrossImage([a[0].copy() for a in features], prepared.tiles, self.cfg.vision.tile_tokens,
                          prepared.digest)

    def from_inputs(self, inputs: dict, decode: list[bool] | None = None, tools=None) -> Prepared:
        if inputs.get("prompt") is None:
            raise BadRequest("prompt is required")
        raw = inputs.get("raw_prompt")
        raw = bool(np.asarray(raw).reshape(-1)[0]) if raw is not None else False
        if inputs.get("video") is not None:
            raise BadRequest(f"video: {self.cfg.name} (cross-attention) takes no clip; send one frame as its image")
        images = check_images(image_list(inputs))
        if len(images) > 1:
            raise BadRequest(f"{len(images)} images: this model (cross-attention) reads one image per request")
        image = images[0] if images else None
        question = text(inputs["prompt"], "prompt")
        turns = parse_history(inputs.get("history"))
        system = text(inputs["system"], "system").strip() if inputs.get("system") is not None else None
        if inputs.get("template") is not None and text(inputs["template"], "template") != CHECKPOINT:
            raise BadRequest("template: this model's prompts are its checkpoint's chat template (`checkpoint`)")
        if not question.strip():
            raise BadRequest("prompt is empty")
        for name, value in [("prompt", question), ("system", system or "")]:
            if len(value) > MAX_PROMPT_CHARS:
                raise BadRequest(f"{name} is {len(value)} characters, over the {MAX_PROMPT_CHARS} limit")
        if raw:
            if tools is not None:
                raise BadRequest("tools and raw_prompt exclude each other (a raw prompt holds its own instructions)")
            if turns or system is not None:
                raise BadRequest("history and system exclude raw_prompt (a raw prompt holds them)")
            if question.count(IMAGE_TOKEN) != int(image is not None):
                raise BadRequest(f"raw prompt has {question.count(IMAGE_TOKEN)} {IMAGE_TOKEN} token(s) "
                                 f"for {int(image is not None)} image(s)")
            ids = self.tok.encode(question, add_bos=not question.startswith("<|begin_of_text|>"))
        else:
            for name, value in [("prompt", question), ("system", system or "")] + \
                    [(f"history turn {i + 1}", q + a) for i, (q, a) in enumerate(turns)]:
                self._no_special_tokens(name, value)
            if tools is not None and tools.style == "array":  # ours: in the system message; with an
                if image is None:                               # image (which takes none) before the question
                    system = ((system or "") + "\n\n" + tools.prompt()).strip()
                else:
                    question = tools.prompt() + "\n\n" + question
            messages = conversation(question, images=int(image is not None), history=turns, system=system)
            listed = tools.listed() if tools is not None and tools.style == "object" else None
            ids = self.tok.encode(self.template.render(messages, tools=listed), add_bos=False)
        prepared = Prepared(np.asarray(ids, np.int64))
        if image is None:
            return prepared
        one = PreparedImage(None)
        if decode is None or decode[0]:
            try:
                img = load_image(image, self.max_image_pixels)
            except ImageError as e:
                raise BadRequest(f"image: {e}") from None
            px, ratio, tile_mask = preprocess(img, self.cfg.vision)
            one.pixel_values = (px[None], np.array([ratio], np.int64), tile_mask[None])
            one.size = (img.height, img.width)
            one.tiles = int(tile_mask.sum())
        prepared.images.append(one)
        return prepared

    def _no_special_tokens(self, name: str, value: str) -> None:
        for token in self.specials:
            if token in value:
                hint = "; send the picture as the image input" if token == IMAGE_TOKEN else ""
                raise BadRequest(f"{name} contains the special token {token}{hint} (or use raw_prompt)")
