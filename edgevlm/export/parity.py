"""PyTorch reference vs the exported ONNX graphs under ONNX Runtime, on real photos.

For every photo (and one text-only prompt) both sides preprocess, encode the image, splice,
prefill and decode greedily for a fixed number of tokens without stopping at EOS. Reported:
the largest image-embedding error, the largest logit error over the steps where the two
token streams still agree, and whether the streams are identical. Both decoder graphs are
checked: decoder.onnx (concat KV) and decoder.static.onnx (in-place KV, through the KV pool
serving uses).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgevlm.export import half_weights
from edgevlm.model.checkpoint import read_checkpoint
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.onnxruntime import OrtDecoder, OrtVisionEncoder
from edgevlm.presets import ANYRES
from edgevlm.runtime import anyres
from edgevlm.runtime.image import preprocess_tiles
from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.requests import Preprocessor
from edgevlm.samples import sample_images
from edgevlm.runtime.tokenizer import Tokenizer

QUESTION = "What is in the image? Describe it in one sentence."
TEXT_ONLY = "Name three colours."


@dataclass
class Case:
    name: str
    prompt_tokens: int
    ref_tokens: list[int]
    onnx_tokens: list[int]
    logits_err: float
    logits_scale: float
    image_err: float | None = None
    image_scale: float | None = None
    static_tokens: list[int] | None = None  # decoder.static.onnx, when the export has it

    @property
    def tokens_match(self) -> bool:
        return self.ref_tokens == self.onnx_tokens and self.static_tokens in (None, self.ref_tokens)


@dataclass
class Report:
    cases: list[Case] = field(default_factory=list)
    seconds: float = 0.0

    def worst(self, attr: str) -> float:
        vals = [getattr(c, attr) for c in self.cases if getattr(c, attr) is not None]
        return max(vals) if vals else 0.0

    def ok(self, tol: float) -> bool:
        """Errors are judged relative to the size of what is compared (at least 1)."""
        return (all(c.tokens_match for c in self.cases)
                and self.worst("image_err") <= tol * max(1.0, self.worst("image_scale"))
                and self.worst("logits_err") <= tol * max(1.0, self.worst("logits_scale")))

    def summary(self, tol: float) -> str:
        same = sum(c.tokens_match for c in self.cases)
        n = len(self.cases[0].ref_tokens) if self.cases else 0
        return (f"parity {'PASS' if self.ok(tol) else 'FAIL'}: "
                f"image_embeds max|d| {self.worst('image_err'):.2e} (|x| up to {self.worst('image_scale'):.2f}), "
                f"logits max|d| {self.worst('logits_err'):.2e} (|x| up to {self.worst('logits_scale'):.2f}), "
                f"greedy {n} tokens identical in {same}/{len(self.cases)} prompts, "
                f"tol {tol:g} relative, {self.seconds:.1f} s")


def onnx_greedy(decoder: OrtDecoder, table: EmbeddingTable, ids: list[int],
                image_embeds: np.ndarray | None, n: int, vocab: int | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy over the first `vocab` ids (the tokenizer's), as serving picks."""
    x = table.embed(ids, image_embeds)
    past = decoder.empty_cache()
    pos, out, rows = 0, [], []
    for _ in range(n):
        positions = np.arange(pos, pos + x.shape[1], dtype=np.int64)[None]
        logits, past = decoder(x, positions, past)
        pos += x.shape[1]
        tok = int(logits[0][:vocab].argmax())
        out.append(tok)
        rows.append(logits[0])
        x = table.embed([tok])
    return out, np.stack(rows)


