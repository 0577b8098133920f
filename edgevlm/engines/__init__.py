"""ONNX -> TensorRT engines on the device: what each release offers, optimization profiles,
the builder. Imports tensorrt only where an engine is built."""
