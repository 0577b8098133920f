"""Checkpoints and the PyTorch reference: the upstream key layouts (read, validate, write
random-weight twins) and the model every later stage is checked against (torch; build time
only). Module attribute names mirror the upstream checkpoint so its state dicts load unchanged.
"""
