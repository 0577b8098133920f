"""Runners for the exported graphs: ONNX Runtime here, TensorRT on the Orin."""
