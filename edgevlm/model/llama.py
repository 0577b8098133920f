"""LLaMA decoder (MobileLLaMA, Vicuna) with the KV cache as explicit inputs and outputs.

Attribute names follow transformers' LlamaForCausalLM (`model.layers.N...`, `lm_head`). The
decoder consumes `inputs_embeds`, not ids: image embeddings are spliced into the sequence
before it, exactly where upstream puts them.

Two cache layouts, one set of weights:
  concat  past [B, kvh, P, hd] -> present [B, kvh, P+S, hd]: the cache grows by concatenation.
  static  cache [B, kvh, C, hd] -> the same tensor with the new S positions written at
          position_ids[:, 0] (`kv_cache_update`, exported as ONNX TensorScatter). Shapes never
          change between steps and the update can happen in place (TensorRT >= 10.15
          KVCacheUpdate, ONNX Runtime when output and input share a buffer); attention covers
          all C slots, with the ones past each query's position masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.presets import TextConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, kv_heads, T, head_dim]


@torch.library.custom_op("edgevlm::kv_cache_update", mutates_args=())
def kv_cache_update(cache: torch.Tensor, update: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """cache [B, H, C, D] with update [B, H, S, D] written at positions write_index[b] .. +S.

    Functional here (returns a copy); its ONNX form is TensorScatter, which runtimes apply in
    place. A custom op rather than slice assignment, so the exporter sees one node to translate
    instead of index arithmetic on a data-dependent offset.
    """
    out = cache.clone()
    s = update.shape[2]
    for b, i in enumerate(write_index.tolist()):
        if not 0 <= i <= cache.shape[2] - s:
            raise IndexError(f"cache write at {i}..{i + s} outside its {cache.shape[2]} slots")
        out[b, :, i:i + s] = update[b]
    return out


@kv_cache_update.register_fake
def _(cache, update, write_index):
    return torch.empty_like(cache)


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


def inv_frequencies(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """RoPE's inverse frequencies [hd/2]; with Llama 3.1's scaling (factor, low_freq_factor,
    high_freq_factor, original context): wavelengths longer than original / low_freq_factor
    are stretched by `factor`, shorter than original / high_freq_factor kept, and those between
    blended linearly in original / wavelength."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high, original = scaling
    wavelength = 2 * torch.pi / inv_freq
    blend = (original / wavelength - low) / (high - low)
    scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, scaled, out)


def rope(position_ids: torch.Tensor, cfg: TextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, S, head_dim] for the half-split ("rotate_half") RoPE convention. Linear
    scaling (LLaVA-NeXT-Video) divides positions by its factor, as dividing the frequencies."""
    inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) / cfg.rope_linear_factor
    freqs = position_ids.float()[:, :, None] * inv_freq  # [B, S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def add_projections(m: nn.Module, cfg: TextConfig) -> None:
    """The q/k/v/o projections (and head counts) of a Llama attention block, self- or cross-."""
    m.h, m.kvh, m.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    d = cfg.hidden_size
    m.q_proj = nn.Linear(d, m.h * m.hd, bias=False)
    m.k_proj = nn.Linear(d, m.kvh * m.hd, bias=False)
    m.v_proj = nn.Linear(d, m.kvh * m.hd, bias=False)
    m.o_proj = nn.Linear(m.h * m.hd, d, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        add_projections(self, cfg)

    def forward(self, x, cos, sin, past: KV, mask, write_index=None) -> tuple[torch.Tensor, KV]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2)  # [B, h, S, hd]
        k = self.k_proj(x).view(b, s, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kvh, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if write_index is None:
            k = torch.cat([past[0], k], dim=2)  # [B, kvh, P+S, hd]
            v = torch.cat([past[1], v], dim=2)
        else:
            k = kv_cache_update(past[0], k, write_index)  # [B, kvh, C, hd]
            v = kv_cache_update(past[1], v, write_index)
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

    def forward(self, x, cos, sin, past: KV, mask, write_index=None) -> tuple[torch.Tensor, KV]:
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past, mask, write_index)
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

    def static_cache(self, capacity: int, batch: int = 1, dtype=torch.float32) -> list[KV]:
        c = self.cfg
        z = torch.zeros(batch, c.num_kv_heads, capacity, c.head_dim, dtype=dtype)
        return [(z, z) for _ in range(c.num_layers)]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                past: list[KV], static: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """static=False: `past` holds P positions and grows. static=True: `past` is a fixed
        capacity cache whose first position_ids[:, 0] slots are filled; the new positions are
        position_ids[:, 0] .. +S (contiguous, as generation produces them)."""
        s, p = inputs_embeds.shape[1], past[0][0].shape[2]
        write_index = None
        if static:
            # Slot j is visible to a query at absolute position t iff j <= t: later slots are
            # empty or stale. [B, 1, S, C], broadcast over heads.
            mask = (torch.arange(p)[None, None, :] <= position_ids[:, :, None])[:, None]
            write_index = position_ids[:, 0]
        else:
            # Causal mask over [past | new]: query i sits at absolute index p + i.
            mask = torch.arange(p + s)[None, :] <= (torch.arange(s) + p)[:, None]  # [S, P+S]
        cos, sin = rope(position_ids, self.cfg)
        x = inputs_embeds
        presents = []
        for layer, kv in zip(self.model.layers, past):
            x, present = layer(x, cos, sin, kv, mask, write_index)
            presents.append(present)
        logits = self.lm_head(self.model.norm(x[:, -1]))
        return logits, presents
