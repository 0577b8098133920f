"""Triton model `generate` (decoupled).

Inputs:  input_ids INT64 [L], image_embeds FP32 [N, T, D], encode_ms FP32 [1] (optional),
         max_tokens INT32, temperature FP32, top_p FP32, top_k INT32, repetition_penalty FP32,
         seed INT64 (each optional, [1]), stop BYTES [K] (optional).
Outputs: one response per text delta: text BYTES [1] and stats BYTES [1], which is empty
         except on the last response (JSON: image_encode_ms, prefill_tokens, prefill_ms,
         decode_tokens, decode_ms, decode_tokens_per_s, finish_reason).

execute() hands each request to a worker thread and returns, so up to `max_sequences`
streams decode at once; a cancelled stream stops at the next token and frees its KV cache.
"""

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

OPTIONAL = ("encode_ms", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
            "seed", "stop")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _params(args):
    params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
    src = params.get("edgevlm_src")
    if src and src not in sys.path:
        sys.path.append(src)
    return params


def _response(text, stats=b""):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=object)),
        pb_utils.Tensor("stats", np.array([stats], dtype=object))])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("generate must be decoupled (it streams)")
        params = _params(args)
        from edgevlm import serving
        from edgevlm.sampling import InvalidRequest
        self.serving, self.invalid = serving, InvalidRequest
        self.gen = serving.load_generator(params["onnx_dir"], params["runner"], params.get("engine_dir", ""))
        self.vocab = self.gen.tok.vocab_size
        self.default_max_tokens = int(params["default_max_tokens"])
        self.pool = ThreadPoolExecutor(max_workers=int(params["max_sequences"]),
                                       thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.active = 0

    def execute(self, requests):
        for request in requests:
            # Copy out of the request's shared memory: the work outlives execute().
            inputs = {"input_ids": pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().copy(),
                      "image_embeds": pb_utils.get_input_tensor_by_name(request, "image_embeds").as_numpy().copy()}
            for name in OPTIONAL:
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is not None:
                    inputs[name] = t.as_numpy().copy()
            self.pool.submit(self._run, inputs, request.get_response_sender())
        return None

    def _run(self, inputs, sender):
        with self.lock:
            self.active += 1
        try:
            s = self.serving
            params = s.sampling_params(inputs, self.default_max_tokens)
            ids = s.check_ids(inputs["input_ids"], self.vocab)
            encode_ms = s.scalar(inputs, "encode_ms", "f", float) or 0.0
            for event in self.gen.generate(ids, s.image_embeds_or_none(inputs["image_embeds"]), params,
                                           image_encode_ms=encode_ms, cancelled=sender.is_cancelled):
                if not event.final:
                    sender.send(_response(event.text))
                elif event.stats.finish_reason == "cancelled":
                    sender.send(flags=FINAL)  # FINAL is owed even to a cancelled request
                else:
                    sender.send(_response(event.text, json.dumps(event.stats.to_dict()).encode()), flags=FINAL)
        except self.invalid as e:
            sender.send(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
        except Exception as e:
            pb_utils.Logger.log_error(f"generate: {type(e).__name__}: {e}")
            try:
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"generate failed: {type(e).__name__}: {e}")), flags=FINAL)
            except Exception as send_error:  # the stream may already be closed
                pb_utils.Logger.log_error(f"generate: could not report the failure: {send_error}")
        finally:
            with self.lock:
                self.active -= 1

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
