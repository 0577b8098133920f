"""Generation parameters, their validation, and next-token selection from logits (numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from edgevlm_client.contract import BY_NAME, PARAMETERS, stop_reason

from edgevlm.runtime.errors import BadRequest


def _default(name: str):
    return BY_NAME[name].default


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation parameters; defaults and ranges are the wire contract's."""
    max_tokens: int = _default("max_tokens")
    temperature: float = _default("temperature")  # 0 = greedy
    top_p: float = _default("top_p")
    top_k: int = _default("top_k")  # 0 = no limit
    repetition_penalty: float = _default("repetition_penalty")
    seed: int | None = _default("seed")
    presence_penalty: float = _default("presence_penalty")
    frequency_penalty: float = _default("frequency_penalty")
    min_tokens: int = _default("min_tokens")
    ignore_eos: bool = _default("ignore_eos")
    logprobs: int | None = _default("logprobs")  # alternatives to report per token (None: no logprobs)
    stop: tuple[str, ...] = ()
    response_format: str | None = None  # JSON (contract.RESPONSE_FORMATS); checked by grammar.Grammars
    grammar: str | None = None  # a Lark grammar the runtime made (tools.Toolset.grammar), not a contract input

    def validate(self) -> SamplingParams:
        """Each parameter in its contract range, or BadRequest with the reason."""
        for param in PARAMETERS:
            value = getattr(self, param.name)
            why = None if value is None or param.limit is None else param.limit.reason(param.name, value)
            if why:
                raise BadRequest(why)
        if self.min_tokens > self.max_tokens:
            raise BadRequest(f"min_tokens ({self.min_tokens}) is more than max_tokens ({self.max_tokens})")
        why = stop_reason(self.stop)
        if why:
            raise BadRequest(why)
        return self


class Sampler:
    """Picks the next token: the grammar's mask (constrained decoding), the end-of-answer
    tokens held back (min_tokens, ignore_eos), repetition, presence and frequency penalties,
    then greedy or temperature / top-k / top-p."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], constraint=None,
                 vocab: int | None = None, stop_ids: Sequence[int] = ()):
        self.p = params
        # Only ids the tokenizer can spell are candidates: llava-hf pads the logits past the
        # tokenizer (<image>, <pad>, then to a multiple of 64), and those rows are never text.
        self.vocab = vocab
        self.rng = np.random.default_rng(params.seed)
        # Penalised ids: the prompt's (as transformers does) plus everything generated.
        self.seen = {int(i) for i in prompt_ids if i >= 0}
        self.counts: dict[int, int] = {}  # generated tokens (presence and frequency penalties)
        self.generated = 0
        self.stop_ids = np.asarray(sorted(stop_ids), np.int64)
        self.constraint = constraint  # grammar.Constraint or None
        # with params.logprobs: the last pick's (log-probability, [(id, log-probability)] of
        # the most likely alternatives), from the distribution it was drawn from
        self.last_logprobs: tuple[float, list[tuple[int, float]]] | None = None

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more: the answer ends here."""
        return self.constraint is not None and self.constraint.complete

    def __call__(self, logits: np.ndarray) -> int:
        if self.vocab is not None and logits.shape[0] > self.vocab:
            logits = logits[:self.vocab]
        if self.constraint is None:
            return self._pick(logits)
        logits = self.constraint.mask(logits)
        tok = self._pick(logits)
        self.constraint.consume(tok)
        return tok

    def _pick(self, logits: np.ndarray) -> int:
        p = self.p
        if (p.ignore_eos or self.generated < p.min_tokens) and len(self.stop_ids):
            held = logits.astype(np.float32, copy=True)
            held[self.stop_ids[self.stop_ids < held.shape[0]]] = -np.inf
            if np.isfinite(held).any():  # a grammar that allows only the end still ends
                logits = held
        if p.repetition_penalty != 1.0 and self.seen:
            logits = logits.astype(np.float32, copy=True)
            idx = np.fromiter(self.seen, np.int64)
            idx = idx[idx < logits.shape[0]]
            v = logits[idx]
            logits[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            logits = logits.astype(np.float32, copy=True)
            idx = np.fromiter(self.counts, np.int64)
            n = np.fromiter(self.counts.values(), np.float32)
            keep = idx < logits.shape[0]
            logits[idx[keep]] -= p.frequency_penalty * n[keep] + p.presence_penalty
        if p.temperature == 0.0:
            tok = int(np.argmax(logits))
            if p.logprobs is not None:
                self.last_logprobs = _logprobs(logits.astype(np.float64), tok, p.logprobs)
        else:
            z = logits.astype(np.float64) / p.temperature
            tok = self._sample(z)
            if p.logprobs is not None:
                self.last_logprobs = _logprobs(z, tok, p.logprobs)
        self.seen.add(tok)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.generated += 1
        return tok

    def _sample(self, z: np.ndarray) -> int:
        p = self.p
        if 0 < p.top_k < z.shape[0]:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            # the smallest prefix whose mass reaches top_p; the top token always stays
            keep = (np.cumsum(sorted_p) - sorted_p) < p.top_p
            probs = np.zeros_like(probs)
            probs[order[keep]] = sorted_p[keep]
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))


def _logprobs(z: np.ndarray, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax of z at `tok`, and the k most likely ids with theirs (masked ids are -inf)."""
    finite = np.isfinite(z)
    m = z[finite].max()
    lse = m + np.log(np.exp(z[finite] - m).sum())
    top = np.argpartition(-z, k)[:k] if 0 < k < z.shape[0] else np.arange(z.shape[0] if k else 0)
    top = top[np.argsort(-z[top], kind="stable")]
    return float(z[tok] - lse), [(int(i), float(z[i] - lse)) for i in top if finite[i]]
