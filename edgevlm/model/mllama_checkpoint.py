"""Llama-3.2-Vision checkpoints: the released layout (and transformers 5's spelling), read and
written.

A released directory (meta-llama/Llama-3.2-11B-Vision[-Instruct]) holds config.json
(model_type "mllama", nested text_config / vision_config), generation_config.json,
preprocessor_config.json (MllamaImageProcessor: tile size, mean/std), the weights as safetensors
shards with an index, and a byte-level BPE tokenizer in tokenizer.json whose
tokenizer_config.json carries the chat template. Keys as transformers 4.45+ saves them:
`language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*`,
`multi_modal_projector.*`; transformers 5 holds them as `model.language_model.*`, `lm_head.*`,
`model.vision_model.*`, `model.multi_modal_projector.*`, and both are read.

Random checkpoints (`write_random_mllama`) are written in that layout for any mllama preset,
with every gate non-zero (transformers initialises them to zero, which would make the image
invisible), a BPE tokenizer trained here with Llama 3's split pattern and special tokens at
the top of its vocabulary, and a chat template of ours that renders Llama 3.2 Vision's format.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from edgevlm.model.canonical import CheckpointError
from edgevlm.model.random_weights import Planned, _save_weights
from edgevlm.presets import MLLAMA, MllamaConfig, MllamaVisionConfig, TextConfig, match_preset
from edgevlm.staging import staged_dir

# transformers 5's spelling -> the released one (the first match wins)
_RELEASED = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
             ("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."))
SPELLINGS = ("released", "transformers5")

# Llama 3's pre-tokenizer split and the first of its special tokens, as its tokenizer.json has them.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
           "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
           "<|eot_id|>", "<|python_tag|>")
IMAGE_TOKEN = "<|image|>"

# Ours, not Meta's text: a Jinja template that renders the released instruct format. A system
# turn (with the knowledge and today's date lines) only when the conversation has no image;
# each image of a user turn as <|image|> before its text; the assistant header to answer after.
# With tools, as the Llama 3 family takes them: the first user turn opens with the functions
# (JSON, indented 4) and the call format {"name": ..., "parameters": {...}}.
CHAT_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(images=false, system="") %}
{%- for message in messages %}
    {%- if message['content'] is not string %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}{%- set ns.images = true %}{%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endfor %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] if messages[0]['content'] is string
        else messages[0]['content'][0]['text'] %}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- if not ns.images %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {{- 'Cutting Knowledge Date: December 2023\\n' }}
    {{- 'Today Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\\n\\n' }}
    {{- ns.system | trim }}{{- '<|eot_id|>' }}
{%- elif ns.system %}
    {{- raise_exception('a system message cannot go with an image') }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if tools is not none and loop.first %}
        {{- 'Answer with a function call in JSON, {"name": function name, "parameters": its arguments}, '
            'choosing from these functions:\\n\\n' }}
        {%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
    {%- endif %}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}{{- '<|image|>' }}
            {%- elif part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""


def released_name(key: str) -> str:
    for src, dst in _RELEASED:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def transformers5_name(key: str) -> str:
    for src, dst in _RELEASED:
        if key.startswith(dst):
            return src + key[len(dst):]
    return key


def layout(cfg: MllamaConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the released state dict and its shape: our reference module's parameters,
    whose names are the released keys."""
    from edgevlm.model.mllama import Mllama
    with torch.device("meta"):
        model = Mllama(cfg)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


# -- config.json ------------------------------------------------------------------------------------

def hf_config(cfg: MllamaConfig) -> dict:
    """config.json as the released checkpoints carry it (transformers 4.45's format)."""
    t, v = cfg.text, cfg.vision
    factor, low, high, original = t.rope_scaling
    return {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": MLLAMA, "image_token_index": cfg.image_token_id,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "mllama_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "max_position_embeddings": t.max_position, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
            "rope_scaling": {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                             "original_max_position_embeddings": original, "rope_type": "llama3"},
            "cross_attention_layers": list(t.cross_attention_layers), "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_global_layers": v.num_global_layers,
            "attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "max_num_tiles": v.max_num_tiles, "intermediate_layers_indices": list(v.intermediate_layers),
            "supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
            "vision_output_dim": v.output_dim, "norm_eps": v.norm_eps, "hidden_act": "gelu", "num_channels": 3,
            "torch_dtype": "bfloat16"},
    }


