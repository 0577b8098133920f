"""A build stage stopped by SIGTERM (`timeout`, a stopped `make`) leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def test_sigterm_during_a_stage_removes_its_scratch_directory(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from edgevlm.staging import staged_dir
        with staged_dir({str(tmp_path / "out")!r}) as tmp:
            (tmp / "half.onnx").write_bytes(b"x" * 1024)
            print(tmp, flush=True)
            sys.stdin.readline()  # the stage is busy until the test stops it
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        scratch = proc.stdout.readline().strip()
        assert scratch.endswith(".partial")
        assert list(tmp_path.iterdir())  # the stage's scratch directory exists while it runs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.iterdir()) == []  # neither the scratch directory nor a half output
