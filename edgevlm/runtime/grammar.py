"""Constrained decoding: answers that match a JSON schema, a regular expression or a list of
choices, by masking every token that cannot continue a match before sampling.

The grammar engine is llguidance (MIT; Rust with a small Python module, no torch): the
runtime must also run on a Jetson without torch, which rules out xgrammar (it requires torch,
transformers and triton); llguidance computes a 32,000-token mask in tens of microseconds per
step on one core; and it takes the vocabulary as the bytes each token stands for, so the
LLaMA tokenizer's byte-fallback pieces (<0x0A> ...) and its "▁" spaces are handled exactly.
outlines-core would also do; it precompiles a whole index per schema up front, which costs
seconds for nested schemas, where llguidance computes masks lazily.

A request's `response_format` (the wire contract's JSON) is one of
  {"type": "json_schema", "schema": {...}}    a JSON Schema the answer must validate against
  {"type": "json_object"}                     any JSON object
  {"type": "regex", "pattern": "..."}         the whole answer matches the pattern
  {"type": "choice", "choices": ["a", ...]}   exactly one of the strings
It is compiled and validated once per distinct format (an invalid one is a BadRequest naming
llguidance's reason, before any decoding); each request gets a copy of the compiled matcher.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import numpy as np

from edgevlm.runtime.errors import BadRequest

TYPES = ("json_schema", "json_object", "regex", "choice")
CACHED_FORMATS = 64  # distinct formats kept compiled (a robot fleet uses a handful)
# JSON without optional whitespace: a program parses it the same, and a random or small
# model cannot spend its max_tokens on blanks between keys
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def parse_format(text: str) -> dict:
    """The response_format input (JSON) -> a checked dict, or BadRequest."""
    try:
        fmt = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"response_format is not JSON: {getattr(e, 'msg', 'nested too deeply')}") from None
    if not isinstance(fmt, dict) or fmt.get("type") not in TYPES:
        raise BadRequest(f"response_format must be an object whose type is one of {', '.join(TYPES)}")
    kind = fmt["type"]
    if kind == "json_schema" and not isinstance(fmt.get("schema"), (dict, bool)):
        raise BadRequest("response_format json_schema needs 'schema': a JSON Schema object")
    if kind == "regex" and not isinstance(fmt.get("pattern"), str):
        raise BadRequest("response_format regex needs 'pattern': a string")
    if kind == "choice":
        choices = fmt.get("choices")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise BadRequest("response_format choice needs 'choices': a list of non-empty strings")
    return fmt


def _lark_string(s: str) -> str:
    return json.dumps(s)  # a Lark string literal has JSON's escapes


class Grammars:
    """Compiled grammars for one tokenizer (one per model instance; thread-safe)."""

    def __init__(self, tokenizer):
        import llguidance
        from edgevlm.runtime.tokenizer import BPETokenizer
        self.ll = llguidance
        if isinstance(tokenizer, BPETokenizer):  # llguidance reads a tokenizer.json itself
            n = max(tokenizer.vocab_size, tokenizer.tk.get_vocab_size(with_added_tokens=True))
            self.lltok = llguidance.LLTokenizer(tokenizer.tk.to_str(), n_vocab=n, eos_token=sorted(tokenizer.stop_ids))
        else:
            self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)),
                                                n_vocab=tokenizer.vocab_size)
        self.vocab = self.lltok.vocab_size
        self.eos = tokenizer.eos_id
        self.compiled: OrderedDict[str, object] = OrderedDict()  # format text -> a fresh matcher to copy
        self.lock = threading.Lock()
        self.compiles = 0  # how many formats were compiled (tests and make bench read it)

    def grammar(self, fmt: dict) -> str:
        M = self.ll.LLMatcher
        kind = fmt["type"]
        if kind == "json_schema":
            return M.grammar_from_json_schema(fmt["schema"], overrides=COMPACT)
        if kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, overrides=COMPACT)
        if kind == "regex":
            return M.grammar_from_regex(fmt["pattern"])
        return M.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in fmt["choices"]))

    def check(self, text: str | None, lark: str | None = None) -> None:
        """Compile (once) the response_format `text`, or a Lark grammar the runtime made (a
        request's tools); BadRequest if it is not one we can honour."""
        if text is not None or lark is not None:
            self._prototype(text, lark)

    def _prototype(self, text: str | None, lark: str | None = None):
        key = text if lark is None else "lark:" + lark
        with self.lock:
            proto = self.compiled.get(key)
            if proto is not None:
                self.compiled.move_to_end(key)
                return proto
        what = "tools"
        if lark is None:
            fmt = parse_format(text)
            what = f"response_format {fmt['type']}"
            try:
                lark = self.grammar(fmt)
            except (ValueError, TypeError) as e:
                raise BadRequest(f"response_format: {e}") from None
        proto = self.ll.LLMatcher(self.lltok, lark, log_level=0)
        if proto.is_error():  # a schema the library cannot compile, named in one line
            raise BadRequest(f"{what}: {_one_line(proto.get_error())}")
        with self.lock:
            self.compiles += 1
            self.compiled[key] = proto
            while len(self.compiled) > CACHED_FORMATS:
                self.compiled.popitem(last=False)
        return proto

    def constraint(self, text: str | None, lark: str | None = None) -> Constraint | None:
        if text is None and lark is None:
            return None
        return Constraint(self._prototype(text, lark).deep_copy(), self)


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()[:500]


class Constraint:
    """One request's matcher: mask the logits, then consume the sampled token."""

    def __init__(self, matcher, grammars: Grammars):
        self.m = matcher
        self.vocab = grammars.vocab
        words = (self.vocab + 31) // 32
        self.bits = np.zeros(words, np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids at -inf (a copy)."""
        self.m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:logits.shape[0]].astype(bool)
        out = np.where(allowed, logits, -np.inf).astype(np.float32, copy=False)
        if not allowed.any():  # cannot happen with a valid grammar; never sample from nothing
            raise RuntimeError(f"the grammar allows no token ({self.m.get_error() or 'no error reported'})")
        return out

    def consume(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused a token it allowed: {self.m.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow: stop here."""
        return self.m.is_stopped()


class _Vocabulary:
    """What llguidance needs of a tokenizer: each token id's bytes, EOS/BOS, and a tokenize
    function, from the SentencePiece model. Special tokens are marked with a leading 0xFF
    byte (llguidance's convention), byte-fallback pieces are their one byte, and "▁" is a
    space."""

    def __init__(self, tokenizer):
        sp = tokenizer.sp
        self.sp = sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        tokens, special = [], []
        for i in range(sp.vocab_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                tokens.append(b"\xff" + piece.encode("utf-8"))
                special.append(i)
            elif sp.is_byte(i):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        self.tokens, self.special_token_ids = tokens, special
        self._ids = {t: i for i, t in reversed(list(enumerate(tokens))) if t and not t.startswith(b"\xff")}
        self._longest = max(map(len, self._ids))

    def __call__(self, text: str) -> list[int]:
        """A tokenization of a fragment (llguidance's helpers use it; masks do not): longest
        vocabulary match first. SentencePiece's own would put a "▁" before the fragment."""
        data, ids, i = text.encode("utf-8"), [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                token = self._ids.get(data[i:i + n])
                if token is not None:
                    ids.append(token)
                    i += n
                    break
            else:  # unreachable with byte fallback: every byte has a token
                raise ValueError(f"byte {data[i]:#x} has no token")
        return ids
