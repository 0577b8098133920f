"""Llama-3.2-Vision (mllama), the PyTorch reference: images reach the text model through
cross-attention layers, not as tokens spliced into the sequence.

Attribute names are the released checkpoint's keys (`vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head`), so its state dict loads as it is.

  vision   tiles [N, T, 3, S, S] of each image, its aspect-ratio id and tile mask -> patches and
           a class token per tile, tile-position embeddings by aspect ratio, local layers
           (their outputs at `intermediate_layers` kept), gated global layers over all tiles
           of the image -> [N, T * P, hidden * (1 + intermediates)]
  projector  Linear to the text width: the cross-attention states of each image
  text     Llama 3.1 self-attention layers (KV cache as inputs and outputs, as llama.py) and,
           at `cross_attention_layers`, layers with cross-attention instead of self-attention,
           whose K/V come from the image's states once (`cross_kv`) and stay with the sequence

What transformers does and the reference does too (tests/test_mllama.py checks it against
MllamaForConditionalGeneration): a request without an image skips the cross-attention layers
entirely; with an image, a text position that attends to no tile (before the image's token)
gets a cross-attention over every position of the image with no mask (its mask row is all
zero) but no MLP; inside the vision tower, only position pairs that are both padding (padding
patches, padding tiles) are masked from each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.model.llama import KV, MLP, DecoderLayer, RMSNorm, add_projections, rope
from edgevlm.presets import MllamaConfig, MllamaVisionConfig, TextConfig

NEG = torch.finfo(torch.float32).min  # the additive mask value (finite: a fully masked row stays finite)


# -- vision -------------------------------------------------------------------------------------

class _VisionAttention(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        d, self.h = cfg.hidden_size, cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax((q @ k.transpose(-1, -2)) * (d // self.h) ** -0.5 + bias, dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, n, d))


class _VisionMLP(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VisionLayer(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, gated: bool):
        super().__init__()
        self.self_attn = _VisionAttention(cfg)
        self.mlp = _VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), bias)
        x = x + (self.gate_attn.tanh() * a if self.gated else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * m if self.gated else m)


class _Layers(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, n: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(_VisionLayer(cfg, gated) for _ in range(n))


class _TileEmbedding(nn.Module):
    """One vector per tile slot, chosen by the image's aspect ratio, scaled by tanh(gate)."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.d = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1, self.tiles * self.d)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:  # x [N, T, P, D]
        return x + self.gate.tanh() * self.embedding(ratio_ids).view(-1, self.tiles, 1, self.d)


class _PositionEmbedding(nn.Module):
    """A position embedding blended, by the gate, with one per tile slot and aspect ratio."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.p, self.d = cfg.max_num_tiles, cfg.tile_tokens, cfg.hidden_size
        self.embedding = nn.Parameter(torch.zeros(self.p, self.d))
        self.tile_embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1, self.tiles * self.p * self.d)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        g = self.gate.tanh()
        tile = self.tile_embedding(ratio_ids).view(-1, self.tiles, self.p, self.d)
        return x + (1 - g) * self.embedding + g * tile


class MllamaVision(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.gated_positional_embedding = _PositionEmbedding(cfg)
        self.pre_tile_positional_embedding = _TileEmbedding(cfg)
        self.post_tile_positional_embedding = _TileEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(d)
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = _Layers(cfg, cfg.num_layers, gated=False)
        self.global_transformer = _Layers(cfg, cfg.num_global_layers, gated=True)

    def forward(self, pixel_values: torch.Tensor, ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, T, 3, S, S], ratio_ids [N] (1-based; 0 pads), tile_mask [N, T] ->
        features [N, T * P, output_dim]."""
        c = self.cfg
        n, t = pixel_values.shape[:2]
        d, p = c.hidden_size, c.tile_tokens
        x = self.patch_embedding(pixel_values.flatten(0, 1)).flatten(2).transpose(1, 2)  # [N*T, g*g, D]
        x = self.pre_tile_positional_embedding(x.reshape(n, t, p - 1, d), ratio_ids)
        x = torch.cat([self.class_embedding.expand(n, t, 1, d), x], dim=2)  # the class token first
        x = self.layernorm_pre(self.gated_positional_embedding(x, ratio_ids))
        padded = -(-p // 8) * 8  # positions per tile, padded to a multiple of 8
        x = F.pad(x, (0, 0, 0, padded - p)).reshape(n, t * padded, d)
        # masked: position pairs that are both padding (a padding tile, or a tile's padding)
        pad = torch.ones(n, t, padded)
        pad[:, :, :p] = 1 - tile_mask[:, :, None].to(pad.dtype)
        pad = pad.reshape(n, t * padded, 1)
        bias = (pad @ pad.transpose(1, 2) * NEG)[:, None]  # [N, 1, L, L]
        kept = []
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, bias)
            if i in c.intermediate_layers:
                kept.append(x)
        x = self.layernorm_post(x).reshape(n, t, padded, d)
        x = self.post_tile_positional_embedding(x, ratio_ids).reshape(n, t * padded, d)
        for layer in self.global_transformer.layers:
            x = layer(x, bias)
        # each feature dimension followed by its intermediate layers' values (transformers' order)
        inter = torch.stack(kept, dim=-1).reshape(n, t, padded, d * len(kept))
        out = torch.cat([x.reshape(n, t, padded, d), inter], dim=-1)[:, :, :p]
        return out.reshape(n, t * p, c.output_dim)