def config_from_hf(raw: dict, preprocessor: dict, generation: dict, name: str) -> MllamaConfig:
    """A released (or transformers 5) config.json, with the tile size and mean/std from
    preprocessor_config.json and the stop tokens from generation_config.json."""
    tc, vc = raw.get("text_config") or {}, raw.get("vision_config") or {}

    def need(d, key, where):
        if key not in d:
            raise CheckpointError(f"config.json: {where} has no {key!r}")
        return d[key]
    rope = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
    if rope.get("rope_type", "llama3") != "llama3":
        raise CheckpointError(f"config.json: rope type {rope.get('rope_type')!r} is not supported (llama3)")
    scaling = None
    if rope.get("factor") is not None:
        scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                   int(rope["original_max_position_embeddings"]))
    text = TextConfig(
        vocab_size=need(tc, "vocab_size", "text_config"), hidden_size=need(tc, "hidden_size", "text_config"),
        intermediate_size=need(tc, "intermediate_size", "text_config"),
        num_layers=need(tc, "num_hidden_layers", "text_config"),
        num_heads=need(tc, "num_attention_heads", "text_config"),
        num_kv_heads=tc.get("num_key_value_heads", tc["num_attention_heads"]),
        max_position=tc.get("max_position_embeddings", 131072), rms_norm_eps=tc.get("rms_norm_eps", 1e-5),
        rope_theta=float(tc.get("rope_theta", rope.get("rope_theta", 500000.0))),
        bos_token_id=tc.get("bos_token_id", 128000), eos_token_id=_first(tc.get("eos_token_id", 128001)),
        pad_token_id=tc.get("pad_token_id", 128004),
        cross_attention_layers=tuple(need(tc, "cross_attention_layers", "text_config")), rope_scaling=scaling)
    size = preprocessor.get("size", {})
    vision = MllamaVisionConfig(
        image_size=size.get("height") or need(vc, "image_size", "vision_config"),
        patch_size=need(vc, "patch_size", "vision_config"), hidden_size=need(vc, "hidden_size", "vision_config"),
        intermediate_size=need(vc, "intermediate_size", "vision_config"),
        num_layers=need(vc, "num_hidden_layers", "vision_config"),
        num_global_layers=need(vc, "num_global_layers", "vision_config"),
        num_heads=vc.get("attention_heads", vc.get("num_attention_heads")),
        norm_eps=vc.get("norm_eps", 1e-5), max_num_tiles=preprocessor.get("max_image_tiles", vc.get("max_num_tiles", 4)),
        intermediate_layers=tuple(vc.get("intermediate_layers_indices", (3, 7, 15, 23, 30))),
        supported_aspect_ratios=tuple(tuple(r) for r in vc.get("supported_aspect_ratios") or
                                      MllamaVisionConfig().supported_aspect_ratios),
        image_mean=tuple(preprocessor.get("image_mean", MllamaVisionConfig().image_mean)),
        image_std=tuple(preprocessor.get("image_std", MllamaVisionConfig().image_std)))
    if vision.image_size != vc.get("image_size", vision.image_size):
        raise CheckpointError(f"preprocessor_config.json: tiles of {vision.image_size} px, but the vision tower "
                              f"takes {vc['image_size']} px")
    stops = generation.get("eos_token_id", text.eos_token_id)
    return match_preset(MllamaConfig(name, vision, text, image_token_id=raw.get("image_token_index", 128256),
                                     embed_rows=text.vocab_size + 8,
                                     stop_token_ids=tuple(stops) if isinstance(stops, list) else (stops,)))


