"""What the scheduler and the request intake report, and the Prometheus metrics the Triton
model makes of it: the one list of metrics (the model registers them from METRICS; the wire
contract's document lists them from it) and the one spelling of each request outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# How a request ended, as edgevlm_requests_total{outcome=...} counts it.
OUTCOMES = COMPLETE, CANCELLED, INVALID, REFUSED, ERROR = ("complete", "cancelled", "invalid", "refused", "error")


def outcome_of(exc: BaseException) -> str:
    """A failed request's outcome, by the status the client sees (runtime/errors.py)."""
    return {"INVALID_ARG": INVALID, "UNAVAILABLE": REFUSED}.get(getattr(exc, "status", None), ERROR)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "gauge" | "counter"
    help: str
    labels: tuple[str, ...] = ()  # beyond `model`


METRICS = (
    Metric("edgevlm_active_sequences", "gauge", "Sequences admitted (prefilling or decoding); 0 when idle"),
    Metric("edgevlm_queued_requests", "gauge", "Requests waiting for a slot"),
    Metric("edgevlm_batch_size", "gauge", "Rows in the last decode step"),
    Metric("edgevlm_decode_steps_total", "counter", "Decode steps run"),
    Metric("edgevlm_decode_step_seconds_total", "counter", "Time spent in decode steps"),
    Metric("edgevlm_decode_step_rows_total", "counter", "Rows summed over decode steps"),
    Metric("edgevlm_requests_total", "counter", "Finished requests by outcome", ("outcome",)),
    Metric("edgevlm_generated_tokens_total", "counter", "Tokens generated"),
    Metric("edgevlm_cancel_messages_total", "counter", "Cancel messages received (in-band cancellation)"),
    Metric("edgevlm_prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix's KV"),
    Metric("edgevlm_prefix_cache_misses_total", "counter", "Prompts prefilled from scratch"),
    Metric("edgevlm_prefix_cache_reused_tokens_total", "counter", "Prompt positions taken from the prefix cache"),
    Metric("edgevlm_prefix_cache_evictions_total", "counter", "Prefix cache entries evicted for room"),
    Metric("edgevlm_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache"),
    Metric("edgevlm_image_cache_hits_total", "counter", "Images whose embeddings were cached"),
    Metric("edgevlm_image_cache_misses_total", "counter", "Images encoded"),
    Metric("edgevlm_image_cache_bytes", "gauge", "Bytes held by the image cache"),
)


class Observer(Protocol):
    """Receives what happens; every method may be called from any thread."""

    def step(self, rows: int, seconds: float) -> None:
        """A decode step of `rows` rows took `seconds`."""

    def depth(self, active: int, queued: int) -> None:
        """Rows admitted and requests waiting (queued or holding a reservation), after a change."""

    def finished(self, outcome: str, tokens: int = 0) -> None:
        """A request ended (one of OUTCOMES) after generating `tokens`."""

    def prefix(self, reused: int, cache_bytes: int, evicted: int) -> None:
        """A prefix-cache lookup (reused 0: a miss) or store (reused -1)."""

    def image(self, hit: bool, cache_bytes: int) -> None:
        """An image-cache lookup."""

    def cancel_message(self) -> None:
        """A cancel message arrived (contract.CANCEL)."""


class Quiet(Observer):
    """An observer that ignores everything (in-process use without metrics)."""
