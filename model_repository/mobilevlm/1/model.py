"""Triton model `mobilevlm` (decoupled): the entry point clients stream from.

Inputs:  image BYTES [1] (optional; encoded JPEG/PNG/...), prompt BYTES [1], raw_prompt BOOL [1],
         history BYTES [1] (JSON [[question, answer], ...] of earlier turns), system BYTES [1]
         (replaces the template's system line),
         max_tokens INT32, temperature FP32, top_p FP32, top_k INT32, repetition_penalty FP32,
         seed INT64 (each optional, [1]), stop BYTES [K] (optional).
Outputs: one response per text delta: text BYTES [1] and stats BYTES [1], which is empty
         except on the last response (JSON: image_encode_ms, prefill_tokens, prefill_ms,
         decode_tokens, decode_ms, decode_tokens_per_s, finish_reason).

Per request: `preprocess` and `vision_encoder` run through BLS inside execute(); the decode
loop then runs on a worker thread (up to `max_sequences` at once) and streams. A cancelled
stream stops at the next token and frees its KV cache.

Prometheus metrics (Triton's metrics endpoint): edgevlm_active_sequences (gauge; back to 0
when idle, or a sequence leaked), edgevlm_requests_total{outcome=complete|cancelled|invalid|
error}, edgevlm_generated_tokens_total.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from model_params import model_params

PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text, stats=b""):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=object)),
        pb_utils.Tensor("stats", np.array([stats], dtype=object))])


def _error(message, invalid):
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


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
        from edgevlm import serving
        from edgevlm.sampling import InvalidRequest
        self.serving, self.invalid = serving, InvalidRequest
        self.gen = serving.load_generator(params["onnx_dir"], params["runner"], params.get("engine_dir", ""),
                                          params.get("kv_cache", "auto"))
        self.vocab = self.gen.tok.vocab_size
        self.default_max_tokens = int(params["default_max_tokens"])
        self.pool = ThreadPoolExecutor(max_workers=int(params["max_sequences"]),
                                       thread_name_prefix="decode")
        self.metrics = Metrics()

    def _bls(self, model, inputs, outputs):
        """Run a composing model; its error becomes this request's error, reason intact."""
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                             requested_output_names=outputs).exec()
        if response.has_error():
            message = response.error().message()
            raise (RuntimeError if message.startswith("internal error") else self.invalid)(message)
        return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                get = lambda name: pb_utils.get_input_tensor_by_name(request, name)  # noqa: E731
                pre_inputs = [t for t in (get("image"), get("prompt"), get("raw_prompt"), get("history"),
                                                get("system"))
                              if t is not None]
                pixel_values, input_ids = self._bls("preprocess", pre_inputs, ["pixel_values", "input_ids"])
                embeds, encode_ms = self._bls("vision_encoder", [pb_utils.Tensor("pixel_values", pixel_values)],
                                              ["image_embeds", "encode_ms"])
                # Copy out of shared memory: the decode loop outlives execute().
                inputs = {name: get(name).as_numpy().copy() for name in PARAMS if get(name) is not None}
                inputs.update(input_ids=input_ids.copy(), image_embeds=embeds.copy(), encode_ms=encode_ms.copy())
            except self.invalid as e:
                self.metrics.finished("invalid")
                sender.send(_error(str(e), invalid=True), flags=FINAL)
                continue
            except Exception as e:
                self.metrics.finished("error")
                pb_utils.Logger.log_error(f"mobilevlm: {type(e).__name__}: {e}")
                sender.send(_error(f"internal error: {type(e).__name__}: {e}", invalid=False), flags=FINAL)
                continue
            self.pool.submit(self._decode, inputs, sender, request)
        return None

    def _decode(self, inputs, sender, request):
        with self.metrics.lock:
            self.metrics.active.increment(1)
        outcome, tokens = "error", 0
        try:
            s = self.serving
            params = s.sampling_params(inputs, self.default_max_tokens)
            ids = s.check_ids(inputs["input_ids"], self.vocab)
            encode_ms = s.scalar(inputs, "encode_ms", "f", float) or 0.0
            for event in self.gen.generate(ids, s.image_embeds_or_none(inputs["image_embeds"]), params,
                                           image_encode_ms=encode_ms,
                                           cancelled=lambda: sender.is_cancelled() or request.is_cancelled()):
                if not event.final:
                    sender.send(_response(event.text))
                    continue
                tokens = event.stats.decode_tokens
                if event.stats.finish_reason == "cancelled":
                    outcome = "cancelled"
                    pb_utils.Logger.log_info(f"mobilevlm: cancelled after {event.stats.decode_tokens} "
                                             f"of {params.max_tokens} tokens")
                    sender.send(flags=FINAL)  # FINAL is owed even to a cancelled request
                else:
                    outcome = "complete"
                    sender.send(_response(event.text, json.dumps(event.stats.to_dict()).encode()), flags=FINAL)
        except self.invalid as e:
            outcome = "invalid"
            sender.send(_error(str(e), invalid=True), flags=FINAL)
        except Exception as e:
            pb_utils.Logger.log_error(f"mobilevlm: {type(e).__name__}: {e}")
            try:
                sender.send(_error(f"internal error: {type(e).__name__}: {e}", invalid=False), flags=FINAL)
            except Exception as send_error:  # the stream may already be closed
                pb_utils.Logger.log_error(f"mobilevlm: could not report the failure: {send_error}")
        finally:
            self.metrics.finished(outcome, tokens)
            with self.metrics.lock:
                self.metrics.active.increment(-1)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
