"""What a request's stream carries: text deltas, then a final event with the request's stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgevlm_client.contract import FINISH_REASONS

# EOS, a stop string or a grammar's end; max_tokens; the client; an answer that is tool calls
STOP, LENGTH, CANCELLED, TOOL_CALLS = FINISH_REASONS


@dataclass
class Stats:
    images: int = 0
    frames: int = 0  # a clip's frames read (LLaVA-NeXT-Video)
    frame_tokens: int = 0  # positions each frame took
    video_decode_ms: float = 0.0
    image_encode_ms: float = 0.0  # all of them, a clip's frames included
    image_cached: bool = False  # every image's embeddings came from the image cache (encode 0 ms)
    image_tokens: int = 0  # positions the images took (LLaVA-1.6: depends on their sizes; Llama-3.2-Vision:
    #                        the image positions its text attends to, its real tiles')
    image_tiles: int = 0  # a cross-attention model's: the tiles the picture was cut into
    queue_ms: float = 0.0  # waiting for a slot (the scheduler's admission queue)
    prefill_tokens: int = 0  # prompt positions, cached ones included
    cached_tokens: int = 0  # of those, taken from the prefix cache instead of prefilled
    prefill_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    finish_reason: str = ""  # one of FINISH_REASONS
    tool_calls: list[dict] | None = None  # with tools: the calls the answer made (contract.TOOL_CHOICES)

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of prefill; decode speed counts the steps after it
        steps = self.decode_tokens - 1
        return steps / (self.decode_ms / 1e3) if steps > 0 and self.decode_ms > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prefill_tokens - self.cached_tokens
        return computed / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2)}


@dataclass
class Event:
    text: str  # new text since the previous event (may be empty)
    stats: Stats | None = None  # set on the last event only
    logprobs: list[dict] | None = None  # with the logprobs option: the tokens since the previous event

    @property
    def final(self) -> bool:
        return self.stats is not None
