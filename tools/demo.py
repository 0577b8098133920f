"""The end-to-end demo: start tritonserver on the rendered repository, ask about a photo
through the gRPC client, stream the answer, print the timings, stop the server.

    python tools/demo.py --repository artifacts/tiny/repository
"""

from __future__ import annotations

import argparse
import sys
import time

from edgevlm.samples import SAMPLES, sample_image
from edgevlm.serve.tritonserver import ServerError, TritonServer
from edgevlm_client import Client, EdgeVLMError
from edgevlm_client.cli import timing_line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", required=True)
    ap.add_argument("--photo", default="chelsea", choices=list(SAMPLES))
    ap.add_argument("--question", default="What is in the image? Describe it briefly.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--random-weights", action="store_true", help="say that the answer is noise")
    args = ap.parse_args(argv)

    server = TritonServer(args.repository)
    print(f"demo: [1/3] starting tritonserver on 127.0.0.1 (log: {server.log_path})", flush=True)
    t0 = time.monotonic()
    try:
        server.start()
    except ServerError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"demo: [2/3] ready in {time.monotonic() - t0:.1f} s, gRPC at {server.grpc_url}", flush=True)
        print(f"demo: [3/3] asking about scikit-image's '{args.photo}' photo: {args.question!r}", flush=True)
        if args.random_weights:
            print("demo: (random-weight model: the words are noise; MODEL=dir serves a real checkpoint)")
        stream = Client(server.grpc_url).stream(args.question, image=sample_image(args.photo),
                                                max_tokens=args.max_tokens)
        print("answer: ", end="", flush=True)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        print(f"timing: {timing_line(stream.stats)}")
        return 0
    except EdgeVLMError as e:
        print(f"\ndemo: error: {type(e).__name__}: {e}\n{server.log_tail()}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        print("demo: server stopped")


if __name__ == "__main__":
    sys.exit(main())
