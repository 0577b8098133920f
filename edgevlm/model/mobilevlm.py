"""MobileVLM and LLaVA assembled: vision encoder (tower + projector), LLaVA-1.6's anyres
packing, embedding splice, generation. One class: the families differ only in the projector
and in how an image's tiles become its tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgevlm.presets import ANYRES, IMAGE_TOKEN_INDEX, ModelConfig
from edgevlm.runtime import anyres
from edgevlm.model.clip import CLIPVisionTower
from edgevlm.model.llama import LlamaDecoder
from edgevlm.model.projector import build_projector


class ProjectedVisionTower(nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, image_tokens, D_llm]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tower = CLIPVisionTower(cfg.vision)
        self.projector = build_projector(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values))


class MobileVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = ProjectedVisionTower(cfg)
        self.decoder = LlamaDecoder(cfg.text)
        if cfg.image_aspect == ANYRES:
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights, dtype=torch.float32) -> MobileVLM:
        """Build from a `checkpoint.Weights` (vision, projector and LLM state dicts)."""
        with torch.device("meta"):
            model = cls(cfg)
        wanted = set(model.vision.tower.state_dict())
        tower = {k: v for k, v in weights.vision.items() if k in wanted}  # skip unused layers
        model.vision.tower.load_state_dict(tower, strict=True, assign=True)
        model.vision.projector.load_state_dict(weights.projector, strict=True, assign=True)
        model.decoder.load_state_dict(weights.llm, strict=True, assign=True)
        if cfg.image_aspect == ANYRES:
            model.image_newline = nn.Parameter(weights.image_newline.clone(), requires_grad=False)
        return (model.to(dtype) if dtype is not None else model).eval()  # None: as stored

    def image_features(self, pixel_values: torch.Tensor, size_hw=None) -> torch.Tensor:
        """One image's tiles [tiles, 3, S, S] -> its tokens [T, D]; anyres needs the picture's
        (H, W) to unpad its grid."""
        feats = self.vision(pixel_values)
        if self.cfg.image_aspect != ANYRES:
            return feats[0]
        packed = anyres.pack(feats.detach().float().numpy(), size_hw, self.cfg.grid_pinpoints,
                             self.cfg.vision.image_size, self.image_newline.detach().float().numpy())
        return torch.from_numpy(packed).to(feats.dtype)

    def video_features(self, frames: torch.Tensor) -> torch.Tensor:
        """A clip's frames [F, 3, S, S] -> its tokens [F * frame_tokens, D] (LLaVA-NeXT-Video):
        each frame's patch grid average-pooled with stride video_pool, then projected. The
        pooling comes before the projector, whose GELU makes the order matter. A model without
        a video mode reads each frame as a picture."""
        if not self.cfg.video_pool:
            return self.vision(frames).reshape(-1, self.cfg.text.hidden_size)
        feats = self.vision.tower(frames)  # [F, g * g, D_vision], CLS dropped
        f, n, d = feats.shape
        g = self.cfg.vision.grid
        grid = feats.reshape(f, g, g, d).permute(0, 3, 1, 2)
        pooled = nn.functional.avg_pool2d(grid, self.cfg.video_pool).flatten(2).transpose(1, 2)
        return self.vision.projector(pooled).reshape(-1, self.cfg.text.hidden_size)

    def embed(self, input_ids: Sequence[int], image_embeds) -> torch.Tensor:
        """Token ids with IMAGE_TOKEN_INDEX placeholders -> inputs_embeds [1, L, D].

        Each placeholder is replaced by the next image's rows (image_embeds [N, T, D], or a list
        of [T_i, D]), so L grows by T - 1 per image; text around it is embedded as usual.
        """
        table = self.decoder.model.embed_tokens.weight
        parts, text, image_i = [], [], 0
        for tok in input_ids:
            if tok != IMAGE_TOKEN_INDEX:
                text.append(tok)
                continue
            if image_embeds is None or image_i >= len(image_embeds):
                raise ValueError("the prompt has more image placeholders than images")
            parts += [table[torch.tensor(text, dtype=torch.long)], image_embeds[image_i].to(table.dtype)]
            text, image_i = [], image_i + 1
        parts.append(table[torch.tensor(text, dtype=torch.long)])
        return torch.cat(parts)[None]

    @torch.no_grad()
    def generate(self, input_ids: Sequence[int], pixel_values: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_ids: Sequence[int] | None = None,
                 return_logits: bool = False, image_size=None, vocab: int | None = None, embeds=None):
        """Generate token ids after the prompt. temperature 0 means greedy.

        pixel_values: [N, 3, S, S], one row per image; for anyres, one image's tiles, with
        image_size its (H, W); or a list of images' tiles with a list of their sizes (several
        anyres pictures), each at its placeholder in order. Returns the new ids, and with
        return_logits also the logits row (embeds: each placeholder's rows given instead, e.g. a
        clip's video_features)
        each was chosen from. vocab: pick among the first `vocab` ids only, as the runtime does
        (the tokenizer's; llava-hf's padded rows are never text).
        """
        stop = set(stop_ids if stop_ids is not None else [self.cfg.text.eos_token_id])
        if embeds is not None:
            image_embeds = embeds
        elif pixel_values is None:
            image_embeds = None
        elif isinstance(pixel_values, (list, tuple)):
            image_embeds = [self.image_features(px, size) for px, size in zip(pixel_values, image_size)]
        elif self.cfg.image_aspect == ANYRES:
            image_embeds = [self.image_features(pixel_values, image_size)]
        else:
            image_embeds = self.vision(pixel_values)
        x = self.embed(input_ids, image_embeds)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        past = self.decoder.empty_cache(dtype=x.dtype)
        pos = 0
        out, rows = [], []
        for _ in range(max_new_tokens):
            positions = torch.arange(pos, pos + x.shape[1])[None]
            logits, past = self.decoder(x, positions, past)
            pos += x.shape[1]
            tok = sample(logits[0][:vocab], temperature, top_p, top_k, gen)
            out.append(tok)
            rows.append(logits[0])
            if tok in stop:
                break
            x = self.decoder.model.embed_tokens.weight[tok][None, None]
        return (out, torch.stack(rows)) if return_logits else out


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
