"""Build outputs appear whole or not at all.

Every build stage writes into a hidden sibling directory and renames it into place only when
it finished; a failed or interrupted stage leaves no half-written files where the next stage
(or Triton) would pick them up.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `final` on success and vanishes on failure."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from a container's user
    # SIGTERM (`timeout`, a stopped `make`) would end Python without unwinding; as SystemExit it
    # unwinds through here and the scratch directory goes too.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
