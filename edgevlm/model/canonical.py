"""The canonical checkpoint layout's landmarks, which both readers share (checkpoint.py for
the original LLaVA / MobileVLM format, llava_hf.py for transformers' llava-hf format, renamed
into this one): the key prefixes, the CLIP tower's dims read off its weights, and the error
a checkpoint that cannot be loaded raises."""

from __future__ import annotations

import torch

from edgevlm.presets import VisionConfig

VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
NEWLINE_KEY = "model.image_newline"  # LLaVA-1.6: the vector closing each row of the tile grid
CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT; config.json does not record the tower's head count


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a loadable MobileVLM or LLaVA checkpoint."""


def vision_from_tensors(tensors: dict[str, torch.Tensor], select_layer: int) -> VisionConfig:
    """The CLIP tower's dims from its weights: config.json does not record them."""
    def shape(key):
        full = VISION_PREFIX + key
        if full not in tensors:
            raise CheckpointError(f"missing key {full}")
        return tuple(tensors[full].shape)

    c, _, patch, _ = shape("vision_model.embeddings.patch_embedding.weight")
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1 or grid % 2:
        raise CheckpointError(f"{VISION_PREFIX}vision_model.embeddings.position_embedding.weight: "
                              f"{positions} positions is not 1 + an even square grid")
    layers = 0
    while VISION_PREFIX + f"vision_model.encoder.layers.{layers}.mlp.fc1.weight" in tensors:
        layers += 1
    return VisionConfig(
        image_size=grid * patch, patch_size=patch, hidden_size=c,
        intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=layers, num_heads=max(1, c // CLIP_HEAD_DIM), select_layer=select_layer)