def _first(x):
    return x[0] if isinstance(x, list) else x


# -- reading ----------------------------------------------------------------------------------------

@dataclass
class MllamaCheckpoint:
    path: Path
    config: MllamaConfig
    tensors: dict[str, torch.Tensor]  # released names
    spelling: str

    def weights(self) -> dict[str, torch.Tensor]:
        return self.tensors

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def tokenizer_config(self) -> dict:
        return json.loads((self.path / "tokenizer_config.json").read_text())

    @property
    def chat_template(self) -> str:
        """The checkpoint's chat template: chat_template.jinja / chat_template.json, else the one in
        tokenizer_config.json (where the released checkpoints keep it)."""
        if (self.path / "chat_template.jinja").is_file():
            return (self.path / "chat_template.jinja").read_text()
        if (self.path / "chat_template.json").is_file():
            return json.loads((self.path / "chat_template.json").read_text())["chat_template"]
        template = self.tokenizer_config.get("chat_template")
        if not template:
            raise CheckpointError(f"{self.path}: no chat template (tokenizer_config.json, chat_template.json)")
        return template

    def sha256(self) -> str:
        import hashlib
        from edgevlm.model.checkpoint import weight_files
        h = hashlib.sha256()
        for f in [self.path / "config.json", *weight_files(self.path)]:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()


def is_mllama(raw: dict) -> bool:
    return raw.get("model_type") == MLLAMA


def checkpoint_is_mllama(path: str | Path) -> bool:
    """Is the directory a Llama-3.2-Vision checkpoint (by its config.json)?"""
    config = Path(path) / "config.json"
    return config.is_file() and is_mllama(json.loads(config.read_text()))


def read_mllama(path: str | Path) -> MllamaCheckpoint:
    """Open and check a Llama-3.2-Vision directory; CheckpointError names what is wrong, a key as
    the files spell it."""
    from edgevlm.model.checkpoint import _load_file, check_tensors, weight_files
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if not is_mllama(raw):
        raise CheckpointError(f"{path}: config.json's model_type is {raw.get('model_type')!r}, not {MLLAMA!r}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: no {name} (Llama 3's BPE tokenizer)")
    read = lambda name: json.loads((path / name).read_text()) if (path / name).is_file() else {}  # noqa: E731
    config = config_from_hf(raw, read("preprocessor_config.json"), read("generation_config.json"), path.name)
    tensors, names = {}, {}
    for f in weight_files(path):
        for k, t in _load_file(f).items():
            tensors[released_name(k)], names[released_name(k)] = t, k
    spelling = "transformers5" if any(k != names[k] for k in tensors) else "released"
    spell = (lambda k: names.get(k) or transformers5_name(k)) if spelling == "transformers5" else None
    check_tensors(tensors, layout(config), where=str(path), spell=spell)
    return MllamaCheckpoint(path, config, tensors, spelling)


# -- writing random checkpoints ------------------------------------------------------------------------

RELEASED_SHARD_BYTES = 5_000_000_000  # Llama-3.2-11B-Vision's five safetensors files are about this size


def random_tensors(cfg: MllamaConfig, seed: int) -> dict[str, Planned]:
    """bf16 tensors for every key, scaled to keep activations in range; every gate non-zero
    (tanh of 0.4..1.0), so the image and the tiles' positions change what the model says.
    Each is made when its shard is written (random_weights.Planned)."""
    g = torch.Generator().manual_seed(seed)

    def make(key, shape):
        if key.endswith("gate") or key.endswith("gate_attn") or key.endswith("gate_ffn"):
            t = 0.4 + 0.6 * torch.rand(shape, generator=g)
        elif len(shape) == 1 and key.endswith("weight"):  # norm scales: near one
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # biases, the class embedding
            t = 0.02 * torch.randn(shape, generator=g)
        elif "embed" in key or "embedding" in key:
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) * ((3.0 if key.endswith("lm_head.weight") else 1.0) / fan_in ** 0.5)
        return t.to(torch.bfloat16)

    return {key: Planned(tuple(shape), torch.bfloat16, functools.partial(make, key, shape))
            for key, shape in layout(cfg).items()}


