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
    stop: tuple[str, ...] = ()
    response_format: str | None = None  # JSON (contract.RESPONSE_FORMATS); checked by grammar.Grammars

    def validate(self) -> SamplingParams:
        """Each parameter in its contract range, or BadRequest with the reason."""
        for param in PARAMETERS:
            value = getattr(self, param.name)
            why = None if value is None else param.limit.reason(param.name, value)
            if why:
                raise BadRequest(why)
        why = stop_reason(self.stop)
        if why:
            raise BadRequest(why)
        return self


class Sampler:
    """Picks the next token: the grammar's mask (constrained decoding), repetition penalty,
    then greedy or temperature / top-k / top-p."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], constraint=None,
                 vocab: int | None = None):
        self.p = params
        # Only ids the tokenizer can spell are candidates: llava-hf pads the logits past the
        # tokenizer (<image>, <pad>, then to a multiple of 64), and those rows are never text.
        self.vocab = vocab
        self.rng = np.random.default_rng(params.seed)
        # Penalised ids: the prompt's (as transformers does) plus everything generated.
        self.seen = {int(i) for i in prompt_ids if i >= 0}
        self.constraint = constraint  # grammar.Constraint or None

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
        if p.repetition_penalty != 1.0 and self.seen:
            logits = logits.astype(np.float32, copy=True)
            idx = np.fromiter(self.seen, np.int64)
            idx = idx[idx < logits.shape[0]]
            v = logits[idx]
            logits[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.temperature == 0.0:
            tok = int(np.argmax(logits))
        else:
            tok = self._sample(logits.astype(np.float64) / p.temperature)
        self.seen.add(tok)
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
