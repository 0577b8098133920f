"""Triton model `mobilevlm` (decoupled): the entry point clients stream from.

Its inputs and outputs are the wire contract (edgevlm_client/contract.py; config.pbtxt is
rendered from it): one response per text delta, `stats` JSON on the last.

Per request, inside execute(): the request is checked and preprocessed here (image decode,
prompt template, tokens). A request with an image goes to the image batcher
(edgevlm/runtime/batcher.py), whose thread calls `vision_encoder` through BLS once for all
the images that arrived while its previous call ran, so a burst of frames is encoded in one
call. Then the request goes to the scheduler (edgevlm/runtime/scheduler.py), whose thread
decodes every active sequence in one batched step per token and calls back here with each
text delta. (Not an `async def execute` awaiting BLS: with Triton 2.51 that races in the
stub, triton-inference-server/server#8537.) A cancelled stream leaves the batch
at the next step and frees its slot. Failures carry their Triton status: INVALID_ARG for a
bad request, UNAVAILABLE when the admission queue is full ("busy: ..."), INTERNAL for a bug
(adapter.send_error: the status is in the `stats` of the response before the error, as the
wire contract says).

`batching: off` keeps the per-request loop (a thread and a batch-1 decode per request) for
`make bench` to compare against.

Why preprocessing is not a composing model of its own: python-backend BLS resets a composed
model's error code to INTERNAL (triton-inference-server/server#7804, Triton 2.51), so a bad
image refused there would reach the client as a server fault. Here its refusal keeps
INVALID_ARG; it also saves a stub process and a shared-memory copy of the pixels.

Prometheus metrics (Triton's metrics endpoint): edgevlm_active_sequences (gauge; back to 0
when idle, or a sequence leaked), edgevlm_queued_requests (gauge), edgevlm_batch_size (gauge:
rows in the last decode step), edgevlm_decode_steps_total, edgevlm_decode_step_seconds_total
and edgevlm_decode_step_rows_total (counters: their ratios are the mean step time and batch),
edgevlm_requests_total{outcome=complete|cancelled|invalid|refused|error} (refused: busy),
edgevlm_generated_tokens_total; the caches: edgevlm_prefix_cache_{hits,misses,reused_tokens,
evictions}_total, edgevlm_prefix_cache_bytes, edgevlm_image_cache_{hits,misses}_total,
edgevlm_image_cache_bytes.

A request whose image bytes were seen recently takes their embeddings from the image cache
(edgevlm/runtime/image_cache.py): no decode, no resize, no vision_encoder call, `stats` says
image_cached. The scheduler's prefix cache (edgevlm/runtime/prefix_cache.py) then skips the
prefill of whatever the prompt shares with an earlier sequence (`stats`: cached_tokens).
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from adapter import ComposedModelError, model_params, send_error

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text, stats=b""):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=object)),
        pb_utils.Tensor("stats", np.array([stats], dtype=object))])


def _outcome(exc):
    """How a failed request is counted: by its status, like the client sees it."""
    return {"INVALID_ARG": "invalid", "UNAVAILABLE": "refused"}.get(getattr(exc, "status", None), "error")


class Metrics:
    """Prometheus families, fed by the scheduler (it calls step/depth/finished)."""
    OUTCOMES = ("complete", "cancelled", "invalid", "refused", "error")

    def __init__(self):
        G, C = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        labels = {"model": "mobilevlm"}
        self.families = {
            name: pb_utils.MetricFamily(name, doc, kind) for name, doc, kind in (
                ("edgevlm_active_sequences", "Sequences admitted (prefilling or decoding)", G),
                ("edgevlm_queued_requests", "Requests waiting for a slot", G),
                ("edgevlm_batch_size", "Rows in the last decode step", G),
                ("edgevlm_decode_steps_total", "Decode steps run", C),
                ("edgevlm_decode_step_seconds_total", "Time spent in decode steps", C),
                ("edgevlm_decode_step_rows_total", "Rows summed over decode steps", C),
                ("edgevlm_requests_total", "Finished requests by outcome", C),
                ("edgevlm_generated_tokens_total", "Tokens generated", C),
                ("edgevlm_prefix_cache_hits_total", "Prompts that reused a cached prefix's KV", C),
                ("edgevlm_prefix_cache_misses_total", "Prompts prefilled from scratch", C),
                ("edgevlm_prefix_cache_reused_tokens_total", "Prompt positions taken from the prefix cache", C),
                ("edgevlm_prefix_cache_evictions_total", "Prefix cache entries evicted for room", C),
                ("edgevlm_prefix_cache_bytes", "Bytes held by the prefix cache", G),
                ("edgevlm_image_cache_hits_total", "Images whose embeddings were cached", C),
                ("edgevlm_image_cache_misses_total", "Images encoded", C),
                ("edgevlm_image_cache_bytes", "Bytes held by the image cache", G))}
        m = {name: f.Metric(labels=labels) for name, f in self.families.items() if name != "edgevlm_requests_total"}
        self.active, self.queued, self.batch = (m["edgevlm_active_sequences"], m["edgevlm_queued_requests"],
                                                m["edgevlm_batch_size"])
        self.steps, self.step_seconds, self.step_rows = (m["edgevlm_decode_steps_total"],
                                                         m["edgevlm_decode_step_seconds_total"],
                                                         m["edgevlm_decode_step_rows_total"])
        self.tokens = m["edgevlm_generated_tokens_total"]
        self.prefix_hits, self.prefix_misses, self.prefix_reused, self.prefix_evictions, self.prefix_bytes = (
            m[f"edgevlm_prefix_cache_{k}"] for k in ("hits_total", "misses_total", "reused_tokens_total",
                                                     "evictions_total", "bytes"))
        self.image_hits, self.image_misses, self.image_bytes = (
            m[f"edgevlm_image_cache_{k}"] for k in ("hits_total", "misses_total", "bytes"))
        self.outcomes = {o: self.families["edgevlm_requests_total"].Metric(labels={**labels, "outcome": o})
                         for o in self.OUTCOMES}
        self.lock = threading.Lock()

    # The scheduler's Observer interface. Every metric call holds the lock: the stub sends
    # each one to the server as a message, and they come from the scheduler thread, the
    # execute() loop and (batching off) the decode threads.
    def step(self, rows, seconds):
        with self.lock:
            self.batch.set(rows)
            self.steps.increment(1)
            self.step_seconds.increment(seconds)
            self.step_rows.increment(rows)

    def depth(self, active, queued):
        with self.lock:
            self.active.set(active)
            self.queued.set(queued)

    def add_active(self, n):
        with self.lock:
            self.active.increment(n)

    def finished(self, outcome, tokens=0):
        with self.lock:
            self.outcomes[outcome].increment(1)
            if tokens:
                self.tokens.increment(tokens)

    def prefix(self, reused, cache_bytes, evicted):
        with self.lock:
            if reused >= 0:
                (self.prefix_hits if reused else self.prefix_misses).increment(1)
                self.prefix_reused.increment(reused)
            self.prefix_evictions.increment(evicted)
            self.prefix_bytes.set(cache_bytes)

    def image(self, hit, cache_bytes):
        with self.lock:
            (self.image_hits if hit else self.image_misses).increment(1)
            self.image_bytes.set(cache_bytes)

    def close(self):
        # a Metric must go before its MetricFamily
        self.active = self.queued = self.batch = self.steps = self.step_seconds = None
        self.step_rows = self.tokens = self.outcomes = None
        self.prefix_hits = self.prefix_misses = self.prefix_reused = self.prefix_evictions = None
        self.prefix_bytes = self.image_hits = self.image_misses = self.image_bytes = None
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
            self.sender.send(_response(event.text))
        elif event.stats.finish_reason == "cancelled":
            self.sender.send(flags=FINAL)  # FINAL is owed even to a cancelled request
        else:
            self.sender.send(_response(event.text, json.dumps(event.stats.to_dict()).encode()), flags=FINAL)

    def fail(self, exc):
        send_error(self.sender, exc, "mobilevlm")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("mobilevlm must be decoupled (it streams)")
        params = model_params(args)
        from edgevlm_client import contract

        from edgevlm.runtime import requests
        from edgevlm.runtime.image_cache import ImageCache, image_digest
        from edgevlm.runtime.prefix_cache import PrefixCache
        from edgevlm.runtime.runners import load_generator
        from edgevlm.runtime.scheduler import Scheduler
        from edgevlm.runtime.slots import open_pool
        self.requests = requests
        self.prompt_inputs = contract.PROMPT_INPUTS
        self.decode_inputs = [t.name for t in contract.INPUTS if t.name not in contract.PROMPT_INPUTS]
        self.gen = load_generator(params["onnx_dir"], params["runner"], params.get("engine_dir", ""),
                                  params.get("kv_cache", "auto"))
        self.pre = requests.Preprocessor(params["onnx_dir"], max_image_pixels=int(params["max_image_pixels"]),
                                         tokenizer=self.gen.tok)
        self.default_max_tokens = int(params["default_max_tokens"])
        max_sequences = int(params["max_sequences"])
        self.metrics = Metrics()
        self.image_digest = image_digest
        self.image_cache = ImageCache(int(params.get("image_cache_mib") or 0) << 20)
        prefix_cache = PrefixCache(int(params.get("prefix_cache_mib") or 0) << 20)
        from edgevlm.runtime.batcher import Batcher
        self.images = Batcher(self._encode, max_batch=max_sequences)
        self.scheduler = self.pool = None
        if params.get("batching", "continuous") == "off":
            self.pool = ThreadPoolExecutor(max_workers=max_sequences, thread_name_prefix="decode")
            pb_utils.Logger.log_info(f"mobilevlm: per-request decode loops, up to {max_sequences} at once")
        else:
            slots = open_pool(self.gen.decoder, max_sequences, int(params.get("kv_budget_mib") or 0),
                              self.gen.max_context)
            self.scheduler = Scheduler(self.gen, slots, max_queue=int(params.get("max_queue") or 16),
                                       prefill_chunk=int(params.get("prefill_chunk") or 64),
                                       observer=self.metrics, prefix_cache=prefix_cache)
            reuse = (prefix_cache.describe() if self.scheduler.cache is not None
                     else "no prefix cache" + (" (this KV layout cannot reuse one)" if prefix_cache.budget else ""))
            pb_utils.Logger.log_info(f"mobilevlm: continuous batching; {slots.describe()}; "
                                     f"admission queue {self.scheduler.max_queue}; {reuse}; "
                                     f"{self.image_cache.describe()}")

    def execute(self, requests):
        for request in requests:
            stream = Stream(request)
            try:
                self._accept(request, stream)
            except Exception as e:
                self.metrics.finished(_outcome(e))
                send_error(stream.sender, e, "mobilevlm")
        return None

    def _accept(self, request, stream):
        """Check and preprocess; then decode at once (text) or after the image batcher."""
        get = lambda name: pb_utils.get_input_tensor_by_name(request, name)  # noqa: E731
        prompt_inputs = {name: get(name).as_numpy() for name in self.prompt_inputs if get(name) is not None}
        image = self.requests.image_bytes(prompt_inputs)
        key = cached = None
        if image is not None and self.image_cache.budget:
            key = self.image_digest(image)
            cached = self.image_cache.get(key)
        prepared = self.pre.from_inputs(prompt_inputs, decode_image=cached is None)
        if key is not None:
            self.metrics.image(cached is not None, self.image_cache.bytes)
        # Copy out of shared memory: decoding outlives execute().
        inputs = {name: get(name).as_numpy().copy() for name in self.decode_inputs if get(name) is not None}
        params = self.requests.sampling_params(inputs, self.default_max_tokens)
        ids = prepared.input_ids.tolist()
        n_images = int(image is not None)
        if self.scheduler is not None:
            self.scheduler.check(ids, cached.shape[1] if cached is not None else prepared.image_tokens, params)
        if not n_images or cached is not None:
            return self._start(stream, ids, cached, params, 0.0, reserved=False, image_cached=cached is not None)
        if self.scheduler is not None:
            self.scheduler.reserve()  # a full queue refuses before the image is encoded

        def encoded(embeds, encode_ms, error):
            try:
                if error is not None:
                    raise error
                embeds = self.pre.pack(embeds, prepared)  # LLaVA-1.6: tiles -> one image's tokens
                if key is not None:
                    self.image_cache.put(key, embeds)
                self._start(stream, ids, embeds, params, encode_ms, reserved=True)
            except Exception as e:
                if self.scheduler is not None and error is not None:
                    self.scheduler.release_reservation()
                self.metrics.finished(_outcome(e))
                send_error(stream.sender, e, "mobilevlm")
        self.images.put(prepared.pixel_values, encoded)

    def _start(self, stream, ids, embeds, params, encode_ms, reserved, image_cached=False):
        if self.scheduler is None:
            self.pool.submit(self._decode_alone, stream, ids, embeds, params, encode_ms, image_cached)
        else:
            from edgevlm.runtime.scheduler import Request
            self.scheduler.submit(Request(ids, embeds, params, stream.emit, stream.fail, stream.cancelled,
                                          encode_ms, image_cached), reserved=reserved)

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

    def _decode_alone(self, stream, input_ids, embeds, params, encode_ms, image_cached=False):
        """batching: off: this request's own decode loop, at batch 1, on a pool thread."""
        self.metrics.add_active(1)
        outcome, tokens = "error", 0
        try:
            for event in self.gen.generate(input_ids, embeds, params, image_encode_ms=encode_ms,
                                           image_cached=image_cached, cancelled=stream.cancelled):
                stream.emit(event)
                if event.final:
                    tokens = event.stats.decode_tokens
                    outcome = "cancelled" if event.stats.finish_reason == "cancelled" else "complete"
        except Exception as e:
            outcome = _outcome(e)
            try:
                stream.fail(e)
            except Exception as failed:  # the stream may already be closed
                pb_utils.Logger.log_error(f"mobilevlm: could not report the failure: {failed}")
        finally:
            self.metrics.finished(outcome, tokens)
            self.metrics.add_active(-1)

    def finalize(self):
        self.images.close()
        if self.scheduler is not None:
            self.scheduler.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
