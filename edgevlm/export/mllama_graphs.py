"""Llama-3.2-Vision checkpoint -> ONNX: the three graphs a cross-attention model is served with,
its embedding table, tokenizer, chat template and manifest.

Tensor contract (float32 graphs):
  vision_encoder  pixel_values [images, tiles, 3, S, S], aspect_ratio_ids [images] int64,
                  aspect_ratio_mask [images, tiles] int64
              ->  cross_states [images, tiles * P, D]   (P positions per tile, D the text width)
  cross_kv        cross_states [images, L, D]
              ->  cross_key_<j> / cross_value_<j> [images, kv_heads, L, head_dim], one pair per
                  cross-attention layer: computed once per image, kept with the sequence
  decoder         inputs_embeds [batch, seq, D], position_ids [batch, seq] int64,
                  cross_mask [batch, seq, L] (1: the position attends to that image position),
                  has_image [batch] (0: the cross layers pass the row through),
                  past_key_<i> / past_value_<i> (the self-attention layers only),
                  cross_key_<j> / cross_value_<j> [batch, kv_heads, L, head_dim]
              ->  logits [batch, vocab], present_key_<i> / present_value_<i>
decoder.static.onnx: the same with fixed-capacity caches written in place (static_cache.py).

The image's K/V is an input, not a state the graph keeps: the runtime holds it per row, a
text-only row passes zeros with has_image 0, and a batch mixes both.
"""

from __future__ import annotations

import gc
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

from edgevlm.export import cleanup, half_weights
from edgevlm.export.graphs import (HALF_CLEANUP, MAX_BATCH, _torch_export, finish_static, memory_gb, release,
                                   translations)
from edgevlm.manifest import write_manifest
from edgevlm.model.mllama import Mllama
from edgevlm.model.mllama_checkpoint import read_mllama
from edgevlm.presets import MllamaConfig
from edgevlm.runtime.chat_template import CHAT_TEMPLATE_FILE
from edgevlm.staging import staged_dir

VISION_IO = (["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"], ["cross_states"])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def cross_names(cfg: MllamaConfig) -> list[str]:
    return [f"cross_{kv}_{j}" for j in range(len(cfg.text.cross_attention_layers)) for kv in ("key", "value")]


def cross_kv_io(cfg: MllamaConfig) -> tuple[list[str], list[str]]:
    return ["cross_states"], cross_names(cfg)


def decoder_io(cfg: MllamaConfig) -> tuple[list[str], list[str]]:
    kv = [f"{{}}_{kind}_{i}" for i in range(cfg.text.kv_layers) for kind in ("key", "value")]
    return (["inputs_embeds", "position_ids", "cross_mask", "has_image"] + [k.format("past") for k in kv]
            + cross_names(cfg), ["logits"] + [k.format("present") for k in kv])


class _Vision(torch.nn.Module):
    def __init__(self, model: Mllama):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        return self.model.cross_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)


class _CrossKV(torch.nn.Module):
    def __init__(self, model: Mllama):
        super().__init__()
        self.text = model.language_model

    def forward(self, cross_states):
        return tuple(t for kv in self.text.cross_kv(cross_states) for t in kv)


class _Decoder(torch.nn.Module):
    """The text model with its caches and the image's K/V flattened into graph inputs."""

    def __init__(self, model: Mllama, static: bool):
        super().__init__()
        self.text, self.static = model.language_model, static
        self.n_self = model.cfg.text.kv_layers

    def forward(self, inputs_embeds, position_ids, cross_mask, has_image, *kv):
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        logits, presents = self.text(inputs_embeds, position_ids, pairs[:self.n_self], pairs[self.n_self:],
                                     cross_mask, has_image, static=self.static)
        return (logits, *[t for p in presents for t in p])


def export_vision(model: Mllama, path: Path) -> None:
    v = model.cfg.vision
    images = torch.export.Dim("images", min=1, max=MAX_BATCH)
    # two images (example sizes of 1 are specialised): a 2x2 picture and a 1x1 one
    px = torch.zeros(2, v.max_num_tiles, 3, v.image_size, v.image_size)
    ratio = torch.tensor([6, 1])
    mask = torch.zeros(2, v.max_num_tiles, dtype=torch.int64)
    mask[0], mask[1, 0] = 1, 1
    _torch_export(_Vision(model), (px, ratio, mask), path, VISION_IO, ({0: images}, {0: images}, {0: images}))