# -- text ---------------------------------------------------------------------------------------

class _CrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        add_projections(self, cfg)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def kv(self, states: torch.Tensor) -> KV:
        """The image's cross-attention states [N, L, D] -> (key, value) [N, kvh, L, hd]."""
        n, length, _ = states.shape
        k = self.k_proj(states).view(n, length, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(states).view(n, length, self.kvh, self.hd).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, kv: KV, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2))
        rep = self.h // self.kvh
        k, v = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in kv)
        scores = (q @ k.transpose(-1, -2)) * self.hd ** -0.5 + bias  # bias [B, 1, S, L]
        att = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, s, self.h * self.hd))


class CrossLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cross_attn = _CrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, kv: KV, bias, rows, use) -> torch.Tensor:
        """rows [B, S, 1]: 1 where the position attends to some tile (its MLP counts); use [B, 1, 1]:
        1 for a row with an image (0: the layer passes it through)."""
        a = self.cross_attn(self.input_layernorm(x), kv, bias)
        x = x + use * self.cross_attn_attn_gate.tanh() * a
        m = self.mlp(self.post_attention_layernorm(x))
        return x + use * self.cross_attn_mlp_gate.tanh() * (rows * m)


def cross_inputs(mask: torch.Tensor, has_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From mask [B, S, L] (1: the position attends to that image position) and has_image [B]:
    (additive bias [B, 1, S, L], rows [B, S, 1], use [B, 1, 1]), as transformers builds them:
    a row that attends to nothing gets no mask at all (an all-zero bias) and no MLP."""
    rows = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    bias = (1 - mask) * NEG * rows
    return bias[:, None], rows, has_image.to(mask.dtype)[:, None, None]


class _TextBody(nn.Module):
    def __init__(self, cfg: TextConfig, embed_rows: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(embed_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(CrossLayer(cfg) if i in cfg.cross_attention_layers else DecoderLayer(cfg)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MllamaText(nn.Module):
    """(inputs_embeds, position_ids, self-attention KV, cross-attention K/V and mask) -> (last
    logits, present KV). Caches as llama.LlamaDecoder: concat or static."""

    def __init__(self, cfg: TextConfig, embed_rows: int):
        super().__init__()
        self.cfg = cfg
        self.model = _TextBody(cfg, embed_rows)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def cross_layers(self) -> list[CrossLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, CrossLayer)]

    def cross_kv(self, states: torch.Tensor) -> list[KV]:
        """Each cross-attention layer's (key, value) of an image's states [N, L, D]."""
        return [layer.cross_attn.kv(states) for layer in self.cross_layers]

    def empty_cache(self, batch: int = 1, dtype=torch.float32) -> list[KV]:
        c = self.cfg
        z = torch.zeros(batch, c.num_kv_heads, 0, c.head_dim, dtype=dtype)
        return [(z, z) for _ in range(c.kv_layers)]

    def forward(self, inputs_embeds, position_ids, past: list[KV], cross: list[KV] | None = None,
                mask: torch.Tensor | None = None, has_image: torch.Tensor | None = None,
                static: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """cross: each cross layer's (key, value) [B, kvh, L, hd], with mask [B, S, L] and
        has_image [B]; None (a batch without any image): the cross layers are skipped."""
        s, p = inputs_embeds.shape[1], past[0][0].shape[2]
        write_index = None
        if static:
            causal = (torch.arange(p)[None, None, :] <= position_ids[:, :, None])[:, None]
            write_index = position_ids[:, 0]
        else:
            causal = torch.arange(p + s)[None, :] <= (torch.arange(s) + p)[:, None]
        cos, sin = rope(position_ids, self.cfg)
        if cross is not None:
            bias, rows, use = cross_inputs(mask, has_image)
            images = iter(cross)
        x, kvs, presents = inputs_embeds, iter(past), []
        for layer in self.model.layers:
            if isinstance(layer, CrossLayer):
                if cross is not None:
                    x = layer(x, next(images), bias, rows, use)
                continue
            x, present = layer(x, cos, sin, next(kvs), causal, write_index)
            presents.append(present)
        return self.lm_head(self.model.norm(x[:, -1])), presents


class Mllama(nn.Module):
    """The whole model, loaded from the released state dict; `generate` is the greedy loop the
    parity checks compare with transformers and with the exported graphs."""

    def __init__(self, cfg: MllamaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = MllamaVision(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.output_dim, cfg.text.hidden_size)
        self.language_model = MllamaText(cfg.text, cfg.embed_rows)

    @classmethod
    def from_weights(cls, cfg: MllamaConfig, tensors: dict[str, torch.Tensor], dtype=torch.float32) -> Mllama:
        """dtype None: the tensors as stored (the checkpoint's mapped memory, nothing copied)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: t if dtype is None else t.to(dtype) for k, t in tensors.items()},
                              strict=True, assign=True)
        return model.eval()

    def cross_states(self, pixel_values, ratio_ids, tile_mask) -> torch.Tensor:
        """Images' tiles -> their cross-attention states [N, T * P, text hidden]."""
        return self.multi_modal_projector(self.vision_model(pixel_values, ratio_ids, tile_mask))

    @torch.no_grad()
    def generate(self, ids: list[int], pixel_values=None, ratio_ids=None, tile_mask=None, max_new_tokens: int = 16,
                 stop_ids=(), vocab: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and each step's logits, one image at most (cross mask as the processor
        makes it: from the image's token to the end)."""
        from edgevlm.runtime.cross_attention import cross_mask, decode_row
        text = self.language_model
        past = text.empty_cache()
        cross = mask = has = None
        if pixel_values is not None:
            states = self.cross_states(pixel_values, ratio_ids, tile_mask)
            cross = text.cross_kv(states)
            tiles = [int(tile_mask[0].sum())]
            m = cross_mask(ids, self.cfg.image_token_id, tiles, self.cfg.vision.max_num_tiles,
                           self.cfg.vision.tile_tokens)
            mask, has = torch.from_numpy(m)[None], torch.ones(1)
        x = text.model.embed_tokens(torch.tensor([ids]))
        positions = torch.arange(len(ids))[None]
        out, rows = [], []
        for _ in range(max_new_tokens):
            logits, past = text(x, positions, past, cross, mask, has)
            rows.append(logits[0])
            tok = int(logits[0, :vocab].argmax())
            out.append(tok)
            if tok in stop_ids:
                break
            x = text.model.embed_tokens(torch.tensor([[tok]]))
            positions = positions[:, -1:] + 1
            if mask is not None:
                mask = torch.from_numpy(decode_row(mask[0].numpy()))[None]
        return out, torch.stack(rows)
