"""Chat sessions: follow-up questions about the same frame.

Each request carries the earlier turns; the server lays them out in the model's template,
with the image in the first turn. A turn joins the history only once its answer is complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from edgevlm_client.images import image_bytes
from edgevlm_client.request import Result


class _Session:
    def __init__(self, client, image=None, **options):
        self.client = client
        # encoded once; several images: each at its <image> placeholder (contract IMAGES)
        self.image = (None if image is None else [image_bytes(i) for i in image] if isinstance(image, (list, tuple))
                      else image_bytes(image))
        self.options = options
        self.turns: list[tuple[str, str]] = []

    def _stream(self, question: str, options: dict):
        return self.client.stream(question, image=self.image, history=list(self.turns),
                                  **{**self.options, **options})


class Chat(_Session):
    """With the sync Client: `chat.ask(q)` -> Result, `chat.stream(q)` -> text deltas."""

    def stream(self, question: str, **options) -> Iterator[str]:
        s = self._stream(question, options)
        yield from s
        self.turns.append((question, s.text.strip()))

    def ask(self, question: str, **options) -> Result:
        s = self._stream(question, options)
        for _ in s:
            pass
        self.turns.append((question, s.text.strip()))
        return Result(s.text, s.stats, s.response_format)


class AsyncChat(_Session):
    """With the AsyncClient: `await chat.ask(q)` -> Result, `async for d in chat.stream(q)`."""

    async def stream(self, question: str, **options) -> AsyncIterator[str]:
        s = self._stream(question, options)
        async for delta in s:
            yield delta
        self.turns.append((question, s.text.strip()))

    async def ask(self, question: str, **options) -> Result:
        s = self._stream(question, options)
        async for _ in s:
            pass
        self.turns.append((question, s.text.strip()))
        return Result(s.text, s.stats, s.response_format)