def write_random_mllama(out_dir: str | Path, cfg: MllamaConfig, *, seed: int = 0, spelling: str = "released",
                        shard_bytes: int | None = None) -> Path:
    """A random-weight checkpoint for an mllama preset in the released layout (spelling
    "transformers5": the keys as transformers 5 holds them), atomically. shard_bytes: per
    safetensors file (default: the release's 5 GB shards for a model that size, else one file)."""
    if spelling not in SPELLINGS:
        raise ValueError(f"unknown key spelling {spelling!r} ({' or '.join(SPELLINGS)})")
    out_dir = Path(out_dir)
    tensors = random_tensors(cfg, seed)
    if spelling == "transformers5":
        tensors = {transformers5_name(k): t for k, t in tensors.items()}
    if shard_bytes is None and sum(t.nbytes for t in tensors.values()) > RELEASED_SHARD_BYTES:
        shard_bytes = RELEASED_SHARD_BYTES
    with staged_dir(out_dir) as tmp:
        _save_weights(tensors, tmp, "safetensors", shard_bytes)
        del tensors
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        t = cfg.text
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": t.bos_token_id, "eos_token_id": list(cfg.stop_token_ids),
             "pad_token_id": t.pad_token_id, "do_sample": True, "temperature": 0.6, "top_p": 0.9}, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor_config(cfg.vision), indent=2) + "\n")
        write_tokenizer(tmp, cfg)
    return out_dir


def processor_config(v: MllamaVisionConfig) -> dict:
    return {"image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True,
            "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std), "max_image_tiles": v.max_num_tiles, "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": v.image_size, "width": v.image_size}}


def write_tokenizer(out: Path, cfg: MllamaConfig) -> None:
    """tokenizer.json (byte-level BPE with Llama 3's split; special tokens from the top of the
    vocabulary, <|image|> right after it) and tokenizer_config.json with the chat template."""
    tok, names = train_tokenizer(cfg.text.vocab_size, cfg.image_token_id)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        **special, "added_tokens_decoder": {str(i): {"content": n, "special": True, "lstrip": False, "rstrip": False,
                                                     "normalized": False, "single_word": False}
                                            for n, i in names.items()},
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": True, "model_input_names":
        ["input_ids", "attention_mask"], "model_max_length": cfg.text.max_position,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")


def train_tokenizer(vocab_size: int, image_token_id: int):
    """(tokenizers.Tokenizer, special token -> id): BPE merges learned from our English corpus up
    to the regular part of the vocabulary, Llama 3's special tokens and reserved ones filling
    its top, <|image|> at image_token_id."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from edgevlm.model.random_weights import corpus
    reserved_top = 256 if vocab_size > 4096 else 24  # Llama 3: the top 256 ids; the tiny twin: 24
    regular = vocab_size - reserved_top
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    filler = regular - tok.get_vocab_size()  # a small corpus stops short of a large vocabulary
    names = list(SPECIAL) + [f"<|reserved_special_token_{i}|>" for i in range(2, reserved_top - len(SPECIAL) + 2)]
    fill = [f"<|reserved_filler_{i}|>" for i in range(filler)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in fill + names + [IMAGE_TOKEN]])
    ids = {n: tok.token_to_id(n) for n in names + [IMAGE_TOKEN]}
    if ids["<|begin_of_text|>"] != vocab_size - reserved_top or ids[IMAGE_TOKEN] != image_token_id:
        raise RuntimeError(f"tokenizer ids came out wrong: bos {ids['<|begin_of_text|>']}, image {ids[IMAGE_TOKEN]}")
    bos = ids["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A $B:1",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok, {n: ids[n] for n in names + [IMAGE_TOKEN]} | {f: tok.token_to_id(f) for f in fill}
