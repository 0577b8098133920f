"""Triton model `preprocess`.

Inputs:  image BYTES [1] (optional; encoded JPEG/PNG/...), prompt BYTES [1] (UTF-8),
         raw_prompt BOOL [1] (optional; the prompt is already in the `v1` template),
         history BYTES [1] (optional; JSON [[question, answer], ...] of earlier turns),
         system BYTES [1] (optional; replaces the template's system line).
Outputs: pixel_values FP32 [N, 3, S, S] (N = 0 without an image), input_ids INT64 [L]
         (-200 marks the image). Bad input gets INVALID_ARG with a one-line reason.
"""


import triton_python_backend_utils as pb_utils
from model_params import model_params


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        from edgevlm.sampling import InvalidRequest
        from edgevlm.serving import Preprocessor
        self.invalid = InvalidRequest
        self.pre = Preprocessor(params["onnx_dir"], max_image_pixels=int(params["max_image_pixels"]))
        self.log = pb_utils.Logger

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                image = pb_utils.get_input_tensor_by_name(request, "image")
                raw = pb_utils.get_input_tensor_by_name(request, "raw_prompt")
                prompt = pb_utils.get_input_tensor_by_name(request, "prompt")
                if prompt is None:
                    raise self.invalid("prompt is required")
                history = pb_utils.get_input_tensor_by_name(request, "history")
                system = pb_utils.get_input_tensor_by_name(request, "system")
                pixel_values, ids = self.pre(
                    image.as_numpy().reshape(-1)[0] if image is not None else None,
                    prompt.as_numpy(), bool(raw.as_numpy().reshape(-1)[0]) if raw is not None else False,
                    history.as_numpy() if history is not None else None,
                    system.as_numpy() if system is not None else None)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("pixel_values", pixel_values), pb_utils.Tensor("input_ids", ids)]))
            except self.invalid as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
            except Exception as e:  # a bug, not the request: say so, keep serving
                self.log.log_error(f"preprocess: {type(e).__name__}: {e}")
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"internal error: preprocess: {type(e).__name__}: {e}")))
        return responses
