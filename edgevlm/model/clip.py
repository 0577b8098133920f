"""CLIP ViT vision tower, truncated to the layers MobileVLM reads.

Attribute names follow transformers' CLIPVisionModel, so the tower's slice of a MobileVLM
checkpoint (prefix `model.vision_tower.vision_tower.`) loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from edgevlm.presets import VisionConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, C], row-major over the grid
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads

        def heads(t):  # [B, N, D] -> [B, h, N, D/h]
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # Only the layers up to the selected hidden state are built; the rest never run.
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers_used))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, HF name
        self.encoder = Encoder(cfg)
        # post_layernorm only touches the pooled CLS output, which MobileVLM never reads.


class CLIPVisionTower(nn.Module):
    """pixel_values [B, 3, S, S] -> patch features [B, g*g, C] (selected layer, CLS dropped)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = VisionModel(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.vision_model
        x = m.pre_layrnorm(m.embeddings(pixel_values))
        for layer in m.encoder.layers:
            x = layer(x)
        return x[:, 1:]
