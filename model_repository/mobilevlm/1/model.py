"""Triton model `mobilevlm` (decoupled): the entry point clients stream from.

An adapter: its inputs and outputs are the wire contract (edgevlm_client/contract.py;
config.pbtxt is rendered from it), one response per text delta, `stats` JSON on the last.
Each request goes to the intake (edgevlm/runtime/intake.py: checks, preprocessing, the image
cache, the image batcher calling `vision_encoder` through BLS), then to the scheduler
(edgevlm/runtime/scheduler.py), whose thread decodes every active sequence in one batched
step per token and calls back here with each text delta. A cancel message (a request holding
only `cancel`, contract.CANCEL) stops the generation it names at its next step; that
generation still gets its final response with its stats. Failures carry their Triton status:
INVALID_ARG for a bad request, UNAVAILABLE when the admission queue is full ("busy: ..."),
INTERNAL for a bug (adapter.send_error). The metrics are edgevlm/runtime/observer.py's METRICS.

Why BLS from a thread, not `async def execute`: with Triton 2.51 that races in the stub
(triton-inference-server/server#8537). Why preprocessing is not a composing model of its
own: python-backend BLS resets a composed model's error code to INTERNAL
(triton-inference-server/server#7804), so a bad image refused there would reach the client
as a server fault.
"""

import json
import threading

import numpy as np
from adapter import ComposedModelError, model_params, send_error

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text, stats=b"", logprobs=None):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=object)),
        pb_utils.Tensor("stats", np.array([stats], dtype=object)),
        pb_utils.Tensor("logprobs", np.array([json.dumps(logprobs).encode() if logprobs else b""], dtype=object))])


class Metrics:
    """The Observer the scheduler and the intake report to, as Prometheus metrics. Every call
    holds the lock: the stub sends each one to the server as a message, and they come from
    the scheduler thread, the image batcher's and execute()'s."""

    def __init__(self, metrics, outcomes):
        kinds = {"gauge": pb_utils.MetricFamily.GAUGE, "counter": pb_utils.MetricFamily.COUNTER}
        labels = {"model": "mobilevlm"}
        self.families = {m.name: pb_utils.MetricFamily(m.name, m.help, kinds[m.kind]) for m in metrics}
        self.m = {m.name: self.families[m.name].Metric(labels=labels) for m in metrics if not m.labels}
        self.outcomes = {o: self.families["edgevlm_requests_total"].Metric(labels={**labels, "outcome": o})
                         for o in outcomes}
        self.lock = threading.Lock()

    def _add(self, name, value):
        self.m[f"edgevlm_{name}"].increment(value)

    def step(self, rows, seconds):
        with self.lock:
            self.m["edgevlm_batch_size"].set(rows)
            self._add("decode_steps_total", 1)
            self._add("decode_step_seconds_total", seconds)
            self._add("decode_step_rows_total", rows)

    def depth(self, active, queued):
        with self.lock:
            self.m["edgevlm_active_sequences"].set(active)
            self.m["edgevlm_queued_requests"].set(queued)

    def finished(self, outcome, tokens=0):
        with self.lock:
            # tokens first: each increment is its own message to the server, and a reader that
            # sees the outcome counted must also see its tokens
            if tokens:
                self._add("generated_tokens_total", tokens)
            self.outcomes[outcome].increment(1)

    def prefix(self, reused, cache_bytes, evicted):
        with self.lock:
            if reused >= 0:
                self._add("prefix_cache_hits_total" if reused else "prefix_cache_misses_total", 1)
                self._add("prefix_cache_reused_tokens_total", reused)
            self._add("prefix_cache_evictions_total", evicted)
            self.m["edgevlm_prefix_cache_bytes"].set(cache_bytes)

    def image(self, hit, cache_bytes):
        with self.lock:
            self._add("image_cache_hits_total" if hit else "image_cache_misses_total", 1)
            self.m["edgevlm_image_cache_bytes"].set(cache_bytes)

    def cancel_message(self):
        with self.lock:
            self._add("cancel_messages_total", 1)

    def close(self):
        self.m = self.outcomes = None  # a Metric must go before its MetricFamily
        self.families = None


