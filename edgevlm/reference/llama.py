"""LLaMA decoder (MobileLLaMA, Vicuna) with the KV cache as explicit inputs and outputs.

Attribute names follow transformers' LlamaForCausalLM (`model.layers.N...`, `lm_head`). The
decoder consumes `inputs_embeds`, not ids: image embeddings are spliced into the sequence
before it, exactly where upstream puts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.presets import TextConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, kv_heads, T, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reduction runs in fp32 whatever the activation dtype, as upstream does; the
        # exported graph keeps this Cast so TensorRT's FP16 build keeps the norm in FP32.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rope(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, S, head_dim] for the half-split ("rotate_half") RoPE convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[:, :, None] * inv_freq  # [B, S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kvh * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kvh * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, cos, sin, past: KV, mask) -> tuple[torch.Tensor, KV]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2)  # [B, h, S, hd]
        k = self.k_proj(x).view(b, s, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kvh, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past[0], k], dim=2)  # [B, kvh, P+S, hd]
        v = torch.cat([past[1], v], dim=2)
        rep = self.h // self.kvh  # grouped-query attention; 1 for every MobileVLM
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = (q @ kk.transpose(-1, -2)) * self.hd ** -0.5  # [B, h, S, P+S]
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (att @ vv).transpose(1, 2).reshape(b, s, self.h * self.hd)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, past: KV, mask) -> tuple[torch.Tensor, KV]:
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class _Body(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """(inputs_embeds [B,S,D], position_ids [B,S], past KV per layer) -> (last logits [B,V], present KV).

    Only the last position's logits are produced: that is all generation reads, and a full
    [B, S, vocab] prefill output would cost S x 32000 floats for nothing.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def empty_cache(self, batch: int = 1, dtype=torch.float32) -> list[KV]:
        c = self.cfg
        z = torch.zeros(batch, c.num_kv_heads, 0, c.head_dim, dtype=dtype)
        return [(z, z) for _ in range(c.num_layers)]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        s, p = inputs_embeds.shape[1], past[0][0].shape[2]
        # Causal mask over [past | new]: query i sits at absolute index p + i.
        mask = torch.arange(p + s)[None, :] <= (torch.arange(s) + p)[:, None]  # [S, P+S]
        cos, sin = rope(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = inputs_embeds
        presents = []
        for layer, kv in zip(self.model.layers, past):
            x, present = layer(x, cos, sin, kv, mask)
            presents.append(present)
        logits = self.lm_head(self.model.norm(x[:, -1]))
        return logits, presents
