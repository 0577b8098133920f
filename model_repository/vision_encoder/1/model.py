"""Triton model `vision_encoder`: pixel_values FP32 [N, 3, S, S] (N = 0 for a text-only
request) -> image_embeds FP32 [N, T, D] and encode_ms FP32 [1] (0 when N = 0). Runs ONNX
Runtime (cpu target) or a TensorRT engine (jetson target) in process."""

import numpy as np
from adapter import model_params, triton_error

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        from edgevlm.runtime.runners import VisionEncoder
        self.encoder = VisionEncoder(params["onnx_dir"], params["runner"], params.get("engine_dir", ""))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                px = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy()
                embeds, ms = self.encoder(px)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("image_embeds", embeds),
                    pb_utils.Tensor("encode_ms", np.array([ms], np.float32))]))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=triton_error(e, "vision_encoder")))
        return responses