class Stream:
    """One client stream: the scheduler's callbacks send on it."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()

    def cancelled(self):
        return self.sender.is_cancelled() or self.request.is_cancelled()

    def emit(self, event):
        if not event.final:
            self.sender.send(_response(event.text, logprobs=event.logprobs))
        elif event.stats.finish_reason == "cancelled" and self.cancelled():
            # Triton cancelled it (the client went away): nobody reads a response, and writing
            # one while the frontend tears the stream down is the 2.51 crash; FINAL is owed
            self.sender.send(flags=FINAL)
        else:  # finished, or stopped by a cancel message: the client is reading
            self.sender.send(_response(event.text, json.dumps(event.stats.to_dict()).encode(), event.logprobs),
                             flags=FINAL)

    def fail(self, exc):
        send_error(self.sender, exc, "mobilevlm")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("mobilevlm must be decoupled (it streams)")
        params = model_params(args)
        from edgevlm_client.contract import CANCEL

        from edgevlm.runtime import observer
        from edgevlm.runtime.image_cache import ImageCache
        from edgevlm.runtime.intake import Intake, open_preprocessor, open_video_encoder
        from edgevlm.runtime.prefix_cache import PrefixCache
        from edgevlm.runtime.scheduler import Scheduler
        from edgevlm.runtime.text_model import open_text_model
        self.outcome_of = observer.outcome_of
        self.cancel = CANCEL
        self.metrics = Metrics(observer.METRICS, observer.OUTCOMES)
        max_sequences = int(params["max_sequences"])
        # batching "off": one sequence at a time (a one-row pool), what make bench compares with
        rows = 1 if params.get("batching") == "off" else max_sequences
        model = open_text_model(params["onnx_dir"], params["runner"], params.get("engine_dir", ""),
                                params.get("kv_cache", "auto"), rows, int(params.get("kv_budget_mib") or 0))
        prefix_cache = PrefixCache(int(params.get("prefix_cache_mib") or 0) << 20)
        self.scheduler = Scheduler(model, max_queue=int(params.get("max_queue") or 16),
                                   prefill_chunk=int(params.get("prefill_chunk") or 64),
                                   observer=self.metrics, prefix_cache=prefix_cache)
        image_cache = ImageCache(int(params.get("image_cache_mib") or 0) << 20)
        pre, encoder = open_preprocessor(params["onnx_dir"], model.tok, int(params["max_image_pixels"]),
                                         params.get("template") or None)
        self.intake = Intake(pre, self.scheduler, encoder or self._encode, image_cache=image_cache, observer=self.metrics,
                             max_batch=max_sequences, default_max_tokens=int(params["default_max_tokens"]),
                             encode_video=open_video_encoder(params["onnx_dir"]))
        reuse = (prefix_cache.describe() if self.scheduler.cache is not None
                 else "no prefix cache" + (" (this KV layout cannot reuse one)" if prefix_cache.budget else ""))
        pb_utils.Logger.log_info(f"mobilevlm: {model.pool.describe()}; admission queue {self.scheduler.max_queue}; "
                                 f"{reuse}; {image_cache.describe()}")

    def execute(self, requests):
        for request in requests:
            stream = Stream(request)
            try:
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                if self.cancel in inputs:
                    found = self.intake.cancel(inputs)
                    stream.sender.send(_response("", json.dumps({self.cancel: found}).encode()), flags=FINAL)
                    continue
                self.intake.accept(inputs, stream, request.request_id())
            except Exception as e:
                self.metrics.finished(self.outcome_of(e))
                stream.fail(e)
        return None

    def _encode(self, pixel_values):
        """vision_encoder through BLS, for the image batcher's thread: every image that arrived
        while the previous call ran, in one call."""
        response = pb_utils.InferenceRequest(
            model_name="vision_encoder", inputs=[pb_utils.Tensor("pixel_values", pixel_values)],
            requested_output_names=["image_embeds", "encode_ms"]).exec()
        if response.has_error():
            raise ComposedModelError(response.error().message())
        out = lambda name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()  # noqa: E731
        return out("image_embeds").copy(), float(out("encode_ms").reshape(-1)[0])

    def finalize(self):
        self.intake.close()
        self.scheduler.close()
        self.metrics.close()
