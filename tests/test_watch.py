"""`edgevlm-client watch` against the real server, on a video file written here from the
bundled photos (PyAV encodes it): JSON lines per answered frame, several questions per frame,
a clean end at --max-frames and at the end of the video, and latest-frame semantics: a video
played at its frame rate faster than the model answers has frames dropped and counted, and
every frame is either answered or counted dropped."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from edgevlm_client import AsyncClient
from PIL import Image

from edgevlm.samples import sample_image

av = pytest.importorskip("av")


def write_video(path, fps: int, frames: int) -> str:
    """`frames` frames at `fps`: the chelsea, coffee and astronaut photos in turn, a third each."""
    photos = [np.array(Image.open(io.BytesIO(sample_image(name))).convert("RGB").resize((320, 240)))
              for name in ("chelsea", "coffee", "astronaut")]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(frames):
            picture = av.VideoFrame.from_ndarray(photos[i * len(photos) // frames], format="rgb24")
            out.mux(stream.encode(picture))
        out.mux(stream.encode())
    return str(path)


def watch(server, *args: str) -> tuple[list[dict], str, int]:
    proc = subprocess.run([sys.executable, "-m", "edgevlm_client.cli", "--url", server.grpc_url, "watch", *args],
                          capture_output=True, text=True, timeout=600)
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr, proc.returncode


def test_watch_answers_frames_as_json_lines_and_stops_at_max_frames(server, tmp_path):
    video = write_video(tmp_path / "camera.mp4", fps=10, frames=30)
    lines, err, code = watch(server, video, "What is in the image?", "Is there a cat?",
                             "--max-frames", "3", "--max-tokens", "6", "--no-realtime", "--stats")
    assert code == 0, err
    assert len(lines) == 6  # two questions about each of three frames
    assert [line["question"] for line in lines] == ["What is in the image?", "Is there a cat?"] * 3
    # --no-realtime: frame by frame, none dropped
    assert [line["frame"] for line in lines] == [0, 0, 1, 1, 2, 2]
    for line in lines:
        assert line["answer"] and line["ttft_ms"] > 0 and line["stats"]["decode_tokens"] >= 1
        assert line["pts_s"] == pytest.approx(line["frame"] / 10, abs=1e-3)
        assert line["frames_dropped"] == 0
    # the second question about a frame finds its image cached
    assert all(line["stats"]["image_cached"] for line in lines[1::2])
    assert "3 frames answered" in err


def test_a_camera_faster_than_the_model_has_its_frames_dropped_not_queued(server, tmp_path):
    """A 200 fps video played in real time: each answer of 48 tokens takes longer than a
    frame's 5 ms, so frames arrive while the model answers; each is dropped and counted, and
    each answer is about the newest frame."""
    n = 200
    video = write_video(tmp_path / "fast.mp4", fps=200, frames=n)
    lines, err, code = watch(server, video, "Describe it.", "--max-tokens", "48")
    assert code == 0, err
    assert lines and lines[-1]["frame"] == n - 1  # the end of the video is answered
    dropped = lines[-1]["frames_dropped_total"]
    assert dropped > 0
    assert len(lines) + dropped == n  # every frame answered or counted dropped
    assert sum(line["frames_dropped"] for line in lines) == dropped
    indices = [line["frame"] for line in lines]
    assert indices == sorted(set(indices))


def test_the_library_api_watches_with_an_async_client(server, tmp_path):
    from edgevlm_client.watch import watch as watch_frames
    video = write_video(tmp_path / "clip.mp4", fps=5, frames=4)

    async def run():
        async with AsyncClient(server.grpc_url, timeout_s=120) as client:
            return [line async for line in watch_frames(client, video, ["Hi?"], max_tokens=4, realtime=False)]
    lines = asyncio.run(run())
    assert [line["frame"] for line in lines] == [0, 1, 2, 3]  # to the end of the file, in order
    assert lines[-1]["frames_dropped_total"] == 0


def test_a_source_that_cannot_be_opened_is_one_line(server, tmp_path):
    lines, err, code = watch(server, str(tmp_path / "missing.mp4"), "Hi?")
    assert (lines, code) == ([], 2)
    assert err.strip().count("\n") == 0 and "cannot open video source" in err


def test_interrupting_watch_stops_its_generation_with_a_cancel_message(server, tmp_path):
    """Ctrl-C while an answer streams: the generation on the server is stopped by a cancel
    message on its stream (not a gRPC-level cancel), and counted cancelled."""
    import signal

    from support import LONG, active, abandoned_until_cancelled, wait_until
    video = write_video(tmp_path / "one.mp4", fps=5, frames=1)

    def like_a_terminal():
        # a test run started in the background (CI) has Ctrl-C ignored, and children inherit
        # that; the user at a terminal does not, so the child gets the default back
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def abandon(max_tokens):
        proc = subprocess.Popen([sys.executable, "-m", "edgevlm_client.cli", "--url", server.grpc_url, "watch",
                                 video, "Tell me a long story.", "--max-frames", "1", "--max-tokens", str(max_tokens)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=like_a_terminal)
        try:
            wait_until(lambda: active(server) == 1 or proc.poll() is not None, "the answer to start")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) in (0, 130, -signal.SIGINT)
        finally:
            if proc.poll() is None:
                proc.kill()

    delta = abandoned_until_cancelled(server, abandon, LONG)
    assert delta["cancel_messages"] == 1
