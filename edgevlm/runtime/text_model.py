"""The text side of a served model, as the scheduler runs it: tokenizer, embedding table, the
decoder's KV pool and the context a request may fill; constrained decoding's grammars are
compiled for its vocabulary on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.kv_pool import KVPool
from edgevlm.runtime.runners import open_decoder
from edgevlm.presets import MLLAMA
from edgevlm.runtime.tokenizer import BPETokenizer, Tokenizer


@dataclass
class TextModel:
    tok: Tokenizer
    table: EmbeddingTable
    pool: KVPool
    max_context: int  # positions a request may fill (a TensorRT engine may hold fewer than the model)
    _grammars: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def grammars(self):
        """Constrained decoding's compiled grammars (built at first use: 0.2-0.4 s for the vocabulary)."""
        with self._lock:
            if self._grammars is None:
                from edgevlm.runtime.grammar import Grammars
                self._grammars = Grammars(self.tok)
            return self._grammars


def open_text_model(onnx_dir: str | Path, runner: str = "onnxruntime", engine_dir: str | Path = "",
                    kv_cache: str = "auto", max_rows: int = 1, kv_budget_mib: int = 0) -> TextModel:
    """The model's decoder with a KV pool of `max_rows` rows (kv_budget_mib 0: the pool's default)."""
    art = OnnxArtifacts.open(onnx_dir)
    decoder = open_decoder(art.root, runner, engine_dir, kv_cache)
    pool = decoder.open_pool(max_rows, kv_budget_mib << 20)
    return TextModel(open_tokenizer(art), EmbeddingTable(art.path("embed_tokens")), pool,
                     max_context=min(art.config.text.max_position, decoder.max_context))


def open_tokenizer(art: OnnxArtifacts) -> Tokenizer | BPETokenizer:
    """The export's tokenizer: Llama 3's BPE tokenizer.json for Llama-3.2-Vision, the LLaMA
    SentencePiece model for the others."""
    cfg = art.config
    if cfg.family == MLLAMA:
        return BPETokenizer(art.path("tokenizer"), cfg.text.vocab_size, cfg.stop_token_ids)
    return Tokenizer(art.path("tokenizer"), cfg.text.eos_token_id)
