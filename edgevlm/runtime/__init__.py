"""What runs inside Triton, numpy only (never torch): request checking, image and prompt
preprocessing, tokenizer, the runners (ONNX Runtime, TensorRT), the decode loop, sampling
and detokenization. A test keeps torch out of this package's imports."""