def export_cross_kv(model: Mllama, path: Path, half: bool = False) -> None:
    cfg = model.cfg
    images = torch.export.Dim("images", min=1, max=MAX_BATCH)
    length = torch.export.Dim("cross", min=1, max=MAX_BATCH * cfg.vision.max_num_tiles * cfg.vision.tile_tokens)
    states = torch.zeros(2, 3 * cfg.vision.tile_tokens, cfg.text.hidden_size)
    _torch_export(_CrossKV(model), (states,), path, cross_kv_io(cfg), ({0: images, 1: length},),
                  translations(False, half))


def export_decoder(model: Mllama, path: Path, static: bool, half: bool = False) -> None:
    cfg, t = model.cfg, model.cfg.text
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=1, max=t.max_position)
    cross = torch.export.Dim("cross", min=1, max=MAX_BATCH * cfg.vision.max_num_tiles * cfg.vision.tile_tokens)
    # distinct example sizes over 1: torch.export specialises 0 and 1
    if static:  # write 3 positions at 4 into a cache of 11
        kv_dim, b, s, p, kv_len = torch.export.Dim("cache", min=2, max=t.max_position), 2, 3, 4, 11
    else:
        kv_dim, b, s, p, kv_len = torch.export.Dim("past", min=0, max=t.max_position), 2, 3, 4, 4
    length = 2 * cfg.vision.tile_tokens + 5
    past = [torch.zeros(b, t.num_kv_heads, kv_len, t.head_dim) for _ in range(2 * t.kv_layers)]
    images = [torch.zeros(b, t.num_kv_heads, length, t.head_dim) for _ in cross_names(cfg)]
    args = (torch.zeros(b, s, t.hidden_size), torch.arange(p, p + s).repeat(b, 1), torch.ones(b, s, length),
            torch.tensor([1.0, 0.0]), *past, *images)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq, 2: cross}, {0: batch},
              tuple([{0: batch, 2: kv_dim} for _ in past] + [{0: batch, 2: cross} for _ in images]))
    _torch_export(_Decoder(model, static), args, path, decoder_io(cfg), shapes, translations(static, half))


