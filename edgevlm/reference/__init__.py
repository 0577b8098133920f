"""PyTorch reference of MobileVLM: the numerical truth every later stage is checked against.

Module attribute names mirror the upstream checkpoint so its state dicts load unchanged.
"""
