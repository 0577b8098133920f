"""Triton around the runtime: rendering the model repository, starting a real tritonserver,
supervising it (`python -m edgevlm.serve`). No torch."""
