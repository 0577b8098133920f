"""Helpers the integration tests share: read the server's outcome metrics, wait on them, and
retry policies that record (and can act on) each retry. Waits are on counts and metrics with
generous limits, never on how fast this machine is."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edgevlm_client import Retry

from edgevlm.runtime.observer import OUTCOMES
PATIENCE_S = 120.0  # a limit for hangs only: every wait ends as soon as its event happens
# A generation as long as the tiny model's 512-position context allows after a short prompt.
LONG = 440


def outcomes(server) -> dict[str, float]:
    m = server.metrics()
    out = {o: m.get(f'edgevlm_requests_total{{model="mobilevlm",outcome="{o}"}}', 0.0) for o in OUTCOMES}
    out["tokens"] = m.get('edgevlm_generated_tokens_total{model="mobilevlm"}', 0.0)
    out["cancel_messages"] = m.get('edgevlm_cancel_messages_total{model="mobilevlm"}', 0.0)
    return out


def active(server) -> float:
    return server.metrics()['edgevlm_active_sequences{model="mobilevlm"}']


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = PATIENCE_S):
    """Poll `condition` until it returns something true; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # Triton's metrics can only be polled; the event, not this interval, ends the wait


def settle(server, finished: float) -> dict[str, float]:
    """Wait until the server has finished `finished` requests in all and none is active."""
    def done():
        got = outcomes(server)
        return got if sum(got[o] for o in OUTCOMES) >= finished and active(server) == 0 else None
    return wait_until(done, f"{finished:.0f} finished requests and no active sequence")


def abandoned_until_cancelled(server, abandon: Callable[[int], None], max_tokens: int,
                              attempts: int = 6) -> dict[str, float]:
    """Run `abandon(max_tokens)` (start a long generation, take a little of it, go away) until
    the server counts one as cancelled; return that attempt's outcome deltas.

    A generation may legitimately finish before the server hears the client left; each
    attempt asks for as many tokens as the context holds so that this is rare (on a busy
    machine the client's reaction can take a fair share of the tiny model's ~0.5 s of
    generation), and one attempt in `attempts` must end cancelled. A server that never
    cancels fails every one."""
    seen = []
    for _ in range(attempts):
        before = settle(server, 0)
        abandon(max_tokens)
        after = settle(server, sum(before[o] for o in OUTCOMES) + 1)
        delta = {k: after[k] - before[k] for k in after}
        assert delta["error"] == delta["invalid"] == 0, delta
        if delta["cancelled"] == 1:
            return delta
        seen.append({k: v for k, v in delta.items() if v})
    raise AssertionError(f"none of {attempts} abandoned {max_tokens}-token generations was cancelled: {seen}")


@dataclass(frozen=True)
class RecordingRetry(Retry):
    """A Retry that records each delay it hands out (one per retry), and runs `on_retry`
    before handing it out: a test can act at the moment the client decides to retry."""
    drawn: list = field(default_factory=list, compare=False)
    on_retry: Callable[[int], None] | None = field(default=None, compare=False)

    def delays(self) -> Iterator[float]:
        for i, delay in enumerate(super().delays()):
            if self.on_retry is not None:
                self.on_retry(i)
            self.drawn.append(delay)
            yield delay
