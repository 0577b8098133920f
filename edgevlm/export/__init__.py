"""Checkpoint -> ONNX: the graphs, their cleanup, the in-place KV twin, explicit Q/DQ
quantization and the parity checks that gate each (torch and onnx; build time only)."""
