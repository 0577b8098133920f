"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character
and never show text that later turns out to be part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDecoder:
    """Feed token ids one at a time; get back the new text each makes final.

    SentencePiece drops the leading space of a decoded window and byte-fallback pieces
    make partial characters, so each step decodes a short window twice (up to the last
    emitted token and up to now) and emits the difference, holding back while the tail is
    an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] are already in self.text
        self.text = ""  # decoded so far (stop-string holdback not yet applied)
        self.sent = 0  # characters of self.text already returned
        self.stop = tuple(stop)
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end: whatever is still held back, decoded as the tokenizer decodes it (an
        incomplete trailing character shows as U+FFFD), so the stream adds up to
        tokenizer.decode(all generated ids)."""
        if not self.stopped:
            tail = self.tok.decode(self.ids[self.prefix:])[len(self.tok.decode(self.ids[self.prefix:self.read])):]
            self.text += tail
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        end = len(self.text)
        if not (final or self.stopped):
            # keep back the longest tail that could still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