def sequence_greedy(decoder: OrtDecoder, table: EmbeddingTable, ids: list[int],
                    image_embeds: np.ndarray | None, n: int, vocab: int | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy through the decoder's KV pool (the calls the serving scheduler makes)."""
    x = table.embed(ids, image_embeds)
    pool = decoder.open_pool(1, max_context=x.shape[1] + n)
    row = pool.acquire(x.shape[1] + n)
    logits = pool.prefill(row, x)
    out, rows = [], []
    for i in range(n):
        out.append(int(logits[:vocab].argmax()))
        rows.append(logits.copy())
        if i + 1 < n:
            logits = pool.decode([row], table.embed([out[-1]]))[0]
    return out, np.stack(rows)


def _logits_err(ref_tokens, ref_rows, onnx_tokens, onnx_rows) -> float:
    """Max |d| over the steps up to and including the first divergence (after it the two
    sides condition on different tokens and their logits are not comparable)."""
    err = 0.0
    for i, (a, b) in enumerate(zip(ref_tokens, onnx_tokens)):
        err = max(err, float(np.abs(ref_rows[i] - onnx_rows[i]).max()))
        if a != b:
            break
    return err


def run_parity(checkpoint: str | Path, onnx_dir: str | Path, *, clip_dir=None, images=None,
               new_tokens: int = 32, log=print) -> Report:
    """One side at a time: the reference over every case, then the vision encoder, then each
    decoder graph, each released before the next is loaded, so a model needs memory for one
    copy of its weights, not three (a 7B stored 16-bit: 13.5 GB, not 40)."""
    t0 = time.monotonic()
    art = OnnxArtifacts.open(onnx_dir)
    ckpt = read_checkpoint(checkpoint, clip_dir)
    cfg = ckpt.config
    if not cfg.same_shape(art.config):
        raise ValueError(f"{onnx_dir} was exported from a {art.config.name} model, "
                         f"but {checkpoint} is {cfg.name}")
    tok = Tokenizer(art.path("tokenizer"))
    pre = Preprocessor(onnx_dir, tokenizer=tok)  # the prompts as served
    table = EmbeddingTable(art.path("embed_tokens"))
    newline = np.load(art.path("image_newline")) if cfg.image_aspect == ANYRES else None

    cases = []
    for name, data in [*sample_images(images).items(), ("text-only", None)]:
        ids = pre.prompt_ids(QUESTION if data else TEXT_ONLY, images=int(data is not None))
        px, size = (preprocess_tiles(data, cfg.vision.image_size, cfg.image_aspect, cfg.grid_pinpoints)
                    if data else (None, None))
        cases.append({"name": name, "ids": ids, "px": px, "size": size})

    model = half_weights.reference(cfg, ckpt.weights(clip_dir), half_weights.storage_of(art.manifest))
    ckpt.tensors.clear()  # the model holds what it needs: unmap the checkpoint
    gc.collect()
    with torch.no_grad():
        for c in cases:
            px = torch.from_numpy(c["px"]) if c["px"] is not None else None
            c["ref_embeds"] = model.image_features(px, c["size"]).numpy()[None] if px is not None else None
            c["ref_tokens"], rows = model.generate(c["ids"], px, max_new_tokens=new_tokens, stop_ids=[],
                                                   return_logits=True, image_size=c["size"], vocab=tok.vocab_size)
            c["ref_rows"] = rows.numpy()
    del model
    gc.collect()

    vision = OrtVisionEncoder(art.path("vision_encoder"))
    for c in cases:
        c["embeds"] = None
        if c["px"] is not None:
            c["embeds"] = vision(c["px"])
            if newline is not None:  # the runtime's packing, with the export's newline vector
                c["embeds"] = anyres.pack(c["embeds"], c["size"], cfg.grid_pinpoints, cfg.vision.image_size,
                                          newline)[None]
    del vision

    graphs = [("onnx", "decoder", False, onnx_greedy)]
    if "decoder_static" in art.manifest["files"]:
        graphs.append(("static", "decoder_static", True, sequence_greedy))
    for key, file_key, static, greedy in graphs:
        decoder = OrtDecoder(art.path(file_key), cfg.text, static=static)
        for c in cases:
            c[key] = greedy(decoder, table, c["ids"], c["embeds"], new_tokens, tok.vocab_size)
        del decoder
        gc.collect()

    report = Report()
    for c in cases:
        onnx_tokens, onnx_rows = c["onnx"]
        err = _logits_err(c["ref_tokens"], c["ref_rows"], onnx_tokens, onnx_rows)
        static_tokens = None
        if "static" in c:
            static_tokens, static_rows = c["static"]
            err = max(err, _logits_err(c["ref_tokens"], c["ref_rows"], static_tokens, static_rows))
        img_err = img_scale = None
        if c["embeds"] is not None:
            img_err = float(np.abs(c["ref_embeds"] - c["embeds"]).max())
            img_scale = float(np.abs(c["ref_embeds"]).max())
        case = Case(c["name"], len(c["ids"]), c["ref_tokens"], onnx_tokens, err,
                    float(np.abs(c["ref_rows"]).max()), img_err, img_scale, static_tokens)
        report.cases.append(case)
        image = f"image max|d| {img_err:.2e}, " if img_err is not None else ""
        log(f"  {case.name:10s} {case.prompt_tokens:4d} prompt tokens, {image}"
            f"logits max|d| {case.logits_err:.2e}, tokens {'identical' if case.tokens_match else 'DIFFER'}"
            f"{' (concat + static KV)' if static_tokens is not None else ''}"
            f"  {tok.decode(onnx_tokens)[:40]!r}")
    report.seconds = time.monotonic() - t0
    return report