def export_mllama(checkpoint_dir: str | Path, out_dir: str | Path, log=print, weights: str = "auto") -> Path:
    """Export a Llama-3.2-Vision checkpoint into out_dir (replaced whole, or left untouched on
    failure). weights: fp32, half (the text decoder's projections stored 16-bit,
    half_weights.py) or auto (half when FP32 would crowd this machine's memory: the 11B).

    One part at a time, from the checkpoint's mapped tensors: the embedding table is written
    and the vision encoder exported in FP32 and released before the text decoder is widened or
    halved, so FP32 copies of the two never sit in memory together."""
    t0 = time.monotonic()
    _log = log

    def log(msg):
        rss, peak = memory_gb()
        _log(f"{msg}  [{time.monotonic() - t0:.0f} s, RSS {rss:.1f} GB, peak {peak:.1f} GB]")

    ckpt = read_mllama(checkpoint_dir)
    cfg = ckpt.config
    out_dir = Path(out_dir)
    half = half_weights.choose(cfg, weights) == "half"
    dtype = half_weights.half_dtype([ckpt.tensors["language_model.lm_head.weight"]]) if half else None
    log(f"onnx: {ckpt.path} -> {out_dir} ({cfg.name}, mllama, {ckpt.spelling} layout, "
        f"{'text decoder projections stored 16-bit' if half else 'FP32 weights'})")
    with staged_dir(out_dir) as tmp:
        raw = tmp / "raw"
        (raw / "static").mkdir(parents=True)
        model = Mllama.from_weights(cfg, ckpt.weights(), dtype=None)  # as stored: mapped, not copied
        template = ckpt.chat_template
        ckpt.tensors.clear()
        text = model.language_model
        np.save(tmp / "embed_tokens.npy", text.model.embed_tokens.weight.detach().float().numpy())
        release(text.model.embed_tokens)  # the graphs take embeddings as inputs
        v = cfg.vision
        log(f"onnx: [1/4] vision encoder ({v.num_layers} local + {v.num_global_layers} global layers, "
            f"up to {v.max_num_tiles} tiles of {v.image_size} px) + projector")
        half_weights.widen_rest(model.vision_model)
        half_weights.widen_rest(model.multi_modal_projector)
        export_vision(model, raw / "vision_encoder.onnx")
        release(model.vision_model, model.multi_modal_projector)
        if half:
            half_weights.halve(text.model.layers, dtype)
        half_weights.widen_rest(text)
        log(f"onnx: [2/4] cross-attention K/V ({len(cfg.text.cross_attention_layers)} layers)")
        export_cross_kv(model, raw / "cross_kv.onnx", half)
        log(f"onnx: [2/4] decoder ({cfg.text.kv_layers} self-attention + "
            f"{len(cfg.text.cross_attention_layers)} cross-attention layers)")
        export_decoder(model, raw / "decoder.onnx", static=False, half=half)
        log("onnx: [2/4] decoder, static KV cache (in-place updates)")
        export_decoder(model, raw / "static" / "decoder.static.onnx", static=True, half=half)
        release(model)
        del model, text
        gc.collect()
        log("onnx: [3/4] graph cleanup: vision encoder, cross K/V, decoder")
        cleanup.clean(raw / "vision_encoder.onnx", tmp / "vision_encoder.onnx", *VISION_IO)
        for name, io in (("cross_kv", cross_kv_io(cfg)), ("decoder", decoder_io(cfg))):
            cleanup.clean(raw / f"{name}.onnx", tmp / f"{name}.onnx", *io, **HALF_CLEANUP)
        log("onnx: [3/4] graph cleanup: static decoder (opset 24, weights shared with decoder.onnx)")
        finish_static(raw / "static" / "decoder.static.onnx", tmp / "decoder.static.onnx", decoder_io(cfg),
                      cfg.text.kv_layers)
        shutil.rmtree(raw)
        log("onnx: [4/4] tokenizer, chat template, manifest")
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                shutil.copy2(ckpt.path / name, tmp / name)
        (tmp / CHAT_TEMPLATE_FILE).write_text(template)
        manifest = _manifest(ckpt, cfg, tmp)
        manifest["weights"] = ({"storage": "half", "dtype": str(dtype).removeprefix("torch."),
                                "which": "text decoder projections (self- and cross-attention, MLP)"}
                               if half else {"storage": "fp32"})
        write_manifest(tmp, manifest)
    total = sum(p.stat().st_size for p in out_dir.iterdir()) / 1e6
    log(f"onnx: done in {time.monotonic() - t0:.1f} s, {total:.1f} MB in {out_dir}")
    return out_dir


def _manifest(ckpt, cfg: MllamaConfig, root: Path) -> dict:
    files = {"vision_encoder": "vision_encoder.onnx", "cross_kv": "cross_kv.onnx", "decoder": "decoder.onnx",
             "decoder_static": "decoder.static.onnx", "embed_tokens": "embed_tokens.npy",
             "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
             "chat_template": CHAT_TEMPLATE_FILE}
    for key in ("vision_encoder", "cross_kv", "decoder"):
        if (root / f"{key}.onnx.data").is_file():
            files[f"{key}_data"] = f"{key}.onnx.data"
    v = cfg.vision
    return {
        "kind": "onnx",
        "model": cfg.to_dict(),
        "source": {"checkpoint": str(ckpt.path.resolve()), "sha256": ckpt.sha256(), "layout": ckpt.spelling},
        "image": {"size": v.image_size, "mean": list(v.image_mean), "std": list(v.image_std),
                  "max_tiles": v.max_num_tiles, "tile_tokens": v.tile_tokens,
                  "aspect_ratios": [list(r) for r in v.supported_aspect_ratios]},
        "prompt": {"template": "checkpoint", "image_token_id": cfg.image_token_id,
                   "stop_token_ids": list(cfg.stop_token_ids)},
        "files": files,
        "io": {key: cleanup.io_specs(root / files[key])
               for key in ("vision_encoder", "cross_kv", "decoder", "decoder_static")},
        "limits": {"max_batch": MAX_BATCH, "max_context": cfg.text.max_position},
        "opset": cleanup.TARGET_OPSET,
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
