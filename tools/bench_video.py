"""`make bench`, video: time to first text for a clip against one picture, served.

One tritonserver, one request at a time, new camera frames every run (nothing cached):

  image   a question about one frame, sent as a picture
  clip    the same question about an 8-frame clip of new frames (made into an MP4 on the
          client beforehand, decoded by the server with PyAV)

LLaVA-NeXT-Video pools each frame's grid 2x2 (144 tokens a frame at 7B); a model without a video
mode (MobileVLM) reads each frame as a picture. Frames encoded per second is the clip's frames
over the time the server spent encoding them (the vision tower, the pooling and the projector).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgevlm_client import Client
from edgevlm_client.clips import encode_clip

from edgevlm.manifest import OnnxArtifacts
from edgevlm.samples import SAMPLES, camera_frame

NAMES = list(SAMPLES)
from edgevlm.serve.repository import render_repository
from edgevlm.serve.tritonserver import TritonServer

QUESTION = "What happens here?"
FRAMES = 8
KINDS = ("image", "clip")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _timed(client: Client, tokens: int, **media) -> dict:
    t0 = time.perf_counter()
    stream = client.stream(QUESTION, max_tokens=tokens, **media)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    s = stream.stats
    return {"ttft_ms": ((first or time.perf_counter()) - t0) * 1e3, "encode_ms": s["image_encode_ms"],
            "video_decode_ms": s.get("video_decode_ms", 0.0), "prefill_ms": s["prefill_ms"],
            "prompt_tokens": s["prefill_tokens"], "frames": s.get("frames", 0), "frame_tokens": s.get("frame_tokens", 0)}


def video(onnx_dir: Path, quick: bool, precision: str) -> dict:
    """One served export (precision: what it is, for the table)."""
    big = OnnxArtifacts.open(onnx_dir).config.text.hidden_size >= 4096  # a 7B prefills for minutes here
    runs, tokens, frames = (1, 2, 2) if quick else (1 if big else 3, 4, FRAMES)
    report = {"runs": runs, "tokens": tokens, "frames": frames, "question": QUESTION, "precision": precision}
    rows = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        repo = render_repository(onnx_dir, Path(tmp) / "repository", max_sequences=1)
        with TritonServer(repo) as server:
            client = Client(server.grpc_url, timeout_s=3600)
            client.generate("Hi", max_tokens=2)  # warm-up
            for run in range(runs):
                seed = 7000 + 100 * run
                log(f"video: run {run + 1}/{runs}: one picture, then a {frames}-frame clip")
                rows["image"].append(_timed(client, tokens, image=camera_frame(seed)))
                clip = encode_clip([camera_frame(seed + i + 1, NAMES[i % len(NAMES)]) for i in range(frames)])
                rows["clip"].append(_timed(client, tokens, video=clip, video_frames=frames))
    for kind, measured in rows.items():
        report[kind] = {m: round(statistics.median(r[m] for r in measured), 1) for m in measured[0]}
    image, clip = report["image"], report["clip"]
    report["ratios"] = {"clip_vs_image_ttft": round(clip["ttft_ms"] / image["ttft_ms"], 2),
                        "clip_vs_image_encode": round(clip["encode_ms"] / image["encode_ms"], 2)}
    report["frames_per_s"] = round(clip["frames"] / (clip["encode_ms"] / 1e3), 2)
    return report


def markdown(name: str, by_precision: dict) -> list[str]:
    out = []
    for precision, v in by_precision.items():
        out += [f"### {name}, {precision}", "",
                f"One request at a time, new frames every run ({_runs(v['runs'])}), {v['tokens']} tokens "
                f"per answer, \"{v['question']}\". Image: one frame as a picture. Clip: {v['frames']} new frames as "
                "an MP4, decoded in the server. Time to first text as the gRPC client sees it.", "",
                "| request | TTFT ms | clip decode ms | encode ms | prefill ms | prompt tokens | frames x tokens |",
                "|---|---|---|---|---|---|---|"]
        for kind in KINDS:
            r = v[kind]
            shape = f"{r['frames']:.0f} x {r['frame_tokens']:.0f}" if r["frames"] else "-"
            out.append(f"| {kind} | {r['ttft_ms']:.0f} | {r['video_decode_ms']:.0f} | {r['encode_ms']:.0f} | "
                       f"{r['prefill_ms']:.0f} | {r['prompt_tokens']:.0f} | {shape} |")
        r = v["ratios"]
        out += ["", f"Clip / image: time to first text **{r['clip_vs_image_ttft']:.2f}×**, encode "
                f"{r['clip_vs_image_encode']:.2f}×; frames encoded per second: **{v['frames_per_s']:.2f}**.", ""]
    return out


def _runs(n: int) -> str:
    return "one run" if n == 1 else f"{n} runs, medians"
