"""Llama-3.2-Vision: the PyTorch reference vs the exported graphs under ONNX Runtime, on real
photos and one text-only prompt (`make verify` for a cross-attention export).

Both sides take the same prompt ids (the checkpoint's chat template) and tiles. Reported: the
largest error of the image's cross-attention K/V (vision_encoder.onnx then cross_kv.onnx), the
largest logit error while the token streams agree, and whether greedy tokens are identical
through decoder.onnx (concat KV, called plainly) and decoder.static.onnx (through the KV pool
the scheduler drives).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgevlm.export.parity import QUESTION, TEXT_ONLY, Case, Report, _logits_err
from edgevlm.manifest import OnnxArtifacts
from edgevlm.model.mllama import Mllama
from edgevlm.model.mllama_checkpoint import read_mllama
from edgevlm.runtime.cross_attention import CrossImage, CrossRow, cross_mask, decode_row
from edgevlm.runtime.cross_requests import CrossImageEncoder, CrossPreprocessor
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.onnxruntime import OrtDecoder, session
from edgevlm.samples import sample_images


def _concat_greedy(path: Path, cfg, table: EmbeddingTable, ids: list[int], image: CrossImage | None,
                   mask: np.ndarray | None, n: int) -> tuple[list[int], np.ndarray]:
    """decoder.onnx called step by step with every input spelled out (no pool)."""
    sess = session(path)
    t, length = cfg.text, cfg.cross_length
    names = [i.name for i in sess.get_inputs()]
    past = [np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32) for _ in range(2 * t.kv_layers)]
    kv = [a[None] for a in image.kv] if image is not None else \
        [np.zeros((1, t.num_kv_heads, length, t.head_dim), np.float32)] * (2 * len(t.cross_attention_layers))
    rows = mask if mask is not None else np.zeros((len(ids), length), np.float32)
    x, pos, out, logits_rows = table.embed(ids), 0, [], []
    for _ in range(n):
        s = x.shape[1]
        feeds = dict(zip(names, [x, np.arange(pos, pos + s, dtype=np.int64)[None], rows[None].astype(np.float32),
                                 np.array([float(image is not None)], np.float32), *past, *kv]))
        logits, *past = sess.run(None, feeds)
        pos += s
        tok = int(logits[0][:t.vocab_size].argmax())
        out.append(tok)
        logits_rows.append(logits[0])
        x, rows = table.embed([tok]), decode_row(rows)
    return out, np.stack(logits_rows)


class ServedDecoder:
    """An export's static decoder run as the scheduler runs it: one pool row with the image's K/V."""

    def __init__(self, root: Path, decoder_key: str = "decoder_static"):
        art = OnnxArtifacts.open(root)
        self.cfg = art.config
        self.decoder = OrtDecoder(art.path(decoder_key), self.cfg.text, static=True,
                                  cross_length=self.cfg.cross_length)
        self.table = EmbeddingTable(art.path("embed_tokens"))

    def logits(self, ids: list[int], cross: CrossRow | None, steps: int, tokens: list[int] | None = None) -> np.ndarray:
        """The logits of `steps` positions: after the prompt, then after each token fed, which
        is `tokens[i]` (teacher forcing) or, without tokens, this decoder's own greedy pick."""
        vocab = self.cfg.text.vocab_size
        pool = self.decoder.open_pool(1, max_context=len(ids) + steps)
        row = pool.acquire(len(ids) + steps, cross)
        rows = [pool.prefill(row, self.table.embed(ids))[:vocab]]
        for i in range(steps - 1):
            t = tokens[i] if tokens is not None else int(rows[-1].argmax())
            rows.append(pool.decode([row], self.table.embed([t]))[0][:vocab].copy())
        pool.close()
        return np.stack(rows)


def run_mllama_parity(checkpoint_dir: str | Path, onnx_dir: str | Path, images: list[str], new_tokens: int = 32,
                      log=print) -> Report:
    t0 = time.monotonic()
    art = OnnxArtifacts.open(onnx_dir)
    ckpt = read_mllama(checkpoint_dir)
    cfg = ckpt.config
    ref = Mllama.from_weights(cfg, ckpt.weights())
    pre = CrossPreprocessor(onnx_dir)
    encoder = CrossImageEncoder(onnx_dir)
    table = EmbeddingTable(art.path("embed_tokens"))
    static = ServedDecoder(art.root)
    v, report = cfg.vision, Report()
    cases = [(name, data) for name, data in sample_images(images).items()] + [("text only", None)]
    for name, data in cases:
        inputs = {"prompt": np.array([(QUESTION if data else TEXT_ONLY).encode()], dtype=object)}
        if data is not None:
            inputs["image"] = np.array([data], dtype=object)
        prepared = pre.from_inputs(inputs)
        ids = prepared.input_ids.tolist()
        image = mask = cross = None
        image_err = image_scale = None
        with torch.no_grad():
            if data is not None:
                px, ratio, tiles = (torch.from_numpy(a) for a in prepared.image.pixel_values)
                want = [t.numpy()[0] for kv in ref.language_model.cross_kv(ref.cross_states(px, ratio, tiles))
                        for t in kv]
                got, _ = encoder(prepared.image.pixel_values)
                image = CrossImage([a[0] for a in got], prepared.image.tiles, v.tile_tokens)
                image_err = max(float(np.abs(a - b).max()) for a, b in zip(image.kv, want))
                image_scale = max(float(np.abs(b).max()) for b in want)
                mask = cross_mask(ids, cfg.image_token_id, [prepared.image.tiles], v.max_num_tiles, v.tile_tokens)
                cross = CrossRow(image, mask)
                ref_tokens, ref_rows = ref.generate(ids, px, ratio, tiles, max_new_tokens=new_tokens,
                                                    vocab=cfg.text.vocab_size)
            else:
                ref_tokens, ref_rows = ref.generate(ids, max_new_tokens=new_tokens, vocab=cfg.text.vocab_size)
        onnx_tokens, onnx_rows = _concat_greedy(art.path("decoder"), cfg, table, ids, image, mask, new_tokens)
        static_tokens = [int(r.argmax()) for r in static.logits(ids, cross, new_tokens)]
        ref_rows = ref_rows.numpy()
        case = Case(name, len(ids), ref_tokens, onnx_tokens,
                    _logits_err(ref_tokens, ref_rows, onnx_tokens, onnx_rows), float(np.abs(ref_rows).max()),
                    image_err, image_scale, static_tokens)
        report.cases.append(case)
        log(f"verify: {name}: {len(ids)} prompt tokens, {prepared.image.tiles if data else 0} tile(s), "
            f"tokens {'identical' if case.tokens_match else 'DIFFER'}, logits max|d| {case.logits_err:.2e}"
            + (f", cross K/V max|d| {image_err:.2e}" if image_err is not None else ""))
    report.seconds = time.monotonic() - t0
    return report
