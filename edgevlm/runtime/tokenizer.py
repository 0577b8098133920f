"""The LLaMA SentencePiece tokenizer, as upstream's slow LlamaTokenizer (legacy mode) uses it.

Runs without torch or transformers: only the `sentencepiece` runtime.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.special = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)}
        self._split = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids. Special-token strings ("</s>" in multi-turn prompts) become their ids;
        each stretch of text between them is encoded on its own, with SentencePiece's dummy
        prefix, which is what the legacy slow tokenizer does."""
        ids = [self.bos_id] if add_bos else []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if skip_special:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id, self.unk_id)]
        return self.sp.decode(list(map(int, ids)))
