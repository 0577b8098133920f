"""A quantized export against its FP32 source, both under ONNX Runtime.

Per photo (up to four, fewer when each image prompt is long) and one text-only prompt, end
to end through each export's own vision encoder and decoder: image-embedding cosine; prefill
logit error; teacher-forced top-1 agreement (the quantized decoder fed the FP32 greedy tokens:
does it pick the same next token?); and whether free-running greedy decoding gives the same
tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgevlm.export.isolated import run_isolated
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.onnxruntime import OrtDecoder, OrtVisionEncoder
from edgevlm.presets import ANYRES
from edgevlm.runtime import anyres
from edgevlm.runtime.image import preprocess_tiles
from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.packed_rows import round_up
from edgevlm.runtime.requests import Preprocessor

QUESTION = "What is in the image? Describe it in one sentence."
TEXT_ONLY = "Name three colours."
STEPS = 32

# Floors a working quantization clears on our random-weight checkpoints; a broken graph (wrong
# scales, a lost DQ) falls to ~0 on every one. Random weights make these figures pessimistic:
# next-token margins are tiny (INT8 at the 1.7B shape: top-1 81 %), and INT4 round-to-nearest
# on Gaussian weights leaves ~12 % noise per weight through 24 layers (1.7B: logits cosine
# 0.87). The FP32 choice staying in the quantized top 5 is the steadier signal.
THRESHOLDS = {
    # FP16 weights and activations with FP32 norms: rounding only, well inside int8's floors
    "fp16": {"image_cosine_min": 0.999, "logits_cosine_min": 0.999, "teacher_forced_top5": 0.99,
             "teacher_forced_agreement": 0.90},
    "int8": {"image_cosine_min": 0.98, "logits_cosine_min": 0.99, "teacher_forced_top5": 0.95,
             "teacher_forced_agreement": 0.60},
    "int4": {"image_cosine_min": 0.98, "logits_cosine_min": 0.80, "teacher_forced_top5": 0.50,
             "teacher_forced_agreement": 0.20},
}


class QuantizationError(ValueError):
    pass


@dataclass
class QuantReport:
    image_cosine_min: float = 1.0
    image_cosine_mean: float = 1.0
    logits_cosine_min: float = 1.0
    logits_max_abs_err: float = 0.0
    logits_max_abs: float = 0.0
    teacher_forced_agreement: float = 1.0   # quantized top-1 == FP32 greedy token
    teacher_forced_top5: float = 1.0        # FP32 greedy token within the quantized top 5
    greedy_identical: int = 0
    cases: int = 0
    first_divergence: list[int] = field(default_factory=list)
    size_mb: dict = field(default_factory=dict)

    def failures(self, precision: str) -> list[str]:
        t = THRESHOLDS[precision]
        return [f"{k} {getattr(self, k):.4f} < {v}" for k, v in t.items() if getattr(self, k) < v]

    def raise_if_failed(self, precision: str) -> None:
        bad = self.failures(precision)
        if bad:
            raise QuantizationError(f"{precision} graph fails its accuracy check: {'; '.join(bad)} "
                                    f"({self.summary(precision)})")

    def summary(self, precision: str) -> str:
        s = self.size_mb
        return (f"{precision}: image cosine min {self.image_cosine_min:.4f} | logits cosine min "
                f"{self.logits_cosine_min:.4f}, max |d| {self.logits_max_abs_err:.3g} of {self.logits_max_abs:.3g} | "
                f"teacher-forced top-1 {100 * self.teacher_forced_agreement:.1f}%, top-5 "
                f"{100 * self.teacher_forced_top5:.1f}% | greedy {STEPS} tokens identical "
                f"{self.greedy_identical}/{self.cases} | decoder {s.get('decoder_fp32', 0):.1f} -> "
                f"{s.get('decoder', 0):.1f} MB, vision {s.get('vision_fp32', 0):.1f} -> {s.get('vision', 0):.1f} MB")

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _size_mb(root: Path, key: str) -> float:
    return sum(p.stat().st_size for p in root.glob(f"{key}.onnx*")) / 2**20


def weights_stem(files: dict[str, str], key: str) -> str:
    """The file stem holding a graph's weights: a static decoder's are in its concat twin's
    data file."""
    return files[key].removesuffix(".onnx").replace("decoder.static", "decoder")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


class _Pipeline:
    def __init__(self, root: Path, decoder: str = "decoder", vision: str = "vision_encoder"):
        """decoder: a concat-KV graph's key, or a static one's (decoder_static*: in-place KV)."""
        art = OnnxArtifacts.open(root)
        self.cfg = art.config
        self.vision = OrtVisionEncoder(art.path(vision))
        self.decoder = OrtDecoder(art.path(decoder), self.cfg.text, static=decoder.startswith("decoder_static"))
        self.table = EmbeddingTable(art.path("embed_tokens"))
        self.newline = np.load(art.path("image_newline")) if self.cfg.image_aspect == ANYRES else None

    def image(self, data: bytes) -> np.ndarray:
        """A photo -> its image_embeds [1, T, D], as the runtime makes them (anyres: packed)."""
        c = self.cfg
        px, size = preprocess_tiles(data, c.vision.image_size, c.image_aspect, c.grid_pinpoints)
        feats = self.vision(px)
        if self.newline is None:
            return feats
        return anyres.pack(feats, size, c.grid_pinpoints, c.vision.image_size, self.newline)[None]

    def prefill(self, ids, image_embeds, capacity, rows: int = 1):
        """(a KV pool of `rows` rows, its first row holding the prompt; the last logits)."""
        d = self.decoder  # a static pool of exactly `rows` such rows (its default caps at RAM/4)
        budget = rows * round_up(capacity) * d.cfg.kv_bytes_per_position(d.kv_dtype.itemsize)
        pool = d.open_pool(rows, budget_bytes=budget, max_context=capacity)
        row = pool.acquire(capacity)
        return (pool, row), pool.prefill(row, self.table.embed(ids, image_embeds))

    @staticmethod
    def fork(seq):
        """A second row of seq's pool holding the same positions: a prompt prefilled once
        serves two continuations (at 7B with anyres, a prefill is minutes)."""
        pool, row = seq
        twin = pool.acquire(row.capacity)
        pool.load(twin, pool.save(row, row.length))
        return pool, twin

    def step(self, seq, token):
        pool, row = seq
        return pool.decode([row], self.table.embed([token]))[0]


def check_quantized(fp32_dir: str | Path, quant_dir: str | Path, images: dict[str, bytes],
                    decoder: str = "decoder", vision: str = "vision_encoder") -> QuantReport:
    """decoder, vision: the manifest keys of the quantized export's graphs to check
    (decoder_cpu, vision_encoder_cpu: the forms the cpu target serves)."""
    return check_forms(fp32_dir, quant_dir, images, [(decoder, vision)])[0]


@dataclass
class _Expected:
    """What the FP32 export does on one case: all a quantized form is measured against."""
    image: bytes | None
    ids: list[int]
    image_embeds: np.ndarray | None
    logits: np.ndarray          # after the prefill
    tokens: list[int]           # STEPS greedy tokens


# Image prompt positions the check prefills per form, summed over its photos: up to 4 photos,
# fewer when each prompt is long (an anyres 7B: ~2,900 positions, a prefill of minutes on a
# CPU). At least one photo is always checked.
PHOTO_POSITIONS = 6000


def _reference(fp32_dir: Path, images: dict[str, bytes], decoder: str, budget: int) -> list[_Expected]:
    ref = _Pipeline(fp32_dir, decoder)
    pre = Preprocessor(fp32_dir)  # the prompts as served
    out, positions = [], 0
    for img in list(images.values())[:4]:
        emb = ref.image(img)
        ids = pre.prompt_ids(QUESTION, images=1)
        out.append(_greedy(ref, img, ids, emb))
        positions += _capacity(ids, emb)
        if positions + _capacity(ids, emb) > budget:
            break
    out.append(_greedy(ref, None, pre.prompt_ids(TEXT_ONLY, images=0), None))
    return out


def _greedy(ref: _Pipeline, image, ids, emb) -> _Expected:
    seq, logits = ref.prefill(ids, emb, _capacity(ids, emb))
    first, tokens = logits.copy(), []
    for i in range(STEPS):
        tokens.append(int(np.argmax(logits)))
        if i + 1 < STEPS:
            logits = ref.step(seq, tokens[-1])
    seq[0].close()
    return _Expected(image, ids, emb, first, tokens)


def _capacity(ids: list[int], image_embeds: np.ndarray | None) -> int:
    return len(ids) + (0 if image_embeds is None else image_embeds.shape[1] - 1) + STEPS + 1


def check_forms(fp32_dir: str | Path, quant_dir: str | Path, images: dict[str, bytes],
                forms: list[tuple[str, str]]) -> list[QuantReport]:
    """One report per (decoder, vision) pair of manifest keys. The FP32 export runs once for
    all of them; it and each form run in a process of their own (isolated.py), so none is in
    memory beside another (at 7B two would not fit on a 24 GiB machine, and a released one
    still holds its arenas)."""
    fp32_dir, quant_dir = Path(fp32_dir), Path(quant_dir)
    # the FP32 graph of the forms' KV layout: a static one holds a row's KV once, where a concat
    # row holds it twice (past and present); at 7B with anyres, 3 GB per 2,900-position row
    static = all(d.startswith("decoder_static") for d, _ in forms)
    expected = run_isolated(_reference, fp32_dir, images, "decoder_static" if static else "decoder",
                            PHOTO_POSITIONS)
    return [run_isolated(_measure_form, fp32_dir, quant_dir, decoder, vision, expected) for decoder, vision in forms]


def _measure_form(fp32_dir: Path, quant_dir: Path, decoder: str, vision: str,
                  expected: list[_Expected]) -> QuantReport:
    files = OnnxArtifacts.open(quant_dir).manifest["files"]
    q = _Pipeline(quant_dir, decoder, vision)
    r = QuantReport(size_mb={"decoder_fp32": _size_mb(fp32_dir, "decoder"),
                             "decoder": _size_mb(quant_dir, weights_stem(files, decoder)),
                             "vision_fp32": _size_mb(fp32_dir, "vision_encoder"),
                             "vision": _size_mb(quant_dir, weights_stem(files, vision))})
    cosines, agree, top5, total = [], 0, 0, 0
    for e in expected:
        emb_q = None
        if e.image is not None:
            emb_q = q.image(e.image)
            cosines.extend(_cosine(e.image_embeds, emb_q).tolist())
        # one prefill, two continuations: teacher-forced (fed the FP32 tokens) and free-running
        seq_t, lt = q.prefill(e.ids, emb_q, _capacity(e.ids, e.image_embeds), rows=2)
        seq_f, lf = q.fork(seq_t), lt.copy()
        r.logits_cosine_min = min(r.logits_cosine_min, float(_cosine(e.logits, lt).min()))
        r.logits_max_abs_err = max(r.logits_max_abs_err, float(np.abs(e.logits - lt).max()))
        r.logits_max_abs = max(r.logits_max_abs, float(np.abs(e.logits).max()))
        free_tokens = []
        for i, t_ref in enumerate(e.tokens):
            t_q, t_free = int(np.argmax(lt)), int(np.argmax(lf))
            agree += t_ref == t_q
            top5 += t_ref in np.argpartition(lt.reshape(-1), -5)[-5:]
            total += 1
            free_tokens.append(t_free)
            if i + 1 < STEPS:
                lt, lf = q.step(seq_t, t_ref), q.step(seq_f, t_free)
        seq_t[0].close()
        r.cases += 1
        r.greedy_identical += e.tokens == free_tokens
        r.first_divergence.append(next((i for i, (a, b) in enumerate(zip(e.tokens, free_tokens)) if a != b),
                                       STEPS))
    if cosines:
        r.image_cosine_min, r.image_cosine_mean = float(np.min(cosines)), float(np.mean(cosines))
    r.teacher_forced_agreement, r.teacher_forced_top5 = agree / total, top5 / total
    return r
