"""Triton model `vision_encoder`.

Inputs:  pixel_values FP32 [N, 3, S, S], N = 0 (text-only request) or 1.
Outputs: image_embeds FP32 [N, T, D], encode_ms FP32 [1] (0 when N = 0).
Runs ONNX Runtime (cpu target) or a TensorRT engine (jetson target) in process.
"""


import numpy as np
import triton_python_backend_utils as pb_utils
from model_params import model_params


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        from edgevlm.serving import VisionEncoder
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
                pb_utils.Logger.log_error(f"vision_encoder: {type(e).__name__}: {e}")
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"internal error: vision_encoder: {type(e).__name__}: {e}")))
        return responses
