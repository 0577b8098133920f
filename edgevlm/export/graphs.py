"""Checkpoint -> ONNX: vision_encoder.onnx, decoder.onnx, embedding table, tokenizer, manifest
(and LLaVA-1.6's image_newline.npy, which the runtime's anyres packing appends to each row).

Tensor contract (float32 graphs; TensorRT lowers them to FP16/INT8 on the device):
  vision_encoder  pixel_values [batch, 3, S, S]  ->  image_embeds [batch, N, D]
  decoder         inputs_embeds [batch, seq, D], position_ids [batch, seq] int64,
                  past_key_<i> / past_value_<i> [batch, kv_heads, past, head_dim]
              ->  logits [batch, vocab] (last position),
                  present_key_<i> / present_value_<i> [batch, kv_heads, past + seq, head_dim]
Prefill passes past = 0; each decode step passes seq = 1 and the previous step's presents.

decoder.static.onnx (see static_cache.py) has the same IO names with past_* / present_* of a
fixed [batch, kv_heads, cache, head_dim]: the cache is updated in place at position_ids[:, 0].
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

from edgevlm.export import cleanup, half_weights, static_cache
from edgevlm.model.checkpoint import TOKENIZER_FILES, read_checkpoint
from edgevlm.runtime.chat_template import CHAT_TEMPLATE_FILE
from edgevlm.runtime.image import PAD_COLOUR
from edgevlm.manifest import write_manifest
from edgevlm.presets import ANYRES, CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX, ModelConfig
from edgevlm.runtime.prompt import STOP_STRING
from edgevlm.model.llama import LlamaDecoder
from edgevlm.model.mobilevlm import MobileVLM
from edgevlm.staging import staged_dir

MAX_BATCH = 64
VISION_IO = (["pixel_values"], ["image_embeds"])


def decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{{}}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return (["inputs_embeds", "position_ids"] + [k.format("past") for k in kv],
            ["logits"] + [k.format("present") for k in kv])


class _DecoderGraph(torch.nn.Module):
    """The decoder with its KV cache flattened into separate graph inputs and outputs."""

    def __init__(self, decoder: LlamaDecoder, static: bool = False):
        super().__init__()
        self.decoder = decoder
        self.static = static

    def forward(self, inputs_embeds, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.decoder(inputs_embeds, position_ids, pairs, static=self.static)
        return (logits, *[t for kv in presents for t in kv])


def _torch_export(module, args, path: Path, names, dynamic_shapes, custom=None) -> None:
    """torch.onnx (dynamo) export, keeping its progress chatter out of our output."""
    chatter = io.StringIO()
    # It also logs one warning per torchvision op it cannot register; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names[0], output_names=names[1],
                          dynamic_shapes=dynamic_shapes, opset_version=cleanup.EXPORT_OPSET,
                          dynamo=True, external_data=True, optimize=True,
                          custom_translation_table=custom)


def export_vision(model: MobileVLM, cfg: ModelConfig, path: Path) -> None:
    s = cfg.vision.image_size
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # Example batch 2: torch.export specialises dimensions whose example size is 0 or 1.
    _torch_export(model.vision, (torch.zeros(2, 3, s, s),), path, VISION_IO, ({0: batch},))


class _VideoGraph(torch.nn.Module):
    """A clip's frames [F, 3, S, S] -> each frame's pooled, projected tokens [F, T, D]."""

    def __init__(self, model: MobileVLM):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        f = pixel_values.shape[0]
        return self.model.video_features(pixel_values).reshape(f, -1, self.model.cfg.text.hidden_size)


def export_video(model: MobileVLM, cfg: ModelConfig, path: Path) -> None:
    """video_encoder.onnx (LLaVA-NeXT-Video): the tower, the 2x2 pool, the projector; the same
    IO names as the vision encoder, frames for pictures."""
    s = cfg.vision.image_size
    frames = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    _torch_export(_VideoGraph(model), (torch.zeros(2, 3, s, s),), path, VISION_IO, ({0: frames},))


def export_decoder(model: MobileVLM, cfg: ModelConfig, path: Path, static: bool = False,
                   half: bool = False) -> None:
    """decoder.onnx (a growing `past`) or, static=True, decoder.static.onnx (a `cache` of
    fixed capacity written at position_ids[:, 0])."""
    t = cfg.text
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=1, max=t.max_position)
    # Example sizes over 1: torch.export specialises dimensions whose example size is 0 or 1.
    if static:  # write 3 positions at 4 into a cache of 11
        kv_dim, b, s, p, kv_len = torch.export.Dim("cache", min=2, max=t.max_position), 2, 3, 4, 11
    else:
        kv_dim, b, s, p, kv_len = torch.export.Dim("past", min=0, max=t.max_position), 2, 3, 4, 4
    kv = [torch.zeros(b, t.num_kv_heads, kv_len, t.head_dim) for _ in range(2 * t.num_layers)]
    args = (torch.zeros(b, s, t.hidden_size), torch.arange(p, p + s).repeat(b, 1), *kv)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: kv_dim} for _ in kv))
    _torch_export(_DecoderGraph(model.decoder, static), args, path, decoder_io(t.num_layers), shapes,
                  translations(static, half))


def translations(static: bool, half: bool) -> dict | None:
    """The exporter's translations of our placeholder ops: the in-place cache write, the
    widening of 16-bit weights."""
    table = {**(static_cache.translation_table() if static else {}),
             **(half_weights.translation_table() if half else {})}
    return table or None


# Cleanup of a graph that may hold 16-bit weights: the Widen placeholders survive it unfolded
# and become Casts at the end (half_weights.py)
HALF_CLEANUP = {"allow_domains": (half_weights.PLACEHOLDER_DOMAIN,), "finish": half_weights.to_casts,
                "unfoldable": half_weights.PLACEHOLDER_OP}


def finish_static(raw: Path, dst: Path, names: tuple[list[str], list[str]], kv_layers: int) -> None:
    """Clean a static export (IO `names`), swap in TensorScatter (and Casts for half-stored
    weights), share weights with decoder.onnx."""
    cleanup.clean(raw, dst, *names, allow_domains=(static_cache.PLACEHOLDER_DOMAIN,),
                  unfoldable=half_weights.PLACEHOLDER_OP)
    model = onnx.load(str(dst), load_external_data=False)
    half_weights.to_casts(model)
    model = static_cache.to_tensor_scatter(model, kv_layers)
    onnx.save_model(model, str(dst))
    static_cache.share_file_weights(dst, dst.with_name("decoder.onnx"))


def release(*modules: torch.nn.Module) -> None:
    """Free the modules' weights now: the exporter's IR keeps references to the parameters
    after export, so their storage is swapped out, not the modules dropped."""
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            t.data = torch.empty(0)
    gc.collect()


def memory_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GB, for progress lines."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0, 0.0
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kb = lambda k: int(fields.get(k, "0 kB").split()[0])
    return kb("VmRSS") / 1e6, kb("VmHWM") / 1e6


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path, clip_dir: str | Path | None = None,
                log=print, weights: str = "auto") -> Path:
    """Export a checkpoint into out_dir (replaced whole, or left untouched on failure).

    weights: fp32, half (the decoder's projections stored 16-bit, half_weights.py) or auto
    (half when FP32 would crowd this machine's memory)."""
    t0 = time.monotonic()
    _log = log

    def log(msg):  # every progress line carries elapsed time and memory
        rss, peak = memory_gb()
        _log(f"{msg}  [{time.monotonic() - t0:.0f} s, RSS {rss:.1f} GB, peak {peak:.1f} GB]")

    ckpt = read_checkpoint(checkpoint_dir, clip_dir)
    cfg = ckpt.config
    out_dir = Path(out_dir)
    storage = half_weights.choose(cfg, weights)
    half = storage == "half"
    log(f"onnx: {ckpt.path} -> {out_dir} ({cfg.name}, {cfg.version}, {cfg.projector_type}, "
        f"{'decoder projections stored 16-bit' if half else 'FP32 weights'})")
    with staged_dir(out_dir) as tmp:
        raw = tmp / "raw"
        raw.mkdir()
        weights = ckpt.weights(clip_dir)
        dtype = half_weights.half_dtype(weights.llm.values()) if half else None
        model = half_weights.reference(cfg, weights, storage)
        if half:
            ckpt.tensors.clear()  # the model holds its own copies now: unmap the checkpoint
        vision_source = weights.vision_source
        del weights
        gc.collect()
        log(f"onnx: [1/4] vision encoder ({cfg.vision.layers_used} CLIP layers + projector)")
        export_vision(model, cfg, raw / "vision_encoder.onnx")
        if cfg.video_pool:
            log(f"onnx: [1/4] video encoder (the same tower, {cfg.video_pool}x{cfg.video_pool} pooling, projector: "
                f"{cfg.frame_tokens} tokens a frame)")
            export_video(model, cfg, raw / "video_encoder.onnx")
        log(f"onnx: [2/4] decoder ({cfg.text.num_layers} layers, KV cache as IO)")
        export_decoder(model, cfg, raw / "decoder.onnx", half=half)
        (raw / "static").mkdir()  # its own folder: each export writes its own weights file
        log("onnx: [2/4] decoder, static KV cache (in-place updates)")
        export_decoder(model, cfg, raw / "static" / "decoder.static.onnx", static=True, half=half)
        np.save(tmp / "embed_tokens.npy", model.decoder.model.embed_tokens.weight.detach().numpy())
        if cfg.image_aspect == ANYRES:  # the runtime packs tiles (runtime/anyres.py)
            np.save(tmp / "image_newline.npy", model.image_newline.detach().float().numpy())
        release(model)  # and the checkpoint's mapped weights with it
        del model
        ckpt.tensors.clear()
        gc.collect()
        log("onnx: [3/4] graph cleanup (fold constants, prune, opset 17): vision encoder")
        cleanup.clean(raw / "vision_encoder.onnx", tmp / "vision_encoder.onnx", *VISION_IO)
        if cfg.video_pool:
            cleanup.clean(raw / "video_encoder.onnx", tmp / "video_encoder.onnx", *VISION_IO)
        log("onnx: [3/4] graph cleanup: decoder")
        cleanup.clean(raw / "decoder.onnx", tmp / "decoder.onnx", *decoder_io(cfg.text.num_layers), **HALF_CLEANUP)
        log("onnx: [3/4] graph cleanup: static decoder (opset 24, weights shared with decoder.onnx)")
        finish_static(raw / "static" / "decoder.static.onnx", tmp / "decoder.static.onnx",
                      decoder_io(cfg.text.num_layers), cfg.text.num_layers)
        shutil.rmtree(raw)
        log(f"onnx: [4/4] tokenizer, manifest (prompt template: {cfg.template})")
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                shutil.copy2(ckpt.path / name, tmp / name)
        if ckpt.chat_template:  # llava-hf: its own, rendered by the runtime as transformers does
            (tmp / CHAT_TEMPLATE_FILE).write_text(ckpt.chat_template)
        manifest = _manifest(ckpt, cfg, tmp, vision_source)
        manifest["weights"] = ({"storage": "half", "dtype": str(dtype).removeprefix("torch."),
                                "which": "decoder layer projections"} if half else {"storage": "fp32"})
        write_manifest(tmp, manifest)
    sizes = {p.name: p.stat().st_size for p in out_dir.iterdir()}
    total = sum(sizes.values()) / 1e6
    log(f"onnx: done in {time.monotonic() - t0:.1f} s, {total:.1f} MB in {out_dir}")
    return out_dir


def _manifest(ckpt, cfg: ModelConfig, root: Path, vision_source: str) -> dict:
    import onnx
    files = {"vision_encoder": "vision_encoder.onnx", "decoder": "decoder.onnx",
             "decoder_static": "decoder.static.onnx",
             "embed_tokens": "embed_tokens.npy", "tokenizer": "tokenizer.model"}
    if (root / "image_newline.npy").is_file():
        files["image_newline"] = "image_newline.npy"
    for key, name in (("chat_template", CHAT_TEMPLATE_FILE), ("tokenizer_config", "tokenizer_config.json")):
        if (root / name).is_file():
            files[key] = name
    if (root / "video_encoder.onnx").is_file():
        files["video_encoder"] = "video_encoder.onnx"
    for key in ("vision_encoder", "video_encoder", "decoder"):  # weights beside each graph
        if (root / f"{key}.onnx.data").is_file():
            files[f"{key}_data"] = f"{key}.onnx.data"
    return {
        "kind": "onnx",
        "model": cfg.to_dict(),
        "source": {"checkpoint": str(ckpt.path.resolve()), "sha256": ckpt.sha256(),
                   "vision_weights": vision_source},
        "image": {"size": cfg.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "pad_colour": list(PAD_COLOUR), "aspect": cfg.image_aspect,
                  "grid_pinpoints": [list(p) for p in cfg.grid_pinpoints],
                  "tokens": cfg.image_tokens, "max_tokens": cfg.max_image_tokens,
                  **({"frame_tokens": cfg.frame_tokens} if cfg.video_pool else {})},
        "prompt": {"template": cfg.template, "image_token_index": IMAGE_TOKEN_INDEX,
                   "stop": [STOP_STRING], "eos_token_id": cfg.text.eos_token_id,
                   "bos_token_id": cfg.text.bos_token_id},
        "files": files,
        "io": {**({"video_encoder": cleanup.io_specs(root / "video_encoder.onnx")} if cfg.video_pool else {}),
               "vision_encoder": cleanup.io_specs(root / "vision_encoder.onnx"),
               "decoder": cleanup.io_specs(root / "decoder.onnx"),
               "decoder_static": cleanup.io_specs(root / "decoder.static.onnx")},
        "limits": {"max_batch": MAX_BATCH, "max_context": cfg.text.max_position},
        "opset": cleanup.TARGET_OPSET,
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
