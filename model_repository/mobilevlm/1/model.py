"""Triton model `mobilevlm` (decoupled): the entry point clients stream from.

Its inputs and outputs are the wire contract (edgevlm_client/contract.py; config.pbtxt is
rendered from it): one response per text delta, `stats` JSON on the last.

Per request, inside execute(): the request is checked and preprocessed here (image decode,
prompt template, tokens), then `vision_encoder` runs through BLS; the decode loop then runs on
a worker thread (up to `max_sequences` at once) and streams. A cancelled stream stops at the
next token and frees its KV cache. Failures carry their Triton status: INVALID_ARG for a bad
request, UNAVAILABLE for no room, INTERNAL for a bug (adapter.send_error: the status is in the
`stats` of the response before the error, as the wire contract says).

Why preprocessing is not a composing model of its own: python-backend BLS resets a composed
model's error code to INTERNAL (triton-inference-server/server#7804, Triton 2.51), so a bad
image refused there would reach the client as a server fault. Here its refusal keeps
INVALID_ARG; it also saves a stub process and a shared-memory copy of the pixels.

Prometheus metrics (Triton's metrics endpoint): edgevlm_active_sequences (gauge; back to 0
when idle, or a sequence leaked), edgevlm_requests_total{outcome=complete|cancelled|invalid|
error}, edgevlm_generated_tokens_total.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from adapter import bls, model_params, send_error

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text, stats=b""):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=object)),
        pb_utils.Tensor("stats", np.array([stats], dtype=object))])


def _outcome(exc):
    """How a failed request is counted: by its status, like the client sees it."""
    return "invalid" if getattr(exc, "status", None) == "INVALID_ARG" else "error"


class Metrics:
    OUTCOMES = ("complete", "cancelled", "invalid", "error")

    def __init__(self):
        G, C = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.families = [
            pb_utils.MetricFamily("edgevlm_active_sequences", "Sequences being decoded now", G),
            pb_utils.MetricFamily("edgevlm_requests_total", "Finished requests by outcome", C),
            pb_utils.MetricFamily("edgevlm_generated_tokens_total", "Tokens generated", C)]
        labels = {"model": "mobilevlm"}
        self.active = self.families[0].Metric(labels=labels)
        self.outcomes = {o: self.families[1].Metric(labels={**labels, "outcome": o}) for o in self.OUTCOMES}
        self.tokens = self.families[2].Metric(labels=labels)
        self.lock = threading.Lock()

    def finished(self, outcome, tokens=0):
        with self.lock:
            self.outcomes[outcome].increment(1)
            if tokens:
                self.tokens.increment(tokens)

    def close(self):
        # a Metric must go before its MetricFamily
        self.active = self.outcomes = self.tokens = None
        self.families = None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("mobilevlm must be decoupled (it streams)")
        params = model_params(args)
        from edgevlm_client import contract

        from edgevlm.runtime import requests
        from edgevlm.runtime.runners import load_generator
        self.requests = requests
        self.prompt_inputs = contract.PROMPT_INPUTS
        self.decode_inputs = [t.name for t in contract.INPUTS if t.name not in contract.PROMPT_INPUTS]
        self.gen = load_generator(params["onnx_dir"], params["runner"], params.get("engine_dir", ""),
                                  params.get("kv_cache", "auto"))
        self.pre = requests.Preprocessor(params["onnx_dir"], max_image_pixels=int(params["max_image_pixels"]),
                                         tokenizer=self.gen.tok)
        self.default_max_tokens = int(params["default_max_tokens"])
        self.pool = ThreadPoolExecutor(max_workers=int(params["max_sequences"]),
                                       thread_name_prefix="decode")
        self.metrics = Metrics()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                get = lambda name: pb_utils.get_input_tensor_by_name(request, name)  # noqa: E731
                pixel_values, input_ids = self.pre.from_inputs(
                    {name: get(name).as_numpy() for name in self.prompt_inputs if get(name) is not None})
                embeds, encode_ms = bls("vision_encoder", [pb_utils.Tensor("pixel_values", pixel_values)],
                                        ["image_embeds", "encode_ms"])
                # Copy out of shared memory: the decode loop outlives execute(). The ids are our own.
                inputs = {name: get(name).as_numpy().copy() for name in self.decode_inputs if get(name) is not None}
                inputs.update(input_ids=input_ids.tolist(), image_embeds=embeds.copy(), encode_ms=encode_ms.copy())
            except Exception as e:
                self.metrics.finished(_outcome(e))
                send_error(sender, e, "mobilevlm")
                continue
            self.pool.submit(self._decode, inputs, sender, request)
        return None

    def _decode(self, inputs, sender, request):
        with self.metrics.lock:
            self.metrics.active.increment(1)
        outcome, tokens = "error", 0
        try:
            r = self.requests
            params = r.sampling_params(inputs, self.default_max_tokens)
            encode_ms = r.scalar(inputs, "encode_ms", "f", float) or 0.0
            for event in self.gen.generate(inputs["input_ids"], r.image_embeds_or_none(inputs["image_embeds"]), params,
                                           image_encode_ms=encode_ms,
                                           cancelled=lambda: sender.is_cancelled() or request.is_cancelled()):
                if not event.final:
                    sender.send(_response(event.text))
                    continue
                tokens = event.stats.decode_tokens
                if event.stats.finish_reason == "cancelled":
                    outcome = "cancelled"
                    sender.send(flags=FINAL)  # FINAL is owed even to a cancelled request
                else:
                    outcome = "complete"
                    sender.send(_response(event.text, json.dumps(event.stats.to_dict()).encode()), flags=FINAL)
        except Exception as e:
            outcome = _outcome(e)
            try:
                send_error(sender, e, "mobilevlm")
            except Exception as failed:  # the stream may already be closed
                pb_utils.Logger.log_error(f"mobilevlm: could not report the failure: {failed}")
        finally:
            self.metrics.finished(outcome, tokens)
            with self.metrics.lock:
                self.metrics.active.increment(-1)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
