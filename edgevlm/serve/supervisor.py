"""Keep a tritonserver serving: restart it when it dies, or when the entry model's python
stub dies.

Triton restarts the stub of a plain python model on its next request, but not the stub of
a decoupled model (python backend, 2.51): once `mobilevlm`'s stub is gone every request fails
with "Stub process ... is not healthy" until the server restarts. Killing that stub in the
middle of a stream can also abort the whole server (seen here: boost lock_exception). Both
end in a restart here; clients ride it out with `wait_ready` and retries. Before each
restart the dead server's part of the log is copied to a file of its own, named in the
supervisor's message, so the reason it died is never lost to the next run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from edgevlm.serve.tritonserver import ServerError, TritonServer

ENTRY_MODEL = "mobilevlm"


class Supervisor:
    def __init__(self, server: TritonServer, *, interval_s: float = 1.0, max_restarts: int = 5,
                 window_s: float = 300.0, log: Callable[[str], None] = print):
        self.server, self.interval_s, self.log = server, interval_s, log
        self.max_restarts, self.window_s = max_restarts, window_s
        self.restarts: deque[float] = deque()
        self.failed: str | None = None  # why it gave up
        self.kept_logs: list = []  # the logs of servers that died, one file each
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def problem(self) -> str | None:
        proc = self.server.proc
        if proc is None:
            return "tritonserver is not running"
        if proc.poll() is not None:
            return f"tritonserver exited with code {proc.returncode}"
        if not self.server.stub_alive(ENTRY_MODEL):
            return f"the python stub of {ENTRY_MODEL} died"
        return None

    def check(self) -> bool:
        """One round: restart if needed. False once it has given up (too many restarts)."""
        why = self.problem()
        if why is None:
            return True
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            self.failed = f"{why}; {len(self.restarts)} restarts in {self.window_s:.0f} s already, giving up"
            self.log(f"supervisor: {self.failed}")
            return False
        self.restarts.append(now)
        try:
            kept = self.server.keep_log(why)
            self.kept_logs.append(kept)
            self.log(f"supervisor: {why}; its log is kept in {kept}; restarting tritonserver")
        except OSError as e:
            self.log(f"supervisor: {why}; could not keep its log ({e}); restarting tritonserver")
        t0 = time.monotonic()
        try:
            self.server.restart()
        except ServerError as e:
            self.log(f"supervisor: restart failed: {e}")
            return True  # counted; tried again next round
        self.log(f"supervisor: serving again after {time.monotonic() - t0:.1f} s")
        return True

    def run(self) -> None:
        """Until stop() or giving up."""
        while not self._stop.wait(self.interval_s):
            if not self.check():
                return

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self.run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends run() at its next wait (safe from a signal handler on the thread running it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
