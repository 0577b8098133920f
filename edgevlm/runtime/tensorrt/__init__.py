"""TensorRT runners for the jetson target, behind the interfaces of the ONNX Runtime ones:

  engine.py       open a folder's engine (checked against this device), execution contexts
  vision.py       TrtVisionEncoder(pixel_values) -> image_embeds
  decoder.py      TrtDecoder: the engine's facts, its KV pool; concat-KV batch-1 sequences
  packed_pool.py  TrtPackedPool: the batched pool of a static-cache engine, CUDA graphs
  cuda.py         the few CUDA runtime calls (cuda-python)

Name-based TensorRT API only (set_input_shape / set_tensor_address / execute_async_v3), which
8.5, 8.6, 10.x and 11.x all have. Device buffers are allocated once; the KV cache stays on
the GPU and only the logits come back to the host each step. Imported only where an engine
is opened.
"""
