"""The tokenizers the runtime runs, without torch or transformers:

  Tokenizer     the LLaMA SentencePiece model, as upstream's slow LlamaTokenizer (legacy mode)
                uses it (MobileVLM, LLaVA): the `sentencepiece` runtime
  BPETokenizer  a byte-level BPE tokenizer.json (Llama 3, Llama-3.2-Vision): the `tokenizers`
                runtime, the one transformers' fast tokenizers run

Both encode text to ids (special-token strings become their ids), decode ids to text, and name
the ids that end an answer (`stop_ids`).
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_file: str | Path, eos_token_id: int | None = None):
        """eos_token_id: the config's id that ends an answer, where it is not the model's </s>
        (chatml's <|im_end|>, LLaVA-1.6-34B); None: </s>."""
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.stop_ids = frozenset({self.eos_id if eos_token_id is None else eos_token_id})
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

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: "▁" is a space, a byte-fallback piece its byte."""
        if self.sp.is_byte(token):
            return bytes([int(self.sp.id_to_piece(token)[3:5], 16)])
        if self.sp.is_control(token) or self.sp.is_unknown(token):
            return b""
        return self.sp.id_to_piece(token).replace("\u2581", " ").encode("utf-8")


class BPETokenizer:
    """tokenizer.json through the `tokenizers` runtime. vocab_size: the ids the model can
    produce (its lm_head's rows; the file may hold more, such as <|image|>); stop_ids: the ids
    that end an answer (generation_config.json's eos_token_id)."""

    def __init__(self, path: str | Path, vocab_size: int, stop_ids, bos: str = "<|begin_of_text|>"):
        from tokenizers import Tokenizer as Runtime
        self.tk = Runtime.from_file(str(path))
        self.vocab_size = vocab_size
        self.bos_id = self.tk.token_to_id(bos)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.eos_id = min(self.stop_ids)
        self.special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Special-token strings in the text become their ids (a chat template writes them)."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(map(int, ids)), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (byte-level BPE spells each byte as a printable
        character; special tokens stand for nothing)."""
        if token in self.special.values():
            return b""
        piece = self.tk.id_to_token(token) or ""
        return bytes(_BYTE_OF[c] for c in piece if c in _BYTE_OF)


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes: the printable Latin-1 bytes stand for themselves, the
    others (controls, space, the gaps) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF = _byte_alphabet()
