"""Vision-language projectors: LDP (MobileVLM V1), LDPv2 (MobileVLM V2), mlp2x_gelu (LLaVA).

The LDPs map [B, N, C_vision] patch features on a square grid to [B, N/4, D_llm] tokens; LLaVA's
MLP keeps all N. Module
indices and names reproduce the upstream state-dict keys (the leading Identity entries of
LDP's Sequentials, LDPv2's doubled `mlp.mlp` / `peg.peg`), written here in plain torch: no
torchvision or timm is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.presets import LDP, LDPV2, MLP2X_GELU, ModelConfig


def _to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side*side, C] tokens -> [B, C, side, side] (row-major grid)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _to_tokens(m: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    return m.flatten(2).transpose(1, 2)


# --- LDP (V1): MLP, then two MobileNetV3 inverted-residual blocks --------------------------

class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map, at every spatial position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """Depthwise 3x3 -> LN -> hardswish -> SE -> pointwise 1x1 -> LN (+ input when stride 1).

    No 1x1 expansion: the expanded width equals the input width. Convolutions carry no bias
    because a norm follows each of them.
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_residual = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                          ChannelLayerNorm(channels, eps=1e-5), nn.Hardswish()),
            SqueezeExcite(channels, se_width(channels)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                          ChannelLayerNorm(channels, eps=1e-5)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_residual else y


def se_width(channels: int, divisor: int = 8) -> int:
    """MobileNetV3's squeeze width: channels/4 rounded to a multiple of 8, never below 90%."""
    v = channels / 4
    w = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return w + divisor if w < 0.9 * v else w


class _LDPBody(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(dim, 1), InvertedResidual(dim, 2))


class LDPProjector(nn.Module):
    def __init__(self, in_dim: int, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.model = _LDPBody(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.mlp(x)  # [B, g*g, D]
        return _to_tokens(self.model.mb_block(_to_map(y, self.grid)))  # [B, (g/2)^2, D]


# --- LDPv2 (V2): MLP, 2x2 average pool, positional depthwise conv with residual ------------

class _FeatureIR(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


class _PosInject(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=True))


class LDPv2Projector(nn.Module):
    def __init__(self, in_dim: int, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.mlp = _FeatureIR(in_dim, dim)
        self.peg = _PosInject(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _to_map(self.mlp.mlp(x), self.grid)
        # Upstream's AdaptiveAvgPool2d(grid/2) on an even grid is exactly a 2x2/2 average pool;
        # written as the fixed pool so the exported graph has static pooling windows.
        m = F.avg_pool2d(m, 2, 2)
        m = self.peg.peg(m) + m
        return _to_tokens(m)


def mlp2x_gelu(in_dim: int, dim: int) -> nn.Sequential:
    """LLaVA's projector; exact (erf) GELU. Indices 0 and 2 are the upstream keys."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


def build_projector(cfg: ModelConfig) -> nn.Module:
    if cfg.projector_type == MLP2X_GELU:
        return mlp2x_gelu(cfg.vision.hidden_size, cfg.text.hidden_size)
    args = (cfg.vision.hidden_size, cfg.text.hidden_size, cfg.vision.grid)
    # "ldpnetv2" must be tested first: it also starts with "ldpnet".
    if cfg.projector_type.startswith(LDPV2):
        return LDPv2Projector(*args)
    if cfg.projector_type.startswith(LDP):
        return LDPProjector(*args)
    raise ValueError(f"unsupported mm_projector_type {cfg.projector_type!r}")
