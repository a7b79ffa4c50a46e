"""
DualToken stage 1 (arXiv 2503.14324, §3.2): SigLIP in plain PyTorch and the dual-codebook tokenizer.

One SigLIP ViT serves both visual vocabularies. Reconstruction is supervised at a shallow layer (the
output of layer 6 of 27, plus 0.6 × a projection of layer 4 in the official release) and semantics at
a deep one (layer 26 and the pooling head). Each tap goes through a pre-quant projection and its own
residual VQ (rvq.py). The pixel codes are decoded to an image by a VQGAN-style conv decoder; the
semantic codes, projected back to the ViT width, replace the layer-26 hidden state and run through
the remaining layer, post_layernorm and the MAP head, so the pooled embedding (zero-shot, retrieval)
is computed from the quantized semantics.

Sections: SigLIP (config, towers, strict HF loading, sigmoid loss), then the DualTokenizer (config and
presets, projections, decoder, model), then stage-1 training, evaluation and the shapes teacher:

    python tokenizer.py --preset shapes-teacher       # micro-SigLIP teacher for the shapes demo
    python tokenizer.py --preset shapes               # stage 1 on shapes, from that teacher
    python tokenizer.py --preset shapes --eval        # PSNR/SSIM/codebooks/zero-shot + PNGs
    torchrun --nproc_per_node=8 tokenizer.py --preset so400m --siglip DIR --data 'cc12m/{00000..02175}.tar'
"""

import argparse
import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import types
import typing
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import (SHAPES_ATTRS, SHAPES_RES, ClassFolderDataset, NoSamples, ShapesDataset, WebDataset, expand_urls,
                  load_text_tokenizer, parse_shapes_caption, read_back_accuracy, shapes_caption, shapes_hard_negatives,
                  shapes_partial_captions, shard_hint, shapes_vocabulary, shapes_words, to_pil)
from losses import LPIPS, PatchGAN, adaptive_gan_weight, generator_loss, hinge_d_loss, psnr, semantic_loss, ssim
from rvq import ResidualVQ

# -----------------------------------------------------------------------------
# SigLIP (Zhai et al. 2023; SigLIP2 fixed-resolution checkpoints use the same network)


@dataclass(frozen=True)
class SigLIPConfig:
    # Defaults: google/siglip2-so400m-patch14-384, the DualToken backbone. SigLIP v1 so400m is the
    # same network with a 32000-token SentencePiece vocabulary and bicubic resizing. The patch conv
    # drops the last 384 − 27·14 = 6 pixel rows/cols: 27×27 = 729 tokens, no CLS token.
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    mlp: int = 4304
    layers: int = 27
    heads: int = 16
    vocab_size: int = 256000     # Gemma tokenizer (SigLIP2); SigLIP v1: 32000
    text_len: int = 64           # learned text positions; texts are padded to this length
    text_width: int = 1152
    text_mlp: int = 4304
    text_layers: int = 27
    text_heads: int = 16
    embed_dim: int = 1152        # text head output (HF projection_size); equals width for the logits
    layer_norm_eps: float = 1e-6
    resample: str = "bilinear"   # preprocessing resize filter: SigLIP2 bilinear, v1 bicubic

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf, resample=None):
        """From a transformers SigLIP `config.json` dict (model_type "siglip": v1 and SigLIP2 fixed-res)."""
        if hf.get("model_type") != "siglip":
            raise ValueError(f"not a SigLIP config.json: model_type {hf.get('model_type')!r}")
        v = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
        t = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
        image_size, patch_size = (_square(v[k], k) for k in ("image_size", "patch_size"))
        embed_dim = t["projection_size"] if t["projection_size"] is not None else t["hidden_size"]
        problems = [msg for bad, msg in (
            (v["hidden_act"] != "gelu_pytorch_tanh" or t["hidden_act"] != "gelu_pytorch_tanh",
             f"activation {v['hidden_act']}/{t['hidden_act']} (only gelu_pytorch_tanh)"),
            (v["num_channels"] != 3, f"num_channels {v['num_channels']}"),
            (not v["vision_use_head"], "vision_use_head false (the MAP head is required)"),
            (v["layer_norm_eps"] != t["layer_norm_eps"], "different layer_norm_eps per tower"),
            (embed_dim != v["hidden_size"], f"text embedding {embed_dim} != image {v['hidden_size']}"),
        ) if bad]
        if problems:
            raise ValueError("unsupported SigLIP config: " + "; ".join(problems))
        return cls(
            image_size=image_size, patch_size=patch_size, width=v["hidden_size"],
            mlp=v["intermediate_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
            vocab_size=t["vocab_size"], text_len=t["max_position_embeddings"], text_width=t["hidden_size"],
            text_mlp=t["intermediate_size"], text_layers=t["num_hidden_layers"],
            text_heads=t["num_attention_heads"], embed_dim=embed_dim, layer_norm_eps=v["layer_norm_eps"],
            resample=resample or cls.resample,
        )

    def to_hf(self):
        """The transformers `config.json` dict for this network (inverse of from_hf)."""
        return {
            "architectures": ["SiglipModel"], "model_type": "siglip",
            "vision_config": {
                "model_type": "siglip_vision_model", "image_size": self.image_size,
                "patch_size": self.patch_size, "hidden_size": self.width, "intermediate_size": self.mlp,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "layer_norm_eps": self.layer_norm_eps},
            "text_config": {
                "model_type": "siglip_text_model", "vocab_size": self.vocab_size,
                "max_position_embeddings": self.text_len, "hidden_size": self.text_width,
                "intermediate_size": self.text_mlp, "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_heads, "projection_size": self.embed_dim,
                "layer_norm_eps": self.layer_norm_eps},
        }


# transformers' SiglipVisionConfig / SiglipTextConfig defaults. HF writes config.json with only the
# fields that differ from these (google/siglip-so400m-patch14-384 omits vocab_size, for instance),
# so a missing key means the value here, not ours.
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, vision_use_head=True)
_HF_TEXT_DEFAULTS = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, projection_size=None)
# preprocessor_config.json stores PIL filter codes
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _square(value, name):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} {value}: only square images and patches are supported")
        value = value[0]
    return int(value)


SIGLIP_PRESETS = {
    "so400m": SigLIPConfig(),
    # google/siglip2-so400m-patch16-256: 16×16 = 256 tokens, same widths and depth
    "so400m-256": SigLIPConfig(image_size=256, patch_size=16),
    # The micro-SigLIP of the shapes demo: 64×64 images, patch 8 → 8×8 tokens, 8 layers so the
    # DualToken taps (shortcut/reconstruction/semantic) scale down to 1/2/7; text as word ids
    # (text_encoder "words": 35 ids of 512 rows), captions ≤ 12 words padded to 16.
    "shapes": SigLIPConfig(
        image_size=64, patch_size=8, width=128, mlp=512, layers=8, heads=4, vocab_size=512,
        text_len=16, text_width=128, text_mlp=512, text_layers=4, text_heads=4, embed_dim=128),
}


class MLP(nn.Module):

    def __init__(self, width, hidden):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Attention(nn.Module):

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (l(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for l in (self.q, self.k, self.v))  # (B, nh, T, hs)
        # No mask in either tower: SigLIP's text encoder is bidirectional too (unlike CLIP).
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):

    def __init__(self, width, mlp, heads, eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MAPHead(nn.Module):
    # Multihead attention pooling (big_vision "MAP"): one learned probe attends over all tokens, then
    # a pre-LN MLP residual; the probe's output is the image embedding.

    def __init__(self, width, mlp, heads, eps):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.in_proj = nn.Linear(width, 3 * width)  # nn.MultiheadAttention layout: rows q, k, v
        self.out_proj = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp)

    def forward(self, x):
        B, N, C = x.shape
        nh, hs = self.heads, C // self.heads
        wq, wk, wv = self.in_proj.weight.chunk(3)
        bq, bk, bv = self.in_proj.bias.chunk(3)
        q = F.linear(self.probe, wq, bq).expand(B, 1, C).view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = F.linear(x, wk, bk).view(B, N, nh, hs).transpose(1, 2)                           # (B, nh, N, hs)
        v = F.linear(x, wv, bv).view(B, N, nh, hs).transpose(1, 2)
        h = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C))
        h = h + self.mlp(self.ln(h))
        return h[:, 0]  # (B, D)


class VisionTower(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(c.grid ** 2, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.mlp, c.heads, c.layer_norm_eps) for _ in range(c.layers))
        self.ln_post = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.head = MAPHead(c.width, c.mlp, c.heads, c.layer_norm_eps)

    def embed(self, pixels):
        # (B, 3, S, S) in [-1, 1] -> (B, N, D), tokens in row-major grid order (HF hidden_states[0])
        return self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed

    def pool(self, h):
        # last hidden state (B, N, D) -> image embedding (B, D)
        return self.head(self.ln_post(h))


class TextTower(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.tok_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.pos_embed = nn.Parameter(torch.zeros(c.text_len, c.text_width))
        self.blocks = nn.ModuleList(
            Block(c.text_width, c.text_mlp, c.text_heads, c.layer_norm_eps) for _ in range(c.text_layers))
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.text_width, c.embed_dim)

    def forward(self, ids):
        # (B, T) token ids, T ≤ text_len -> (B, embed_dim)
        x = self.tok_embed(ids) + self.pos_embed[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        # SigLIP pools the last position: texts are padded to a fixed length, there is no EOS lookup.
        return self.head(self.ln_final(x)[:, -1])


def sigmoid_loss(logits, labels=None):
    """SigLIP loss (Zhai et al. 2023, eq. 1): logits (B, B) for matched pairs i ↔ i, or (T, B) with
    labels (T, B) in {+1, −1} (a text may describe several images of the batch, or none).

    Every (text, image) cell is an independent binary problem, label +1 on the diagonal and −1
    elsewhere: −Σ over cells of log σ(label · logit), divided by the number of images.
    """
    if labels is None:
        labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[1]


# HF → ours for one encoder layer (both towers); weight and bias each
_HF_BLOCK = {
    "layer_norm1": "ln_1", "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v", "self_attn.out_proj": "attn.proj", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.fc", "mlp.fc2": "mlp.proj",
}
# HF → ours outside the layers
_HF_KEYS = {
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
    "vision_model.embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision.patch_embed.bias",
    "vision_model.embeddings.position_embedding.weight": "vision.pos_embed",
    "vision_model.post_layernorm.weight": "vision.ln_post.weight",
    "vision_model.post_layernorm.bias": "vision.ln_post.bias",
    "vision_model.head.probe": "vision.head.probe",
    "vision_model.head.attention.in_proj_weight": "vision.head.in_proj.weight",
    "vision_model.head.attention.in_proj_bias": "vision.head.in_proj.bias",
    "vision_model.head.attention.out_proj.weight": "vision.head.out_proj.weight",
    "vision_model.head.attention.out_proj.bias": "vision.head.out_proj.bias",
    "vision_model.head.layernorm.weight": "vision.head.ln.weight",
    "vision_model.head.layernorm.bias": "vision.head.ln.bias",
    "vision_model.head.mlp.fc1.weight": "vision.head.mlp.fc.weight",
    "vision_model.head.mlp.fc1.bias": "vision.head.mlp.fc.bias",
    "vision_model.head.mlp.fc2.weight": "vision.head.mlp.proj.weight",
    "vision_model.head.mlp.fc2.bias": "vision.head.mlp.proj.bias",
    "text_model.embeddings.token_embedding.weight": "text.tok_embed.weight",
    "text_model.embeddings.position_embedding.weight": "text.pos_embed",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "text_model.head.weight": "text.head.weight",
    "text_model.head.bias": "text.head.bias",
}


# --- strict loading, both stages (STYLE.md #6): configs typed and built on the meta device, every key
# and shape checked from the safetensors headers, and only then memory allocated and tensors read


def _is_a(value, tp):
    # does a config.json value fit a dataclass annotation (int, float, str, bool, tuple, dict, X | None)?
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if tp is tuple:  # of numbers: dec_ch_mult, dec_attn, betas
        return isinstance(value, (list, tuple)) and all(_is_a(v, float) for v in value)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    return isinstance(value, tp)


def check_types(config, source):
    """Every field of a model config has its annotated type, and numbers are finite and ≥ 0 (sizes,
    weights, rates), or ValueError naming source, field and value: a config.json with "width": "1152"
    or "heads": -2 fails here, not deep in a layer."""
    for f in fields(config):
        value = getattr(config, f.name)
        if not _is_a(value, f.type):
            raise ValueError(f"{source}: {f.name} = {value!r} is not of type {getattr(f.type, '__name__', f.type)}")
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
               for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise ValueError(f"{source}: {f.name} = {value!r} is negative")
    return config


def config_from_dict(cls, d, source):
    """A config dataclass from a parsed config.json: unknown keys and wrong types are one-line errors."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}")
    try:
        return check_types(cls(**d), source)
    except TypeError as e:  # a required field missing
        raise ValueError(f"{source}: {e}") from None


def read_json(path):
    """A JSON file -> its value; a missing, unreadable or malformed file is one ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None


def confined(root, name, source):
    """root/name for a file name read from a file (a shard in an index, a checkpoint's tokenizer
    path): a relative path that stays inside root, never an absolute one or one that climbs out."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or \
            os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise ValueError(f"{source}: {name!r} is not a file name inside {root}")
    return os.path.join(root, name)


def build_on_meta(cls, config, source):
    """cls(config) on the meta device: shape checks run and nothing is allocated, so a nonsense or
    huge config fails here in one line. Give the result storage with load_strict."""
    try:
        with torch.device("meta"):
            return cls(config)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f"{source}: {str(e).splitlines()[0]}") from None


def check_fits(model, device):
    """A model built on meta whose fp32 weights alone exceed the memory of `device` ("auto", "cpu",
    "cuda[:i]") is refused in one line, before an allocation would fail or swap for minutes."""
    need = 4 * sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))
    name = "cuda" if device == "auto" and torch.cuda.is_available() else device
    if str(name).startswith("cuda") and torch.cuda.is_available():
        have = torch.cuda.get_device_properties(torch.device(name).index or 0).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"the model's weights alone need {need / 2**30:.1f} GiB, {name} has {have / 2**30:.1f} GiB: "
                         "check the config's sizes")
    return model


def safetensors_files(path):
    """A model directory -> its weight files: model.safetensors, or the shards named in
    model.safetensors.index.json's weight_map (HF's layout), confined to the directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object")
        return [confined(path, n, index) for n in sorted(set(weight_map.values()), key=str)], weight_map
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single], None


def safetensors_shapes(path):
    """-> (files, {key: shape}) from the headers alone; a truncated or foreign file is one line."""
    files, weight_map = safetensors_files(path)
    shapes = {}
    for fn in files:
        try:
            with safe_open(fn, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or others
            raise ValueError(f"{fn}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if weight_map is not None and set(shapes) != set(weight_map):
        raise ValueError(f"{path}/model.safetensors.index.json: the shards hold {sorted(set(shapes) - set(weight_map))[:5]} "
                         f"not in its weight_map and lack {sorted(set(weight_map) - set(shapes))[:5]}")
    return files, shapes


def check_state_shapes(want, got, source, hint=""):
    """Strict: `got` (checkpoint key -> shape) holds exactly the keys of `want` (checkpoint key ->
    (our name, our shape)), each with our shape. ValueError naming the keys, or the key and both shapes."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"{source}: {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected "
                         f"keys {unexpected[:8]}{hint}")
    bad = [f"{k}{'' if k == ours else f' (ours {ours})'} checkpoint {tuple(got[k])} vs model {tuple(shape)}"
           for k, (ours, shape) in want.items() if tuple(got[k]) != tuple(shape)]
    if bad:
        raise ValueError(f"{source}: shape mismatch: " + "; ".join(bad[:5]))


def load_strict(model, path, device="cpu", key_map=None, hint=""):
    """Strict load of a model directory's safetensors (one file or shards) into `model` built on the
    meta device (build_on_meta). key_map: checkpoint key -> ours (default: the same names). Headers
    first: nothing is allocated or read until every key and shape matches. Tensors are cast to the
    model's dtype. -> model, on `device`."""
    own = model.state_dict()
    key_map = key_map or {k: k for k in own}
    assert sorted(key_map.values()) == sorted(own), "key map out of date"
    files, shapes = safetensors_shapes(path)
    check_state_shapes({k: (ours, own[ours].shape) for k, ours in key_map.items()}, shapes, path, hint)
    model.to_empty(device=device)
    own = model.state_dict()
    with torch.no_grad():
        for fn in files:  # one shard in memory at a time
            for k, t in load_file(fn, device=str(device)).items():
                own[key_map[k]].copy_(t)
    return model


def sincos_2d(grid, width, temperature=10000.0):
    # big_vision posemb_sincos_2d: (grid², width) = [sin x·ω, cos x·ω, sin y·ω, cos y·ω], ω geometric
    # from 1 to 1/temperature over width/4 frequencies; row-major positions like the patch tokens.
    if width % 4:
        return torch.randn(grid * grid, width) * width ** -0.5  # no 2-D table: big_vision's "learn" init
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    omega = temperature ** -(torch.arange(width // 4) / max(width // 4 - 1, 1))
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # (grid², width/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class SigLIP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config)
        self.text = TextTower(config)
        # SigLIP paper init (Zhai et al. 2023, Algorithm 1): t' = log 10, b = −10, so training starts
        # from strongly negative logits, as almost every pair in a batch is a negative.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))
        # Fresh weights matter only for the micro-SigLIP trained from scratch on shapes; pretrained
        # checkpoints overwrite everything. The init is big_vision's (transformers'
        # SiglipPreTrainedModel._init_weights): with GPT-style N(0, 0.02) everywhere the MAP head's
        # probe and keys start at a saddle and the micro teacher did not learn where the shape is
        # (EXPERIMENTS.md, "The semantic teacher").
        self.apply(self._init_weights)
        nn.init.normal_(self.text.pos_embed, std=self.text.pos_embed.shape[1] ** -0.5)
        # The image positions start as big_vision's 2-D sin-cos table (still learned): with N(0, 1/width)
        # they are ~8x smaller than a patch's content and the micro teacher took 2000+ steps to learn
        # where the shape is; with sin-cos a labelled probe gets place in 300 steps (EXPERIMENTS.md, §11).
        with torch.no_grad():
            self.vision.pos_embed.copy_(sincos_2d(config.grid, config.width))
        nn.init.xavier_uniform_(self.vision.head.probe)
        nn.init.xavier_uniform_(self.vision.head.in_proj.weight)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (Attention, MLP)):  # xavier-uniform projections
            for lin in m.children():
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6 if isinstance(m, MLP) else 0.0)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            # LeCun normal as jax: a normal truncated at ±2 std, its std corrected for the cut, drawn
            # by the inverse CDF (no rejection loop, so it also runs on fake tensors). apply() visits
            # children first, so the Attention/MLP branch above overwrites this for their projections.
            std = m.weight[0].numel() ** -0.5 / 0.87962566103423978
            cdf = (1 + math.erf(-2 / math.sqrt(2))) / 2  # Φ(−2)
            with torch.no_grad():
                m.weight.uniform_(2 * cdf - 1, 1 - 2 * cdf).erfinv_().mul_(std * math.sqrt(2))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def vision_hidden_states(self, pixels):
        # (B, 3, S, S) -> L+1 tensors (B, N, D): [0] = embeddings, [i] = output of layer i (HF indexing;
        # the last one is before post_layernorm)
        h = self.vision.embed(pixels)
        states = [h]
        for block in self.vision.blocks:
            h = block(h)
            states.append(h)
        return states

    def encode_image(self, pixels):
        # (B, 3, S, S) in [-1, 1] -> (B, D), not normalized
        h = self.vision.embed(pixels)
        for block in self.vision.blocks:
            h = block(h)
        return self.vision.pool(h)

    def encode_text(self, ids):
        # (B, T) -> (B, D), not normalized
        return self.text(ids)

    def forward(self, pixels, ids, labels=None):
        """Images (B, …) and texts (T, …) -> (logits (T, B), sigmoid loss); texts matched one to one
        with the images when labels (T, B) is None."""
        img = F.normalize(self.encode_image(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        logits = txt @ img.t() * self.logit_scale.exp() + self.logit_bias
        return logits, sigmoid_loss(logits, labels)

    def preprocess(self, images):
        # PIL images -> (B, 3, S, S) in [-1, 1]: resize the whole image to S×S (no crop) with the
        # checkpoint's filter, then rescale with mean = std = 0.5, as the HF SigLIP processor does.
        size = self.config.image_size
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.config.resample]
        x = np.stack([np.asarray(im.convert("RGB").resize((size, size), resample), dtype=np.float32)
                      for im in images])
        return torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0

    # --- HF checkpoints

    def hf_key_map(self):
        """Every HF parameter name of this network → ours (one to one, both complete)."""
        m = dict(_HF_KEYS)
        for hf_tower, tower, n in (("vision_model", "vision", self.config.layers),
                                   ("text_model", "text", self.config.text_layers)):
            for i in range(n):
                for hf, ours in _HF_BLOCK.items():
                    for p in ("weight", "bias"):
                        m[f"{hf_tower}.encoder.layers.{i}.{hf}.{p}"] = f"{tower}.blocks.{i}.{ours}.{p}"
        assert sorted(m.values()) == sorted(n for n, _ in self.named_parameters()), "key map out of date"
        return m

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict):
        """Strictly load an HF SiglipModel state dict (any float dtype; cast to ours)."""
        params = dict(self.named_parameters())
        key_map = self.hf_key_map()
        check_state_shapes({hf: (ours, params[ours].shape) for hf, ours in key_map.items()},
                           {k: v.shape for k, v in state_dict.items()}, "SigLIP state dict")
        for hf, ours in key_map.items():
            params[ours].copy_(state_dict[hf])

    @classmethod
    def from_pretrained(cls, path):
        """A transformers SigLIP directory: config.json + model.safetensors (or sharded), fp32 or bf16."""
        # Built on meta and then given storage: every parameter is overwritten, so skip init.
        model = build_on_meta(cls, cls.read_config(path), os.path.join(path, "config.json"))
        return load_strict(model, path, key_map=model.hf_key_map()).eval()  # training calls .train()

    @staticmethod
    def read_config(path):
        """The SigLIPConfig of a transformers SigLIP directory; one ValueError naming the file otherwise."""
        source = os.path.join(path, "config.json")
        hf = read_json(source)
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object")
        resample = None
        preprocessor = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(preprocessor):
            p = read_json(preprocessor)
            resample = _PIL_RESAMPLE.get(p.get("resample", 3) if isinstance(p, dict) else None)  # HF's default: bicubic
            if resample is None:
                raise ValueError(f"{preprocessor}: resample must be 2 (bilinear) or 3 (bicubic)")
        try:
            config = check_types(SigLIPConfig.from_hf(hf, resample), source)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return config

    def save_pretrained(self, path):
        """Writes the transformers layout (config.json, model.safetensors, preprocessor_config.json), so
        a SigLIP trained here loads with from_pretrained above and with transformers' SiglipModel."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_hf(), f, indent=2)
        size = self.config.image_size
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "SiglipImageProcessor",
                       "size": {"height": size, "width": size},
                       "resample": {v: k for k, v in _PIL_RESAMPLE.items()}[self.config.resample],
                       "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, f, indent=2)
        params = dict(self.named_parameters())
        tensors = {hf: params[ours].detach().cpu().contiguous() for hf, ours in self.hf_key_map().items()}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# DualTokenizer (§3.2)


@dataclass(frozen=True)
class TokenizerConfig:
    # Defaults: the paper's tokenizer, official config model_config_siglip_384_rvq8.
    # Table 3 ablations: "Recon.(26) + Sem.(26)" is joint = True: one codebook at sem_layer whose
    # codes both feed the decoder and replace the hidden state (VILA-U style); "Recon.(6)" alone is
    # the default model trained with semantic weight 0 (a training setting, not an architecture one).
    siglip: SigLIPConfig = field(default_factory=SigLIPConfig)
    rec_layer: int = 6           # §3.2: reconstruction supervises layers 1–6 (HF hidden_states[6])
    shortcut_layer: int = 4      # official: + shortcut_weight × a projection of layer 4's output
    shortcut_weight: float = 0.6  # 0 removes the shortcut
    sem_layer: int = 26          # §3.2: semantic loss at layer 26 and the pooling head
    code_dim: int = 32           # RVQ vector width (both branches)
    codebook_size: int = 16384   # one codebook shared by all depths, per branch
    depth: int = 8               # RVQ depth: 27×27×8 codes per image and branch
    decay: float = 0.99          # EMA codebook decay
    latent_size: int = 24        # decoder latent: the h×w code map is resized (bilinear) to this
    dec_in: int = 1024           # post-quant ResNet block: ViT width → dec_in channels
    dec_ch: int = 128            # VQGAN decoder base channels
    dec_ch_mult: tuple = (1, 1, 4, 4, 8)  # per level, shallowest first: len − 1 upsamplings
    dec_res_blocks: int = 2      # taming's num_res_blocks: the decoder runs num_res_blocks + 1 per level
    dec_attn: tuple = (24,)      # resolutions with self-attention (the latent's)
    joint: bool = False          # Table 3(b): no pixel branch; the decoder reads the semantic codes

    @property
    def output_size(self):
        return self.latent_size * 2 ** (len(self.dec_ch_mult) - 1)

    @classmethod
    def from_dict(cls, d, source="config"):
        d = dict(d)
        d["siglip"] = config_from_dict(SigLIPConfig, d.get("siglip"), f"{source}: siglip")
        for k in ("dec_ch_mult", "dec_attn"):  # JSON lists back to tuples, so configs compare equal
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return config_from_dict(cls, d, source)


TOKENIZER_PRESETS = {
    "so400m": TokenizerConfig(),
    # official model_config_siglip_256_rvq4: SigLIP2 so400m patch16-256, codes 16×16×4, latent 16
    "so400m-256": TokenizerConfig(
        siglip=SIGLIP_PRESETS["so400m-256"], depth=4, latent_size=16, dec_attn=(16,)),
    # the CPU demo: micro-SigLIP (8 layers, 8×8 tokens) with the taps scaled from 4/6/26 of 27 to
    # 1/2/7 of 8; codes 8×8×4 from 256 entries (nearly as good as 1024, and fewer codes for the
    # background: EXPERIMENTS.md, §7); the decoder needs no resize (latent = grid = 8), upsamples 3×.
    "shapes": TokenizerConfig(
        siglip=SIGLIP_PRESETS["shapes"], rec_layer=2, shortcut_layer=1, sem_layer=7,
        codebook_size=256, depth=4, latent_size=8, dec_in=128, dec_ch=32, dec_ch_mult=(1, 2, 2, 4),
        dec_res_blocks=1, dec_attn=(8,)),
}

CHECKPOINT_FORMAT = "dualtoken-tokenizer/1"  # written to config.json, checked on load


class Projection(nn.Module):
    # Pre/post-quant projection, per token: LN → Linear → GELU → Linear, hidden = the wider end.
    # The official release uses small attention blocks here (LN → multi-head attention averaged down
    # to the output width + a LN→Linear shortcut, then a GeGLU MLP); the paper does not describe
    # them, so we keep the simplest learned map between the ViT width and the code width.

    def __init__(self, cin, cout):
        super().__init__()
        hidden = max(cin, cout)
        self.ln = nn.LayerNorm(cin)
        self.fc = nn.Linear(cin, hidden)
        self.proj = nn.Linear(hidden, cout)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


def _group_norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResBlock(nn.Module):
    # VQGAN ResNet block without time embedding or dropout. k1 = 1 makes the official
    # PostQuantResnetBlock (1×1 first conv), which maps the ViT width to the decoder's input.

    def __init__(self, cin, cout, k1=3):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, k1, padding=k1 // 2)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    # VQGAN single-head self-attention over the h×w positions

    def __init__(self, c):
        super().__init__()
        self.norm = _group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)                                         # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        return x + self.proj(y.transpose(1, 2).reshape(B, C, H, W))


class Upsample(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    # VQGAN decoder (taming-transformers, as in the official release): conv_in, a middle
    # ResNet–attention–ResNet, then per level from the deepest: num_res_blocks + 1 ResNet blocks
    # (each followed by attention at the listed resolutions) and a nearest ×2 upsample + conv except
    # at the last level; GroupNorm → SiLU → conv_out to RGB.
    # (B, dec_in, s, s) -> (B, 3, s·2^(levels−1), s·2^(levels−1))

    def __init__(self, c):
        super().__init__()
        ch = c.dec_ch * c.dec_ch_mult[-1]
        self.conv_in = nn.Conv2d(c.dec_in, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch))
        self.levels = nn.ModuleList()
        res = c.latent_size
        for i in reversed(range(len(c.dec_ch_mult))):
            layers = []
            for _ in range(c.dec_res_blocks + 1):
                layers.append(ResBlock(ch, c.dec_ch * c.dec_ch_mult[i]))
                ch = c.dec_ch * c.dec_ch_mult[i]
                if res in c.dec_attn:
                    layers.append(AttnBlock(ch))
            if i > 0:
                layers.append(Upsample(ch))
                res *= 2
            self.levels.append(nn.Sequential(*layers))
        self.norm_out = _group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)  # the "last layer" of the adaptive GAN weight
        # Activation checkpointing per block in training (DualTokenizer.grad_checkpointing sets it):
        # at 384 px the full-resolution blocks' activations outweigh the whole ViT's
        self.grad_checkpointing = False

    def _out(self, h):
        return F.silu(self.norm_out(h))

    def forward(self, z):
        h = self.conv_in(z)
        for block in [*self.mid, *(b for level in self.levels for b in level), self._out]:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.conv_out(h)


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor       # (B, 3, H, W) decoded from the quantized pixel features, not clamped
    sem: torch.Tensor         # (B, N, D) post-quant semantic features that replace layer sem_layer (F, eq. 4)
    pooled: torch.Tensor      # (B, D) MAP-head image embedding computed from `sem`
    commit_pix: torch.Tensor  # scalar, eq. (1), pixel RVQ
    commit_sem: torch.Tensor  # scalar, eq. (1), semantic RVQ
    pix_codes: torch.Tensor   # (B, h, w, depth) long
    sem_codes: torch.Tensor   # (B, h, w, depth) long


def _codes(rvq, z):
    # Codes only: ResidualVQ updates its EMA codebook in training mode, and encoding must never
    # move the codebook, whatever mode the model is in.
    mode = rvq.training
    rvq.train(False)
    codes = rvq(z)[1]
    rvq.train(mode)
    return codes


class DualTokenizer(nn.Module):
    DECODER_PARTS = ("pix_post", "post_quant", "decoder")  # the modules after the pixel codes (--decoder_only)

    def __init__(self, config, siglip=None):
        super().__init__()
        c, s = config, config.siglip
        for name in ("shortcut_layer", "rec_layer", "sem_layer"):
            if not 1 <= getattr(c, name) <= s.layers:
                raise ValueError(f"{name} = {getattr(c, name)} outside the ViT's layers 1..{s.layers}")
        if not (c.rec_layer <= c.sem_layer and c.shortcut_layer <= c.sem_layer):
            # as the official code asserts: the pixel taps are read before the semantic layer is replaced
            raise ValueError("rec_layer and shortcut_layer must not be deeper than sem_layer")
        if c.output_size != s.image_size:
            raise ValueError(f"decoder output {c.output_size} (latent {c.latent_size} × 2^"
                             f"{len(c.dec_ch_mult) - 1}) != SigLIP image size {s.image_size}")
        if siglip is not None and siglip.config != s:
            raise ValueError("the SigLIP given does not match config.siglip")
        self.config = config
        self.siglip = siglip if siglip is not None else SigLIP(s)
        D = s.width
        # pixel branch: rec_layer (+ shortcut) → RVQ(pix) → post-quant → resize → ResNet → decoder.
        # Table 3(b) (joint) has no pixel codebook: the post-quant projection reads the semantic codes.
        if c.joint and (c.rec_layer != c.sem_layer or c.shortcut_weight):
            raise ValueError("joint (Table 3(b)) reconstructs from sem_layer: rec_layer = sem_layer, shortcut_weight = 0")
        self.pix_pre = None if c.joint else Projection(D, c.code_dim)
        self.pix_short = Projection(D, c.code_dim) if c.shortcut_weight else None
        self.pix_rvq = None if c.joint else ResidualVQ(c.code_dim, c.codebook_size, c.depth, decay=c.decay)
        self.pix_post = Projection(c.code_dim, D)
        self.post_quant = ResBlock(D, c.dec_in, k1=1)
        self.decoder = Decoder(c)
        # semantic branch: layer sem_layer → RVQ(sem) → post-quant → back into the ViT at sem_layer
        self.sem_pre = Projection(D, c.code_dim)
        self.sem_rvq = ResidualVQ(c.code_dim, c.codebook_size, c.depth, decay=c.decay)
        self.sem_post = Projection(c.code_dim, D)
        # Activation checkpointing of the ViT and decoder blocks in training (so400m); set by the trainer.
        self.grad_checkpointing = False

    @property
    def grad_checkpointing(self):
        return self.decoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on):
        self.decoder.grad_checkpointing = on  # the ViT blocks read it here, through _block

    @classmethod
    def from_siglip(cls, siglip, config):
        """A fresh tokenizer around pretrained SigLIP weights (a SigLIP or an HF directory). The
        backbone config comes from the checkpoint, everything else from `config`. A SigLIP given is
        used, not copied: the frozen teacher must be a separate copy."""
        if not isinstance(siglip, SigLIP):
            siglip = SigLIP.from_pretrained(siglip)
        return cls(replace(config, siglip=siglip.config), siglip)

    def _block(self, block, h):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def features(self, images):
        """images (B, 3, S, S) in [-1, 1] -> (pixel features (B, h, w, code_dim), the hidden state at
        sem_layer (B, N, D)), both before quantization; runs the ViT up to sem_layer only."""
        c, vision = self.config, self.siglip.vision
        g = c.siglip.grid
        h = vision.embed(images)  # (B, N, D)
        for i, block in enumerate(vision.blocks[: c.sem_layer], start=1):
            h = self._block(block, h)
            if i == c.shortcut_layer and self.pix_short is not None:
                short = self.pix_short(h)  # (B, N, code_dim)
            if i == c.rec_layer and not c.joint:
                pix = self.pix_pre(h)      # (B, N, code_dim)
        if c.joint:
            return None, h
        if self.pix_short is not None:
            pix = pix + c.shortcut_weight * short
        return pix.unflatten(1, (g, g)), h

    def forward(self, images):
        """Training pass: images (B, 3, S, S) in [-1, 1] -> TokenizerOutput (see its fields)."""
        c, vision = self.config, self.siglip.vision
        g = c.siglip.grid
        pix, f_sem = self.features(images)
        zq_sem, sem_codes, commit_sem = self.sem_rvq(self.sem_pre(f_sem).unflatten(1, (g, g)))
        if c.joint:  # Table 3(b): one set of codes for both objectives, one commitment term
            zq_pix, pix_codes, commit_pix = zq_sem, sem_codes, torch.zeros_like(commit_sem)
        else:
            zq_pix, pix_codes, commit_pix = self.pix_rvq(pix)  # (B, h, w, code_dim), (B, h, w, depth)
        # §3.2: the quantized semantics replace the layer-26 hidden state and feed the rest of the
        # ViT and the MAP head, so the pooled embedding is computed from the semantic codes.
        sem = self.sem_post(zq_sem).flatten(1, 2)  # (B, N, D)
        h = sem
        for block in vision.blocks[c.sem_layer:]:
            h = self._block(block, h)
        pooled = vision.pool(h)
        recon = self.decode_latent(zq_pix)
        return TokenizerOutput(recon, sem, pooled, commit_pix, commit_sem, pix_codes, sem_codes)

    @torch.no_grad()
    def teacher_targets(self, teacher, images):
        """Targets from a frozen SigLIP `teacher` (the initial state, eq. 4): its output of layer
        sem_layer F_0 (B, N, D) and its pooled embedding (B, D)."""
        h = teacher.vision.embed(images)
        for i, block in enumerate(teacher.vision.blocks, start=1):
            h = block(h)
            if i == self.config.sem_layer:
                f0 = h
        return f0, teacher.vision.pool(h)

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, S, S) in [-1, 1] -> (pix_codes, sem_codes), each (B, h, w, depth) long."""
        g = self.config.siglip.grid
        pix, f_sem = self.features(images)
        sem = _codes(self.sem_rvq, self.sem_pre(f_sem).unflatten(1, (g, g)))
        return (sem if self.config.joint else _codes(self.pix_rvq, pix)), sem

    def decode_latent(self, z):
        # quantized pixel features (B, h, w, code_dim) -> (B, 3, H, W), not clamped (training)
        # contiguous: the permuted view is channels-last, which every conv would carry through the
        # decoder, 1.2-1.4x slower a training step on CPU (GroupNorm's backward; EXPERIMENTS.md §29)
        x = self.pix_post(z).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        size = self.config.latent_size
        if x.shape[-1] != size:
            # official: bilinear resize of the 27×27 map to the 24×24 decoder latent
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.decoder(self.post_quant(x))

    @torch.no_grad()
    def decode(self, pix_codes):
        """pix_codes (B, h, w, depth) -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_latent(self.pix_quantizer.decode(pix_codes)).clamp(-1, 1)

    @property
    def pix_quantizer(self):
        # the codebook of the pixel codes: the semantic one in Table 3(b) (joint)
        return self.sem_rvq if self.config.joint else self.pix_rvq

    def save_pretrained(self, path, dtype=None):
        """config.json + model.safetensors, from this (unwrapped) module: no DDP/compile prefixes.
        dtype: store floating tensors in it (bfloat16 for a shipped checkpoint); loading casts back
        to the model's fp32."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"format": CHECKPOINT_FORMAT, **asdict(self.config)}, f, indent=2)
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        source = os.path.join(path, "config.json")
        d = read_json(source)
        if not isinstance(d, dict) or d.pop("format", None) != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
        # Built on meta, then given storage: the strict load overwrites every tensor.
        model = build_on_meta(cls, TokenizerConfig.from_dict(d, source), source)
        return load_strict(model, path, device).eval()  # as transformers does; training calls .train()


# -----------------------------------------------------------------------------
# Stage-1 training, evaluation and the shapes teacher (§3.2). Where the paper is silent the official
# release is followed: songweii/DualToken run_stage1.sh and src/open_clip_train/{main,train}.py.


@dataclass(frozen=True)
class TrainConfig:
    # Defaults: the official stage-1 run of the paper's tokenizer (so400m/384 on CC12M, 8 GPUs × 32).
    # Every field is a flag `--name value`; `--preset NAME` starts from TRAIN_PRESETS[NAME] instead.
    # --- what to run, on what
    stage: str = "tokenizer"     # "teacher": pretrain the shapes micro-SigLIP; "tokenizer": stage 1; "eval"
    eval: bool = False           # --eval: the same as --stage eval
    model: str = "so400m"        # TOKENIZER_PRESETS name; the backbone's own config comes from --siglip
    siglip: str = ""             # SigLIP directory: the initial weights and the frozen teacher (F_0, eq. 4)
    data: str = ""               # "shapes", or webdataset shards as a brace pattern: "cc12m/{00000..02175}.tar"
    out_dir: str = "out/tokenizer"  # checkpoint (config.json, model.safetensors, train_state.pt; see
                                    # "On disk" above write_checkpoint) and PNGs
    resume: bool = False         # continue from the checkpoint in out_dir
    init: str = ""               # start from this tokenizer checkpoint's weights (a fresh optimizer and schedule)
    decoder_only: bool = False   # train the pixel decoder only (pix_post → decoder) on the codes of the frozen
                                 # --init tokenizer: every code stays as it was, so a stage-2 model trained on
                                 # them keeps working with the new decoder (EXPERIMENTS.md §27)
    lpips: str = ""              # LPIPS weights (python losses.py convert-lpips); "" = LPIPS off
    # --- Table 3 ablations. None keeps the model preset's tap.
    ablation: str = ""           # "joint": (b) Recon(26)+Sem(26); "recon_only": (c) Recon(6); "": (d), the paper's
    rec_layer: Optional[int] = None
    sem_layer: Optional[int] = None
    shortcut_weight: Optional[float] = None
    codebook_size: Optional[int] = None  # entries per branch codebook (None: the model preset's)
    # --- loss, official train.py: sem_weight·[5·S(F, F_0) + 1·S(pool, pool_0)] + 5·(commit_pix + commit_sem)
    #     + 5·MSE(x̂, x) + 1·LPIPS(x̂, x) + 0.75·λ·G(x̂), S = MSE + (1 − cos) (losses.semantic_loss)
    sem_weight: float = 1.0      # 0 = reconstruction only, Table 3(c)
    sem_layer_weight: float = 5.0
    sem_pool_weight: float = 1.0
    sem_relative: bool = False   # S's MSE relative to the target's mean square (the shapes demo: EXPERIMENTS §11)
    commit_weight: float = 5.0
    mse_weight: float = 5.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.75     # × the adaptive λ (clamped to [0.3, 10] as in the official code)
    disc_start: int = 19531      # official: the GAN starts halfway through epoch 0 (10M / (32·8) / 2 steps)
    disc_norm: str = "batch"     # PatchGAN norm: "batch" (official, use_actnorm=False) or "act"
    # --- optimization (run_stage1.sh; cosine to 0 as open_clip's cosine_lr)
    lr: float = 7.2e-5
    min_lr: float = 0.0
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 1e-4   # on ≥2-D tensors only (open_clip: no decay on biases, norms, gains)
    warmup: int = 10000
    max_steps: int = 781250      # 20 epochs × 10M CC12M images / (32 × 8)
    decay_steps: int = 0         # cosine length; 0 = max_steps (set it to stop early on the same schedule)
    batch_size: int = 32         # per process (GPU)
    grad_accum: int = 1          # micro-batches per optimizer step
    grad_clip: float = 0.0       # 0 = off (the official run sets no clipping)
    # --- evaluation
    eval_data: str = ""          # class-folder set (ImageNet val layout) for real-data eval and zero-shot
    class_names: str = ""        # class-name file for eval_data (data.ClassFolderDataset); "" = folder names
    prompt: str = "a photo of a {}."  # zero-shot prompt template for eval_data
    text_tokenizer: str = ""     # "words" (shapes), "bytes", or an HF tokenizer directory; "" = the --siglip directory
    eval_n: int = 50000          # images per evaluation (ImageNet val: all 50k), spread over the set
    eval_every: int = 5000
    # --- system and logging
    device: str = "auto"         # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = "bfloat16"      # autocast dtype on CUDA, or "float32"; CPU always runs fp32
    compile: bool = False
    grad_checkpointing: bool = False  # activation checkpointing of the ViT and decoder blocks and of LPIPS
    workers: int = 4             # DataLoader workers per process
    hard_negatives: int = 0      # teacher stage: captions per image that differ in one attribute (data.shapes_hard_negatives)
    partial_captions: int = 0    # teacher stage: captions per image naming only some attributes (data.shapes_partial_captions)
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 5000


TRAIN_PRESETS = {
    "so400m": TrainConfig(),
    "so400m-256": TrainConfig(model="so400m-256"),
    # The CPU demo (torchrun --nproc_per_node 2). The teacher is the shapes micro-SigLIP trained from
    # scratch with the sigmoid loss (β2 = 0.95 as in Zhai et al.), big_vision's init, word-level
    # captions, per image 8 text negatives that each differ in one attribute and 3 partial captions
    # (positives for every image they describe: an additive embedding, read by the prompt ensemble);
    # it is trained once and shipped, like a pretrained SigLIP (EXPERIMENTS.md §11).
    "shapes-teacher": TrainConfig(
        stage="teacher", model="shapes", data="shapes", out_dir="out/shapes-teacher", lr=1e-3, min_lr=1e-4,
        betas=(0.9, 0.95), weight_decay=1e-4, warmup=100, max_steps=4000, batch_size=32, hard_negatives=8,
        partial_captions=3,
        text_tokenizer="words", eval_n=512, eval_every=500, workers=0, log_every=100, ckpt_every=250),
    # The tokenizer of the demo, on the shipped teacher: lr 1e-3, 2000 steps (small shapes keep their
    # corners: EXPERIMENTS.md §7), no GAN (disc_start = max_steps; a PatchGAN needs far more steps than
    # a CPU demo has, --disc_start N turns it on), the semantic MSE relative to the teacher's scale (§11).
    "shapes": TrainConfig(
        model="shapes", data="shapes", siglip="checkpoints/shapes-teacher", out_dir="out/shapes-tokenizer",
        lr=1e-3, warmup=50, max_steps=2000, disc_start=2000, batch_size=16, text_tokenizer="words",
        sem_relative=True, eval_n=512, eval_every=1000, workers=0, log_every=50, ckpt_every=500),
    # The shipped tokenizer's pixel decoder trained further on its own, frozen codes (EXPERIMENTS.md §27)
    "shapes-decoder": TrainConfig(
        model="shapes", data="shapes", siglip="checkpoints/shapes-teacher", init="checkpoints/shapes/tokenizer",
        decoder_only=True, out_dir="out/shapes-decoder", lr=3e-4, warmup=50, max_steps=1000, disc_start=1000,
        batch_size=16, text_tokenizer="words", sem_relative=True, eval_n=512, eval_every=500, workers=0,
        log_every=50, ckpt_every=250),
}

TRAIN_STATE_FORMAT = "dualtoken-train-state/1"  # train_state.pt, checked on --resume
STAGES = ("teacher", "tokenizer", "eval")
ABLATIONS = ("", "joint", "recon_only")


class UsageError(ValueError):
    # A mistake on the command line or in an input the user named (a wrong value, a missing, foreign or
    # damaged file): run_main prints it as one line, no traceback. A ValueError, which callers from
    # Python catch as they catch any wrong value.
    pass


class _Stream(torch.utils.data.Sampler):
    # Endless sample indices for one rank, from global micro-batch `start` on: micro-batch m of rank r
    # holds indices (m·world + r)·B … + B − 1. The stream is a function of the step alone, so a resumed
    # run reads exactly the samples the uninterrupted run would have.

    def __init__(self, start, rank, world, batch):
        self.start, self.rank, self.world, self.batch = start, rank, world, batch

    def __iter__(self):
        for m in itertools.count(self.start):
            base = (m * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)


class Env(NamedTuple):
    rank: int
    world: int
    device: torch.device
    ddp: bool
    ctx: object                  # autocast on CUDA, nullcontext on CPU

    @property
    def master(self):
        return self.rank == 0


# --- command line


class _Parser(argparse.ArgumentParser):
    # every command line of this project: no prefix abbreviations (--l is not --lr), errors as UsageError
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):    # argparse would print the whole usage first: one line instead
        raise UsageError(f"{message} (see --help)")


def run_main(prog, main, argv=None):
    """The error handler of every command line here: a user's mistake (UsageError, or data without a
    readable sample) is `prog: error: message`, one line on stderr, and exit 2; never a traceback."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (UsageError, NoSamples) as e:
        print(f"{prog}: error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        sys.exit(2)


@contextmanager
def reading(what):
    """Reading a file or directory the user named (`what`: the flag and its value): a missing,
    truncated, foreign or mistyped one becomes a UsageError naming it, one line."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError, KeyError) as e:
        msg = " ".join(str(e).split("\n")) or type(e).__name__
        raise UsageError(f"{what}: {'no ' + msg if isinstance(e, KeyError) else msg}") from None


def model_dir(flag, path, hint=""):
    """A directory flag: a path that is not there is refused in one line; a hub id (org/name) gets a
    hint, since everything here reads local directories."""
    if not os.path.isdir(path):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
            hint = (f" (a Hugging Face hub id? download it first: huggingface-cli download {path} "
                    f"--local-dir DIR, then {flag} DIR)")
        raise UsageError(f"{flag} {path}: no such directory{hint}")
    return path


def writable_dir(flag, path):
    """An output directory, made if needed and written to once, before any work it would be lost to."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: not a writable directory ({e.strerror or e})") from None
    return path


def check_device(flag, name):
    """"auto", "cpu", "cuda" or "cuda:N" of a CUDA device present -> name; anything else one line."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name!r}: this code runs on cpu or cuda")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"{flag} {name!r}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return name


def check_training(cfg, at_least_1=(), at_least_0=(), fractions=()):
    """The settings both stages' TrainConfigs share (the schedule, AdamW, batch, checkpoints, device,
    dtype), then the stage's own numbers: check_numbers."""
    check_numbers(cfg, ("max_steps", "batch_size", "grad_accum", "log_every", "ckpt_every", *at_least_1),
                  ("lr", "min_lr", "warmup", "decay_steps", "weight_decay", "grad_clip", "workers", *at_least_0),
                  fractions)
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise UsageError(f"--betas takes two numbers in [0, 1), got {cfg.betas}")
    check_device("--device", cfg.device)
    if cfg.dtype not in ("bfloat16", "float32"):  # fp16 would need a GradScaler
        raise UsageError(f"--dtype {cfg.dtype!r}: choose from 'bfloat16', 'float32'")


def check_numbers(cfg, at_least_1=(), at_least_0=(), fractions=()):
    """Numeric settings of a config dataclass: every float finite (nan/inf refused), counts and
    intervals ≥ 1, the others named ≥ 0, fractions in [0, 1]; UsageError naming the flag."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise UsageError(f"--{f.name} {value}: must be a finite number")
    for name in at_least_1:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in at_least_0:
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) <= 1:
            raise UsageError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_floats(s):
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _flag_type(tp):
    # an annotation -> the type of its flag: X | None (Optional[X]) also takes "none", bool takes
    # true/false (yes/no, on/off, 1/0), tuple comma-separated numbers
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = _flag_type(next(a for a in typing.get_args(tp) if a is not type(None)))
        parse = lambda s: None if s.lower() == "none" else inner(s)  # noqa: E731
        parse.__name__ = getattr(inner, "__name__", "value")  # argparse: "invalid int value: 'x'"
        return parse
    return {bool: _parse_bool, tuple: _parse_floats}.get(tp, tp)


def add_flags(p, cls, names=None, helptext=None):
    """One `--name value` flag per field of the config dataclass cls (or the fields in names), typed
    from its annotation: the flags come from the one source of defaults (STYLE.md #4). A bool flag
    alone means true (`--compile`); `--compile false` also works."""
    for f in fields(cls):
        if names is None or f.name in names:
            flag = f.type is bool
            p.add_argument(f"--{f.name}", type=_flag_type(f.type), nargs="?" if flag else None,
                           const=True if flag else None, metavar="A,B" if f.type is tuple else None,
                           help=helptext or f"default {f.default!r}")


def parse_args(argv):
    """Command line -> TrainConfig: the preset's values (or the defaults), then the flags given.
    One flag per TrainConfig field, typed from its annotation; unknown flags are errors."""
    p = _Parser(prog="tokenizer.py", argument_default=argparse.SUPPRESS,
                description="DualToken stage 1: train / evaluate the tokenizer, or the shapes teacher.")
    p.add_argument("--preset", help=f"start from a named configuration: {', '.join(TRAIN_PRESETS)}")
    add_flags(p, TrainConfig)
    args = vars(p.parse_args(argv))
    name = args.pop("preset", None)
    if name is not None and name not in TRAIN_PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(TRAIN_PRESETS)}")
    cfg = replace(TRAIN_PRESETS[name] if name else TrainConfig(), **args)
    return check_config(cfg)


def check_config(cfg):
    """Checks the values and resolves the ablation into the switches it stands for."""
    for name, value, allowed in (("stage", cfg.stage, STAGES), ("ablation", cfg.ablation, ABLATIONS),
                                 ("model", cfg.model, tuple(TOKENIZER_PRESETS)),
                                 ("disc_norm", cfg.disc_norm, ("batch", "act"))):
        if value not in allowed:
            raise UsageError(f"--{name} {value!r}: choose from {', '.join(map(repr, allowed))}")
    check_training(cfg, at_least_1=("eval_every", "eval_n"),
                   at_least_0=("disc_start", "hard_negatives", "partial_captions", "sem_weight", "sem_layer_weight",
                               "sem_pool_weight", "commit_weight", "mse_weight", "lpips_weight", "gan_weight"))
    if cfg.eval and cfg.stage == "teacher":  # would otherwise retrain and overwrite the teacher
        raise UsageError("--eval evaluates a tokenizer checkpoint; the teacher stage reports its own zero-shot")
    if cfg.ablation == "joint":
        # Table 3(b): reconstruction and semantics through one codebook at the semantic layer, no
        # shallow shortcut (TokenizerConfig.joint)
        sem = cfg.sem_layer if cfg.sem_layer is not None else TOKENIZER_PRESETS[cfg.model].sem_layer
        if cfg.rec_layer not in (None, sem) or cfg.shortcut_weight not in (None, 0.0):
            raise UsageError("--ablation joint sets rec_layer = sem_layer and shortcut_weight = 0; "
                             "drop --rec_layer / --shortcut_weight")
        cfg = replace(cfg, rec_layer=sem, shortcut_weight=0.0)
    elif cfg.ablation == "recon_only":
        # Table 3(c): no semantic objective at all
        if cfg.sem_weight not in (0.0, TrainConfig.sem_weight):
            raise UsageError("--ablation recon_only sets sem_weight = 0; drop --sem_weight")
        cfg = replace(cfg, sem_weight=0.0)
    return cfg


def tokenizer_config(cfg, siglip_config):
    """The model preset around the checkpoint's backbone, with the ablation switches applied."""
    c = replace(TOKENIZER_PRESETS[cfg.model], siglip=siglip_config)
    c = replace(c, **{k: getattr(cfg, k) for k in ("rec_layer", "sem_layer", "shortcut_weight", "codebook_size")
                      if getattr(cfg, k) is not None}, joint=cfg.ablation == "joint")
    try:  # DualTokenizer checks the taps against the backbone; on meta that costs no memory
        check_fits(build_on_meta(DualTokenizer, c, "the tokenizer config"), cfg.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return c


def _is_siglip_dir(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def check_inputs(cfg):
    """Every path the run will read, checked before any work starts."""
    evaluating = cfg.eval or cfg.stage == "eval"
    if cfg.stage == "teacher":
        if cfg.data != "shapes":
            raise UsageError("--stage teacher pretrains the micro-SigLIP of the shapes demo (--data shapes); "
                             "at full scale pass a pretrained SigLIP directory with --siglip")
        if cfg.resume:
            resume_dir(cfg.out_dir)  # one line when there is none, or it is mixed or half-written
        if cfg.hard_negatives < 0:
            raise UsageError("--hard_negatives must be 0 or more")
        if cfg.batch_size < 2:
            raise UsageError("--stage teacher needs --batch_size ≥ 2: the sigmoid loss needs negatives")
        return
    if cfg.siglip and not _is_siglip_dir(cfg.siglip):
        hint = " (make it first: python tokenizer.py --preset shapes-teacher)" if cfg.data == "shapes" else ""
        model_dir("--siglip", cfg.siglip, hint)
        raise UsageError(f"--siglip {cfg.siglip}: not a SigLIP directory (no config.json){hint}")
    if cfg.siglip:
        with reading(f"--siglip {cfg.siglip}"):  # the wrong kind of directory (a tokenizer's, an LLM's) in one line
            SigLIP.read_config(cfg.siglip)
    if cfg.lpips and not os.path.isfile(cfg.lpips):
        raise UsageError(f"--lpips {cfg.lpips}: no such file (make it with: python losses.py convert-lpips ...)")
    if cfg.eval_data and not os.path.isdir(cfg.eval_data):
        raise UsageError(f"--eval_data {cfg.eval_data}: no such directory")
    if evaluating:
        if not os.path.isfile(os.path.join(cfg.out_dir, "config.json")):
            raise UsageError(f"--eval: no tokenizer checkpoint in --out_dir {cfg.out_dir}")
        if cfg.data != "shapes" and not cfg.eval_data:
            raise UsageError("--eval on real data needs --eval_data DIR (class folders, ImageNet val layout)")
        return
    if not cfg.siglip:
        raise UsageError("--siglip DIR is required: the SigLIP to start from and keep as the teacher")
    if not cfg.data:
        raise UsageError("--data is required: 'shapes' or webdataset shards ('cc12m/{00000..02175}.tar')")
    if cfg.data != "shapes":
        urls = expand_urls(cfg.data)
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise UsageError(f"--data: {len(missing)} of {len(urls)} shards missing, e.g. {missing[0]}"
                             + shard_hint(missing[0]))
    if cfg.decoder_only and not (cfg.init or cfg.resume):
        raise UsageError("--decoder_only trains a decoder on the codes of a trained tokenizer: give it with --init DIR")
    if cfg.init and not cfg.resume:
        model_dir("--init", cfg.init)
        if not os.path.isfile(os.path.join(cfg.init, "config.json")):
            raise UsageError(f"--init {cfg.init}: not a tokenizer checkpoint (no config.json)")
    if cfg.resume:
        resume_dir(cfg.out_dir)


# --- setup, schedule, data, text (setup, lr_at and make_optimizer serve stage 2 too)


def setup(cfg):
    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python tokenizer.py` is one process
    ddp = "RANK" in os.environ
    rank, local, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        name = f"cuda:{local}"
        torch.cuda.set_device(name)
    device = torch.device(name)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = world if ddp else 1
    use_amp = device.type == "cuda" and cfg.dtype != "float32"
    ctx = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if use_amp else nullcontext()
    return Env(rank, world, device, ddp, ctx)


def lr_at(cfg, step):
    # open_clip cosine_lr: linear warmup to lr over `warmup` steps, then a half cosine down to min_lr
    # at decay_steps (default max_steps; set it longer to cut a run into pieces on one schedule)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    total = cfg.decay_steps or cfg.max_steps
    t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, fused=False):
    # official (open_clip main.py; nanoGPT does the same): AdamW, no weight decay on biases, norms and
    # gains (tensors under 2-D); frozen parameters left out
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def train_loader(cfg, env, size, resample, start):
    """-> (dataset, endless iterator of this rank's micro-batches, from global micro-batch `start`)."""
    # A DataLoader iterator draws its workers' base seed from the global RNG unless it has a generator
    # of its own: that draw would make a resumed run's RNG stream differ from the uninterrupted one.
    gen = torch.Generator().manual_seed(cfg.seed + env.rank + start)
    if cfg.data == "shapes":
        if size != SHAPES_RES:
            raise UsageError(f"--data shapes renders {SHAPES_RES}×{SHAPES_RES} images; this model takes {size}")
        ds = ShapesDataset(2 ** 62, seed=cfg.seed)  # fresh samples, no epochs
        sampler = _Stream(start, env.rank, env.world, cfg.batch_size)
        loader = torch.utils.data.DataLoader(ds, cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                             generator=gen)
    else:
        # Shards are split over ranks and workers inside WebDataset. A resumed run cannot seek into a
        # stream of tar files, so it reshuffles with a seed that includes the step instead.
        ds = WebDataset(cfg.data, size, resample, seed=cfg.seed + start, rank=env.rank,
                        world_size=env.world, repeat=True)
        ds.check()  # NoSamples in seconds when --data holds nothing readable, before any worker starts
        loader = torch.utils.data.DataLoader(ds, cfg.batch_size, num_workers=cfg.workers, drop_last=True,
                                             generator=gen)
    return ds, iter(loader)


def text_encoder(cfg, text_len):
    """-> encode(list of str) -> ids (B, text_len) long, padded as SigLIP is trained: to a fixed length
    (HF processor padding="max_length"), because the text tower pools the last position."""
    name = cfg.text_tokenizer or cfg.siglip
    if name == "words":
        # the shapes teacher's text: one id per word of the benchmark's vocabulary (data.shapes_vocabulary),
        # 0 = padding, the last id = any other word. Short sequences make the last position, which SigLIP
        # pools, cheap to reach (EXPERIMENTS.md, "The semantic teacher").
        vocab = {w: i + 1 for i, w in enumerate(shapes_vocabulary())}

        def encode(texts):
            rows = [[vocab.get(w, len(vocab) + 1) for w in shapes_words(t)][:text_len] for t in texts]
            return torch.tensor([r + [0] * (text_len - len(r)) for r in rows], dtype=torch.long)
        return encode
    if name == "bytes":
        enc = load_text_tokenizer("bytes")
        pad = enc.encode_single_token("<|endoftext|>")  # 256

        def encode(texts):
            rows = [enc.encode(t, disallowed_special=())[:text_len] for t in texts]
            return torch.tensor([r + [pad] * (text_len - len(r)) for r in rows], dtype=torch.long)
        return encode
    # Real SigLIPs use SentencePiece (v1) / Gemma (v2) vocabularies, which data.load_text_tokenizer
    # (byte-level BPE) does not read: transformers' tokenizer is an optional dependency here.
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
    except ImportError:
        raise UsageError("zero-shot on real data reads the SigLIP's text tokenizer with transformers: "
                         "pip install transformers sentencepiece") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--text_tokenizer {name}: {str(e).splitlines()[0]}") from None

    def encode(texts):
        out = tok(texts, padding="max_length", max_length=text_len, truncation=True)
        return torch.tensor(out["input_ids"], dtype=torch.long)
    return encode


# --- zero-shot classification through the text tower




def shapes_prompts(attr):
    # One prompt ensemble per class (CLIP, Radford et al. 2021 §3.1.4) written in the benchmark's own
    # caption grammar. Per class, 18 captions in which every value of every other attribute appears
    # equally often (18 = lcm of their counts 2, 3, 6, 9), so averaging cancels them out, provided the
    # text embedding adds attribute directions (what the teacher's partial captions train for).
    # -> [classes][18 prompts]
    rest = [k for k in SHAPES_ATTRS if k != attr]
    n = math.lcm(*(len(SHAPES_ATTRS[k]) for k in rest))
    return [[shapes_caption({attr: v, **{k: SHAPES_ATTRS[k][i % len(SHAPES_ATTRS[k])] for k in rest}})
             for i in range(n)] for v in SHAPES_ATTRS[attr]]


@torch.no_grad()
def text_classifier(siglip, encode, prompts, device):
    # -> (classes, D): per class the normalized mean of its normalized prompt embeddings
    rows = []
    for class_prompts in prompts:
        e = F.normalize(siglip.encode_text(encode(class_prompts).to(device)).float(), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def caption_classifier(siglip, encode, device):
    # The shapes world's other zero-shot reading: each image against all 972 captions of the world, the
    # best one's attributes. -> (normalized caption embeddings (972, D), {attr: (972,) class of each row})
    combos = [dict(zip(SHAPES_ATTRS, v)) for v in itertools.product(*SHAPES_ATTRS.values())]
    emb = F.normalize(siglip.encode_text(encode([shapes_caption(c) for c in combos]).to(device)).float(), dim=-1)
    return emb, {a: torch.tensor([v.index(c[a]) for c in combos], device=device) for a, v in SHAPES_ATTRS.items()}


def zero_shot_tasks(cfg, siglip, encode, dataset, device):
    """-> {task: (classifier (classes, D), labels(batch) -> (B,) long, by_caption)}. On shapes: every
    attribute (shape, color, size, where, background), by_caption = (caption embeddings (972, D), class
    of each caption (972,)); on a class-folder set: its classes with cfg.prompt, by_caption None.
    SigLIP's logits are an increasing function of the cosine (scale > 0): top-1 over cosines is top-1
    over logits."""
    if isinstance(dataset, ShapesDataset):
        def labels(attr):
            return lambda b: torch.tensor([SHAPES_ATTRS[attr].index(parse_shapes_caption(c)[attr])
                                           for c in b["caption"]])
        emb, classes = caption_classifier(siglip, encode, device)
        return {a: (text_classifier(siglip, encode, shapes_prompts(a), device), labels(a), (emb, classes[a]))
                for a in SHAPES_ATTRS}
    names = dataset.dataset.class_names if isinstance(dataset, torch.utils.data.Subset) else dataset.class_names
    prompts = [[cfg.prompt.format(n)] for n in names]
    return {"top-1": (text_classifier(siglip, encode, prompts, device), lambda b: b["label"], None)}


def zero_shot_predict(emb, classifier, by_caption=None):
    # image embeddings (B, D) -> (B,) class by the prompt ensemble, or (by_caption) the best caption's class
    emb = F.normalize(emb.float(), dim=-1)
    if by_caption is None:
        return (emb @ classifier.t()).argmax(-1)
    captions, classes = by_caption
    return classes[(emb @ captions.t()).argmax(-1)]


def eval_dataset(cfg, size, resample):
    # shapes: eval_n unseen samples (another seed than the training stream); real: eval_n images
    # spread evenly over the class folders (ImageNet val is sorted by class)
    if not cfg.eval_data:
        return ShapesDataset(cfg.eval_n, seed=cfg.seed + 1)
    ds = ClassFolderDataset(cfg.eval_data, size, resample, class_names=cfg.class_names or None)
    if len(ds) > cfg.eval_n:
        ds = torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, cfg.eval_n).round().astype(int).tolist())
    return ds


def save_grid(x, recon, path, n=8):
    # originals above their reconstructions: one (3, 2·S, n·S) image
    x, recon = x[:n].float().cpu(), recon[:n].float().cpu()
    to_pil(torch.cat([torch.cat(list(x), dim=2), torch.cat(list(recon), dim=2)], dim=1)).save(path)


@torch.no_grad()
def evaluate(model, teacher, dataset, tasks, env, cfg, lpips=None, png_dir=None, grid=None):
    """Reconstruction (PSNR, SSIM on [0, 1]; LPIPS), both codebooks' usage and perplexity, semantic
    cosine to the teacher and zero-shot top-1 of tokenizer and teacher. -> dict of figures."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, num_workers=min(cfg.workers, 4),
                                         generator=torch.Generator())  # leaves the training RNG alone
    sums = {k: 0.0 for k in ("psnr", "ssim", "lpips", "cos_layer", "cos_pool")}
    correct = {f"{t}/{who}{how}": 0 for t in tasks for who in ("tokenizer", "teacher")
               for how in ("", "_by_caption")[:1 + (tasks[t][2] is not None)]}
    counts = {"pix": 0, "sem": 0}  # code histograms: ImageNet val's 50k × 729 × 8 codes do not fit a list
    read = {}  # shapes: the strict reader's verdicts on the reconstructions, summed over images
    n = 0
    for batch in loader:
        x = batch["image"].to(env.device)
        with env.ctx:
            out = model(x)
            f0, p0 = model.teacher_targets(teacher, x) if teacher is not None else (None, None)
        recon = out.recon.float().clamp(-1, 1)
        a, b = (recon + 1) / 2, (x + 1) / 2
        sums["psnr"] += psnr(a, b).sum().item()
        sums["ssim"] += ssim(a, b).sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(recon, x).sum().item()
        for branch, codes in (("pix", out.pix_codes), ("sem", out.sem_codes)):
            counts[branch] = counts[branch] + torch.bincount(codes.flatten(), minlength=model.sem_rvq.codebook_size)
        for t, (classifier, labels, by_caption) in tasks.items():
            y = labels(batch).to(env.device)
            for who, emb in (("tokenizer", out.pooled), ("teacher", p0)):
                if emb is None:
                    continue
                correct[f"{t}/{who}"] += (zero_shot_predict(emb, classifier) == y).sum().item()
                if by_caption is not None:
                    correct[f"{t}/{who}_by_caption"] += (zero_shot_predict(emb, None, by_caption) == y).sum().item()
        if teacher is not None:
            sums["cos_layer"] += F.cosine_similarity(out.sem.float(), f0.float(), dim=-1).mean(1).sum().item()
            sums["cos_pool"] += F.cosine_similarity(out.pooled.float(), p0.float(), dim=-1).sum().item()
        if isinstance(dataset, ShapesDataset):
            acc = read_back_accuracy([parse_shapes_caption(c) for c in batch["caption"]], recon.cpu())
            read = {k: read.get(k, 0.0) + v * x.shape[0] for k, v in acc.items()}
        if grid is not None and n == 0:
            save_grid(x, recon, grid)
        if png_dir is not None:  # real and reconstructed images side by side for clean-fid
            for i in range(x.shape[0]):
                to_pil(x[i]).save(os.path.join(png_dir, "real", f"{n + i:05d}.png"))
                to_pil(recon[i]).save(os.path.join(png_dir, "recon", f"{n + i:05d}.png"))
        n += x.shape[0]
    model.train(was_training)
    res = {k: v / n for k, v in sums.items()}
    res.update({k: v / n for k, v in correct.items()})
    res.update({f"read/{k}": v / n for k, v in read.items()})
    res["n"] = n
    for branch in ("pix", "sem"):
        # rvq.codebook_usage from the histogram: fraction of entries used, exp(entropy)
        p = counts[branch].double() / counts[branch].sum()
        res[f"{branch}_used"] = (counts[branch] > 0).double().mean().item()
        res[f"{branch}_ppl"] = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()
    return res


def format_results(res, model, teacher, lpips, title):
    c = model.config
    lines = [f"==== {title}: {res['n']} images ====",
             f"reconstruction   PSNR {res['psnr']:.2f} dB   SSIM {res['ssim']:.4f}   " +
             (f"LPIPS {res['lpips']:.4f}" if lpips is not None else "LPIPS off (no --lpips weights)")]
    for branch, name in (("pix", "pixel codes"), ("sem", "semantic codes")):
        lines.append(f"{name:<16} used {100 * res[f'{branch}_used']:.1f}% of {c.codebook_size}   "
                     f"perplexity {res[f'{branch}_ppl']:.1f}")
    if "read/all" in res:
        lines.append(f"reconstructions read right (data.read_shapes)   all five {100 * res['read/all']:.1f}%   " +
                     "   ".join(f"{a} {100 * res[f'read/{a}']:.1f}%" for a in SHAPES_ATTRS))
    if teacher is not None:
        lines.append(f"semantic cosine to the teacher   layer {c.sem_layer}: {res['cos_layer']:.4f}   "
                     f"pooled: {res['cos_pool']:.4f}")
    for key in res:
        if key.endswith("/tokenizer"):
            task = key.split("/")[0]
            ref = f"   teacher {100 * res[f'{task}/teacher']:.1f}%" if teacher is not None else ""
            if f"{task}/tokenizer_by_caption" in res:  # shapes: the best of the world's 972 captions too
                ref += f"   (best caption: tokenizer {100 * res[f'{task}/tokenizer_by_caption']:.1f}%" + (
                    f"   teacher {100 * res[f'{task}/teacher_by_caption']:.1f}%)" if teacher is not None else ")")
            lines.append(f"zero-shot {task:<10} tokenizer {100 * res[key]:.1f}%{ref}")
    return "\n".join(lines)


# --- checkpoints


@torch.no_grad()
def tensor_digest(tensors):
    # (tensors,) int64: the first 8 bytes of SHA-256 over each tensor's dtype, shape and raw bytes.
    # Exact bits, not sums: a one-ulp drift or two swapped elements (equal sums) must show.
    out = []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
        out.append(int.from_bytes(h.digest()[:8], "little", signed=True))
    return torch.tensor(out, dtype=torch.int64)


def synced_tensors(model, disc=None):
    # what must be equal on every rank: the model's parameters and floating buffers (stage 1's EMA
    # codebooks, stage 2's frozen ones) and the discriminator's parameters (its BatchNorm running
    # statistics are per rank, as in taming, and unused: the discriminator always runs in training mode)
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point()),
            *(disc.parameters() if disc is not None else ())]


def check_ranks_in_sync(env, tensors):
    """All ranks must hold bit-identical weights and codebooks: DDP keeps the parameters equal, rvq.py's
    all-reduce the EMA codebooks. Raises when they diverged; returns the number of tensors compared."""
    d = tensor_digest(tensors)
    if env.ddp:
        d = d.to(env.device)  # NCCL gathers device tensors only
        gathered = [torch.empty_like(d) for _ in range(env.world)]
        dist.all_gather(gathered, d)
        bad = sorted({i for g in gathered for i in (g != d).nonzero().flatten().tolist()})
        if bad:
            raise RuntimeError(f"ranks diverged: {len(bad)} of {len(d)} parameters or codebooks differ "
                               f"between processes (first: tensor {bad[0]})")
    return d.shape[0]


# On disk, both stages. A checkpoint is a directory `step-NNNNNN/` that exists whole or not at all:
# its files are written into a temporary sibling `.step-NNNNNN.tmp-*/`, manifest.json (the step, each
# file's size and SHA-256) last, every file and the directory are fsynced, and one rename(2) puts it
# in place. A kill at any moment leaves the earlier checkpoints untouched and at most a `.tmp-`
# directory, which nothing reads and the next save removes. `--resume` takes the newest step-N/ and
# checks it against its manifest: a missing, truncated or foreign file (a mixed or half-written
# checkpoint) is refused in one line. unified.py keeps every step-N/ in its out_dir. tokenizer.py
# keeps one: out_dir/checkpoint is a symlink to the newest step-N/, swapped atomically (a new link
# renamed over it), and out_dir/{config.json, model.safetensors, train_state.pt, ...} are symlinks
# through it, so out_dir stays the model directory that --siglip, unified.py --tokenizer and
# sample.py read; the step-N/ it no longer points to is deleted after the swap.
MANIFEST, MANIFEST_FORMAT = "manifest.json", "dualtoken-checkpoint/1"
_STEP_DIR = re.compile(r"step-(\d+)")
_STALE = re.compile(r"\.step-\d+\.(tmp|old)-")  # leftovers of an interrupted save


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a directory too: its fsync makes the renames inside it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _test_kill(name, point):
    # Test-only fault injection (tests/test_faults.py): DUALTOKEN_TEST_KILL="step-000004/model" kills
    # this process with SIGKILL at that point of that checkpoint's write, as a crash or kill -9 would.
    if os.environ.get("DUALTOKEN_TEST_KILL") == f"{name}/{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(parent, step, parts):
    """parts: [(name, write(tmp_dir))], called in order into a fresh temporary directory, which is
    then completed with manifest.json, fsynced and renamed to parent/step-NNNNNN -> that path."""
    name = f"step-{step:06d}"
    final = os.path.join(parent, name)
    os.makedirs(parent, exist_ok=True)
    for f in os.listdir(parent):
        if _STALE.match(f):
            shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    for part, write in parts:
        write(tmp)
        _test_kill(name, part)
    files = {f: {"size": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))}
             for f in _files_under(tmp)}  # one read of what was just written, from the page cache
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "files": files}, f, indent=1)
    for d, _, fs in os.walk(tmp):
        for f in fs:
            _fsync(os.path.join(d, f))
        _fsync(d)
    _test_kill(name, "manifest")
    old = None
    if os.path.lexists(final):  # the same step written again (a new run in an old out_dir): swap
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(parent)
    if old:
        shutil.rmtree(old)
    _test_kill(name, "renamed")
    return final


def verify_checkpoint(path):
    """A step-N/ directory against its manifest -> its step; UsageError naming the first difference."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            m = json.load(f)
        assert m["format"] == MANIFEST_FORMAT and isinstance(m["files"], dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UsageError(f"--resume: {path} has no readable {MANIFEST} (not a complete checkpoint)") from None
    for f, want in m["files"].items():
        p = os.path.join(path, f)
        if not os.path.isfile(p):
            raise UsageError(f"--resume: {path} is half-written or damaged: {f} is missing")
        if os.path.getsize(p) != want["size"]:
            raise UsageError(f"--resume: {path} is half-written or damaged: {f} has {os.path.getsize(p)} "
                             f"bytes, {want['size']} were written")
        if _sha256(p) != want["sha256"]:
            raise UsageError(f"--resume: {path} is mixed or damaged: {f} is not the file written at "
                             f"step {m['step']} (SHA-256 differs)")
    return m["step"]


def latest_checkpoint(out_dir, verify=True):
    """The newest step-N/ in out_dir (by N) -> its path, verified against its manifest; None if none."""
    steps = sorted((int(m.group(1)), f) for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else ())
                   if (m := _STEP_DIR.fullmatch(f)) and os.path.isdir(os.path.join(out_dir, f)))
    if not steps:
        return None
    path = os.path.join(out_dir, steps[-1][1])
    if verify:
        verify_checkpoint(path)
    return path


def _symlink(target, link):
    # atomic: a new link renamed over the old one (rename(2) never follows a link)
    tmp = f"{link}.new-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def save_in_out_dir(out_dir, step, parts):
    """tokenizer.py's layout (the comment above): the new step-N/, then the pointer swap."""
    path = write_checkpoint(out_dir, step, parts)
    publish(out_dir, path)
    return path


def publish(out_dir, path):
    """Points out_dir/checkpoint (and the links through it) at step-N/ `path`, then deletes the
    others. Also run on --resume: a kill after the rename but before the swap leaves it undone."""
    name = os.path.basename(path)
    _symlink(name, os.path.join(out_dir, "checkpoint"))
    for f in os.listdir(path):  # made once (or over the plain files of an older out_dir)
        link = os.path.join(out_dir, f)
        if f != MANIFEST and not (os.path.islink(link) and os.readlink(link) == os.path.join("checkpoint", f)):
            _symlink(os.path.join("checkpoint", f), link)
    _fsync(out_dir)
    for f in os.listdir(out_dir):
        if _STEP_DIR.fullmatch(f) and f != name:
            shutil.rmtree(os.path.join(out_dir, f))


def resume_dir(out_dir):
    """--resume for tokenizer.py: the directory to load the model and train_state.pt from."""
    path = latest_checkpoint(out_dir)
    if path is not None:
        return path
    if os.path.isdir(os.path.join(out_dir, ".checkpoint.tmp")):
        # the older file-by-file writer was interrupted: the files may come from two different steps
        raise UsageError(f"--resume: {out_dir} holds an interrupted checkpoint write (.checkpoint.tmp): "
                         "its files may be from different steps; not resuming")
    if os.path.isfile(os.path.join(out_dir, "train_state.pt")):
        return out_dir  # a complete checkpoint of the older layout (files directly in out_dir)
    raise UsageError(f"--resume: no checkpoint in --out_dir {out_dir}")


def read_train_state(path):
    """A train_state.pt -> dict, unpickling tensors and plain containers only (weights_only: a file is
    data, never code); a missing or damaged one is one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about a foreign pickle protocol before it fails
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and torch errors alike
        raise UsageError(f"{path}: not a readable train state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UsageError(f"{path}: not a train state (no step)")
    return state


def save_checkpoint(cfg, env, model, disc, opt, dopt, step):
    # Model: save_pretrained from the unwrapped, uncompiled module (no DDP/compile key prefixes).
    # Training state apart, in one torch file readable with weights_only=True: optimizers,
    # discriminator, step, and every rank's RNG state.
    rng = [torch.get_rng_state()]
    cuda_rng = [torch.cuda.get_rng_state(env.device)] if env.device.type == "cuda" else []
    if env.ddp:  # object collectives, so ranks may differ in RNG state size (none do today)
        everyone = [None] * env.world
        dist.all_gather_object(everyone, (rng[0], cuda_rng[0] if cuda_rng else None))
        rng = [r for r, _ in everyone]
        cuda_rng = [c for _, c in everyone] if cuda_rng else []
    n = check_ranks_in_sync(env, synced_tensors(model, disc))
    if env.master:
        state = {"format": TRAIN_STATE_FORMAT, "step": step, "config": asdict(cfg), "optimizer": opt.state_dict(),
                 "disc": disc.state_dict(), "disc_optimizer": dopt.state_dict(), "rng": rng, "cuda_rng": cuda_rng}
        save_in_out_dir(cfg.out_dir, step, [
            ("model", model.save_pretrained),
            ("train_state", lambda d: torch.save(state, os.path.join(d, "train_state.pt")))])
        tqdm.write(f"step {step}: checkpoint in {cfg.out_dir} ({env.world} rank(s) in sync over {n} tensors)")
    if env.ddp:
        dist.barrier()


def load_train_state(cfg, env, path, disc, opt, dopt):
    state = read_train_state(os.path.join(path, "train_state.pt"))
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise UsageError(f"{path}/train_state.pt is not a {TRAIN_STATE_FORMAT} file")
    opt.load_state_dict(state["optimizer"])
    disc.load_state_dict(state["disc"])
    dopt.load_state_dict(state["disc_optimizer"])
    if env.rank < len(state["rng"]):
        torch.set_rng_state(state["rng"][env.rank])
        if env.device.type == "cuda" and env.rank < len(state["cuda_rng"]):
            torch.cuda.set_rng_state(state["cuda_rng"][env.rank], env.device)
    else:  # more ranks than the run that saved: the new ranks start fresh streams
        torch.manual_seed(cfg.seed + env.rank + 1000 * state["step"])
    return state["step"]


def _freeze_untrained(model, cfg):
    # Parameters no loss reaches are frozen, so AdamW's weight decay leaves them alone and DDP needs
    # no find_unused_parameters. The text tower and logit scale/bias are never trained in stage 1
    # (official main.py freezes text_model and logit_*): zero-shot reads the text embeddings of the
    # original SigLIP. Without a semantic objective (Table 3(c)) only the pixel path trains.
    s = model.siglip
    for p in itertools.chain(s.text.parameters(), (s.logit_scale, s.logit_bias)):
        p.requires_grad_(False)
    if cfg.decoder_only:  # the codes' side (ViT, projections, codebooks) frozen; everything after the codes trains
        model.requires_grad_(False)
        for name in model.DECODER_PARTS:
            getattr(model, name).requires_grad_(True)
    elif cfg.sem_weight == 0:
        c = model.config
        last = max(c.rec_layer, c.shortcut_layer if model.pix_short is not None else 0)
        for m in (*s.vision.blocks[last:], s.vision.ln_post, s.vision.head, model.sem_pre, model.sem_post):
            m.requires_grad_(False)


class DecoderOnly(nn.Module):
    """--decoder_only's training pass: the frozen tokenizer's codes (no gradient; encode never moves a
    codebook) decoded as sample.py decodes generated codes, by the decoder that trains.
    images (B, 3, S, S) -> TokenizerOutput without semantics (sem, pooled None) and zero commitments."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images):
        t = self.tokenizer
        with torch.no_grad():
            pix_codes, sem_codes = t.encode(images)  # (B, h, w, depth) each
            zq = t.pix_quantizer.decode(pix_codes)   # (B, h, w, code_dim)
        zero = images.new_zeros(())
        return TokenizerOutput(t.decode_latent(zq), None, None, zero, zero, pix_codes, sem_codes)


def _same_config(model, mcfg, flag, path):
    if model.config != mcfg:
        diff = [k for k in asdict(mcfg) if asdict(mcfg)[k] != asdict(model.config)[k]]
        raise UsageError(f"{flag}: the checkpoint {path} has another model config ({', '.join(diff)})")


@torch.no_grad()
def _init_actnorm(disc, x, env):
    # ActNorm (taming) initializes from the first batch it sees: make that real images, at a fixed
    # step (so a resumed run does the same), and rank 0's on every rank
    disc(x)
    if env.ddp:
        for t in itertools.chain(disc.parameters(), disc.buffers()):
            dist.broadcast(t, 0)


def _all_reduce_grads(module, world):
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# --- the stages


def train_tokenizer(cfg, env):
    log = tqdm.write if env.master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # identical initialization on every rank
    with reading(f"--siglip {cfg.siglip}"):
        siglip = SigLIP.from_pretrained(cfg.siglip)
    teacher = copy.deepcopy(siglip).requires_grad_(False).eval().to(env.device)  # F_0 of eq. (4), frozen
    mcfg = tokenizer_config(cfg, siglip.config)
    ckpt = resume_dir(cfg.out_dir) if cfg.resume else None
    if cfg.resume:
        if env.master and ckpt != cfg.out_dir:
            publish(cfg.out_dir, ckpt)
        with reading(f"--resume {ckpt}"):
            model = DualTokenizer.from_pretrained(ckpt)
        _same_config(model, mcfg, "--resume", ckpt)
    elif cfg.init:
        with reading(f"--init {cfg.init}"):
            model = DualTokenizer.from_pretrained(cfg.init)
        _same_config(model, mcfg, "--init", cfg.init)
    else:
        model = DualTokenizer.from_siglip(siglip, mcfg)
    del siglip
    _freeze_untrained(model, cfg)
    model.grad_checkpointing = cfg.grad_checkpointing
    model.to(env.device).train()
    disc = PatchGAN(norm=cfg.disc_norm).to(env.device).train()
    with reading(f"--lpips {cfg.lpips}"):
        lpips = LPIPS.from_file(cfg.lpips).to(env.device) if cfg.lpips else None
    if lpips is not None:
        lpips.grad_checkpointing = cfg.grad_checkpointing
    fused = env.device.type == "cuda"
    opt = make_optimizer(model, cfg, fused)
    dopt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)  # official: Adam, no decay
    step = load_train_state(cfg, env, ckpt, disc, opt, dopt) if cfg.resume else 0
    if step >= cfg.max_steps:
        log(f"nothing to do: the checkpoint in {cfg.out_dir} is at step {step}, --max_steps {cfg.max_steps}")
        return
    if not cfg.resume:
        torch.manual_seed(cfg.seed + env.rank)
    c = model.config
    log(f"tokenizer {cfg.model}: {c.siglip.layers}-layer SigLIP from {cfg.siglip}, taps shortcut "
        f"{c.shortcut_layer}×{c.shortcut_weight} / reconstruction {c.rec_layer} / semantic {c.sem_layer}, "
        f"codes {c.siglip.grid}×{c.siglip.grid}×{c.depth} of {c.codebook_size}; "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable; "
        f"{env.world} process(es) on {env.device}" + (", bf16 autocast" if env.device.type == "cuda" else ""))
    if lpips is None:
        log("LPIPS off: no --lpips weights file (the loss and eval run without the perceptual term)")
    if cfg.decoder_only:
        log(f"decoder only: the codes of {cfg.init or 'the checkpoint'} stay as they are (ViT and codebooks frozen)")
    elif cfg.sem_weight == 0:
        log("semantic weight 0: reconstruction only (Table 3(c)); layers after the pixel taps are frozen")

    ds, batches = train_loader(cfg, env, c.siglip.image_size, c.siglip.resample, step * cfg.grad_accum)
    evaluating = cfg.data == "shapes" or bool(cfg.eval_data)
    if env.master and evaluating:
        eval_set = eval_dataset(cfg, c.siglip.image_size, c.siglip.resample)
        tasks = zero_shot_tasks(cfg, model.siglip, text_encoder(cfg, c.siglip.text_len), eval_set, env.device)

    fwd = DecoderOnly(model) if cfg.decoder_only else model
    fwd = torch.compile(fwd) if cfg.compile else fwd  # compile before the DDP wrap (nanoGPT)
    if env.ddp:
        # The RVQ codebooks are buffers that move by EMA in forward; rvq.py all-reduces the cluster
        # statistics and broadcasts restart vectors, so every rank computes the same update. DDP's
        # per-forward buffer broadcast from rank 0 would only hide a divergence (and cost a codebook
        # copy per step): it is turned off, and the buffers are synced once here instead (torch ≥ 2.13
        # names the switch forward_sync_buffers; broadcast_buffers=False also skips the sync at init).
        for b in model.buffers():
            dist.broadcast(b, 0)
        sync_kw = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        ids = [env.device.index] if env.device.type == "cuda" else None
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=ids, **sync_kw)
        # The discriminator is not DDP-wrapped: it runs three times a step (fake for G, then real and
        # fake for D, as taming does), more than DDP's one forward per backward allows. Its gradients
        # are averaged by hand and its parameters start from rank 0's.
        with torch.no_grad():  # an in-place copy into leaf parameters, not part of any graph
            for t in itertools.chain(disc.parameters(), disc.buffers()):
                dist.broadcast(t, 0)
        # 1×1 conv weight gradients come back from CPU kernels with other (equivalent) strides on
        # their size-1 dims; DDP copies them into its buckets and warns once per process.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    zero = torch.zeros((), device=env.device)
    last_layer = model.decoder.conv_out.weight  # the adaptive weight's "last layer" (official train.py)
    imgs_per_step = cfg.batch_size * cfg.grad_accum * env.world
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not env.master, dynamic_ncols=True, mininterval=2)
    t0, t_step = time.time(), step
    while step < cfg.max_steps:
        lr = lr_at(cfg, step)
        for opt_ in (opt, dopt):
            for g in opt_.param_groups:
                g["lr"] = lr
        gan = step >= cfg.disc_start and cfg.gan_weight > 0
        for micro in range(cfg.grad_accum):
            x = next(batches)["image"].to(env.device, non_blocking=True)  # (B, 3, S, S) in [-1, 1]
            last = micro == cfg.grad_accum - 1
            if gan and step == cfg.disc_start and micro == 0 and cfg.disc_norm == "act":
                _init_actnorm(disc, x, env)
            with (fwd.no_sync() if env.ddp and not last else nullcontext()), env.ctx:
                out = fwd(x)
                recon = out.recon.float()
                mse = F.mse_loss(recon, x)
                lp = lpips(recon, x).mean() if lpips is not None else zero
                sem = pool = zero
                if not cfg.decoder_only:
                    f0, p0 = model.teacher_targets(teacher, x)  # (B, N, D), (B, D)
                    sem = semantic_loss(out.sem.float(), f0.float(), cfg.sem_relative)
                    pool = semantic_loss(out.pooled.float(), p0.float(), cfg.sem_relative)
                # eq. (2): λ2·L_sem + λ3·(L_c1 + L_c2) + λ1·L_recon with eq. (3) for L_recon. Without a
                # semantic objective the semantic commitment goes too, else it alone would still pull
                # on the ViT (Table 3(c) trains the pixel path only).
                commit_sem = out.commit_sem if cfg.sem_weight > 0 else zero
                loss = (cfg.sem_weight * (cfg.sem_layer_weight * sem + cfg.sem_pool_weight * pool)
                        + cfg.commit_weight * (out.commit_pix + commit_sem)
                        + cfg.mse_weight * mse + cfg.lpips_weight * lp)
                g_loss = lam = d_loss = zero
                if gan:
                    disc.requires_grad_(False)  # G's loss must not reach D's gradients
                    g_loss = generator_loss(disc(out.recon))
                    disc.requires_grad_(True)
                    # official: λ on the unweighted MSE + LPIPS, clamped to [0.3, 10]
                    lam = adaptive_gan_weight(mse + cfg.lpips_weight * lp, g_loss, last_layer)
                    loss = loss + cfg.gan_weight * lam * g_loss
                (loss / cfg.grad_accum).backward()
                if gan:  # hinge loss on real vs. the same reconstructions, detached (official order)
                    d_loss = hinge_d_loss(disc(x), disc(out.recon.detach()))
                    (d_loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gan:
            if env.ddp:
                _all_reduce_grads(disc, env.world)
            dopt.step()
            dopt.zero_grad(set_to_none=True)
        step += 1
        pbar.update(1)

        if env.master and (step % cfg.log_every == 0 or step in (1, cfg.max_steps)):
            dt = time.time() - t0
            cos = cos_p = float("nan")  # --decoder_only: no semantics computed
            if not cfg.decoder_only:
                cos = F.cosine_similarity(out.sem.float(), f0.float(), dim=-1).mean().item()
                cos_p = F.cosine_similarity(out.pooled.float(), p0.float(), dim=-1).mean().item()
            up, us = model.pix_quantizer.usage(out.pix_codes), model.sem_rvq.usage(out.sem_codes)
            line = (f"step {step} | loss {loss.item():.4f} | mse {mse.item():.4f} "
                    f"lpips {lp.item() if lpips is not None else 'off'} | sem {sem.item():.4f} "
                    f"pool {pool.item():.4f} cos {cos:.4f}/{cos_p:.4f} | commit {out.commit_pix.item():.4f}/"
                    f"{out.commit_sem.item():.4f} | G {g_loss.item():.4f} λ {lam.item():.2f} D {d_loss.item():.4f} "
                    f"| pix used {up['used']:.3f} ppl {up['perplexity']:.1f} rst {up['restarted']} "
                    f"| sem used {us['used']:.3f} ppl {us['perplexity']:.1f} rst {us['restarted']} "
                    f"| lr {lr:.2e} | {imgs_per_step * (step - t_step) / dt:.1f} img/s")
            if cfg.data != "shapes":
                line += " | data " + " ".join(f"{k}={v}" for k, v in ds.stats.items() if v)
            log(line)
            t0, t_step = time.time(), step
        t_aside = time.time()  # checkpoints and evaluations are left out of img/s
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(cfg, env, model, disc, opt, dopt, step)
        if env.master and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            grid = os.path.join(cfg.out_dir, f"recon_step{step:07d}.png")
            if evaluating:
                res = evaluate(model, teacher, eval_set, tasks, env, cfg, lpips, grid=grid)
                log(format_results(res, model, teacher, lpips, f"eval at step {step}"))
            else:
                with torch.no_grad():
                    model.eval()
                    save_grid(x, model(x).recon.float().clamp(-1, 1), grid)
                    model.train()
            log(f"reconstruction grid: {grid}")
        if env.ddp and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            dist.barrier()  # the other ranks wait while rank 0 evaluates
        t0 += time.time() - t_aside
    pbar.close()


def teacher_batch(batch, cfg, encode, step, rank):
    """A shapes batch -> (images (B, 3, S, S), text ids (T, L), labels (T, B) in {+1, −1}): the B
    captions, then per image cfg.hard_negatives captions that differ in one attribute
    (data.shapes_hard_negatives) and cfg.partial_captions that name only some of its attributes
    (data.shapes_partial_captions), each drawn by a key of step and rank so a resumed run draws the
    same; repeated texts once. A text is a positive for every image of the batch it describes."""
    attrs = [parse_shapes_caption(c) for c in batch["caption"]]
    texts = list(attrs)
    for i, a in enumerate(attrs):
        key = f"{cfg.seed}:{step}:{rank}:{i}"
        texts += [parse_shapes_caption(c) for c in shapes_hard_negatives(a, cfg.hard_negatives, key=key)]
        texts += shapes_partial_captions(a, cfg.partial_captions, key=key)
    texts = list({shapes_caption(t): t for t in texts}.items())  # caption -> attributes, first seen first
    labels = torch.tensor([[all(a[k] == v for k, v in t.items()) for a in attrs] for _, t in texts])
    return batch["image"], encode([c for c, _ in texts]), 2.0 * labels.float() - 1


def train_teacher(cfg, env):
    """The shapes demo's semantic teacher: the `shapes` micro-SigLIP trained from scratch on the
    benchmark's images and captions with the sigmoid loss, saved with SigLIP.save_pretrained so the
    tokenizer stage loads it exactly as it loads a pretrained SigLIP at full scale. Resumable."""
    log = tqdm.write if env.master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    scfg = TOKENIZER_PRESETS[cfg.model].siglip
    model = SigLIP(scfg).to(env.device).train()
    # SigLIP starts the bias at b = −10 so that training starts near the prior (Zhai et al. 2023):
    # at their 32k batch a pair is positive with odds 1 : 32767, log ≈ −10.4. Each rank here scores
    # its own B images against ~B·(1 + hard_negatives + partial_captions) texts; start at that prior
    # instead, or the cheapest first move is to collapse every embedding onto one direction.
    with torch.no_grad():
        model.logit_bias.fill_(-math.log(cfg.batch_size * (1 + cfg.hard_negatives + cfg.partial_captions) - 1))
    encode = text_encoder(cfg, scfg.text_len)
    opt = make_optimizer(model, cfg, env.device.type == "cuda")
    start = 0
    if cfg.resume:
        ckpt = resume_dir(cfg.out_dir)
        if env.master and ckpt != cfg.out_dir:
            publish(cfg.out_dir, ckpt)
        with reading(f"--resume {ckpt}"):
            model.load_state_dict(SigLIP.from_pretrained(ckpt).state_dict())
        state = read_train_state(os.path.join(ckpt, "train_state.pt"))
        if state.get("format") != TRAIN_STATE_FORMAT or state.get("stage") != "teacher":
            raise UsageError(f"{ckpt}/train_state.pt is not a teacher {TRAIN_STATE_FORMAT} file")
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    fwd = torch.compile(model) if cfg.compile else model
    if env.ddp:
        # Each rank computes the sigmoid loss over its own batch (its own negatives). SigLIP's
        # chunked variant would also pass text embeddings between ranks; this small world needs no more.
        ids = [env.device.index] if env.device.type == "cuda" else None
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=ids)
    _, batches = train_loader(cfg, env, scfg.image_size, scfg.resample, start * cfg.grad_accum)
    if env.master:
        eval_sets = {"train split, unseen seed": eval_dataset(cfg, scfg.image_size, scfg.resample),
                     "held-out combinations": ShapesDataset(cfg.eval_n, seed=cfg.seed + 1, split="heldout")}
    log(f"teacher: micro-SigLIP {scfg.layers}+{scfg.text_layers} layers, width {scfg.width}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; captions as {cfg.text_tokenizer} "
        f"padded to {scfg.text_len}, {cfg.hard_negatives} one-attribute negatives and {cfg.partial_captions} partial "
        f"captions per image; "
        f"{env.world} process(es) on {env.device}" + (f"; resumed at step {start}" if start else ""))
    imgs_per_step = cfg.batch_size * cfg.grad_accum * env.world
    t0, t_step = time.time(), start
    for step in tqdm(range(start + 1, cfg.max_steps + 1), disable=not env.master, dynamic_ncols=True,
                     mininterval=2, initial=start, total=cfg.max_steps):
        lr = lr_at(cfg, step - 1)
        for g in opt.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, ids_, labels = teacher_batch(next(batches), cfg, encode, step * cfg.grad_accum + micro, env.rank)
            last = micro == cfg.grad_accum - 1
            with (fwd.no_sync() if env.ddp and not last else nullcontext()), env.ctx:
                _, loss = fwd(x.to(env.device), ids_.to(env.device), labels.to(env.device))
                (loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if env.master and (step % cfg.log_every == 0 or step in (1, cfg.max_steps)):
            dt = time.time() - t0
            log(f"step {step} | sigmoid loss {loss.item():.4f} | t {model.logit_scale.exp().item():.2f} "
                f"b {model.logit_bias.item():.2f} | lr {lr:.2e} | {imgs_per_step * (step - t_step) / dt:.1f} img/s")
            t0, t_step = time.time(), step
        if env.master and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            t_aside = time.time()
            for name, eval_set in eval_sets.items():
                acc = siglip_zero_shot(model, cfg, env, eval_set, encode)
                log(f"step {step} | zero-shot on {len(eval_set)} images ({name}): " +
                    "  ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items() if " by caption" not in k))
                if any(" by caption" in k for k in acc):
                    log(f"step {step} | best of the 972 captions ({name}): " +
                        "  ".join(f"{k.removesuffix(' by caption')} {100 * v:.1f}%" for k, v in acc.items() if " by caption" in k))
            t0 += time.time() - t_aside
        if env.master and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
            state = {"format": TRAIN_STATE_FORMAT, "stage": "teacher", "step": step, "config": asdict(cfg),
                     "optimizer": opt.state_dict()}
            save_in_out_dir(cfg.out_dir, step, [
                ("model", model.save_pretrained),
                ("train_state", lambda d: torch.save(state, os.path.join(d, "train_state.pt")))])
        if env.ddp and step % cfg.ckpt_every == 0:
            dist.barrier()
    log(f"saved the teacher SigLIP to {cfg.out_dir}; next: python tokenizer.py --preset shapes --siglip {cfg.out_dir}")


@torch.no_grad()
def siglip_zero_shot(siglip, cfg, env, dataset, encode):
    was_training = siglip.training
    siglip.eval()
    tasks = zero_shot_tasks(cfg, siglip, encode, dataset, env.device)
    correct = {f"{t}{how}": 0 for t in tasks for how in ("", " by caption")[:1 + (tasks[t][2] is not None)]}
    for batch in torch.utils.data.DataLoader(dataset, cfg.batch_size, generator=torch.Generator()):
        with env.ctx:
            img = siglip.encode_image(batch["image"].to(env.device))
        for t, (classifier, labels, by_caption) in tasks.items():
            correct[t] += (zero_shot_predict(img, classifier).cpu() == labels(batch)).sum().item()
            if by_caption is not None:
                correct[f"{t} by caption"] += (zero_shot_predict(img, None, by_caption).cpu() == labels(batch)).sum().item()
    siglip.train(was_training)
    return {t: v / len(dataset) for t, v in correct.items()}


def run_eval(cfg, env):
    if not env.master:
        return
    with reading(f"--eval --out_dir {cfg.out_dir}"):
        model = DualTokenizer.from_pretrained(cfg.out_dir, device=env.device)
    c = model.config
    with reading(f"--siglip {cfg.siglip}"):
        teacher = SigLIP.from_pretrained(cfg.siglip).to(env.device) if cfg.siglip else None
    if teacher is not None and teacher.config != c.siglip:
        raise UsageError(f"--siglip {cfg.siglip} is not the backbone of the tokenizer in {cfg.out_dir}")
    with reading(f"--lpips {cfg.lpips}"):
        lpips = LPIPS.from_file(cfg.lpips).to(env.device) if cfg.lpips else None
    dataset = eval_dataset(cfg, c.siglip.image_size, c.siglip.resample)
    tasks = zero_shot_tasks(cfg, model.siglip, text_encoder(cfg, c.siglip.text_len), dataset, env.device)
    png_dir = os.path.join(cfg.out_dir, "eval")
    for sub in ("real", "recon"):  # a previous, larger evaluation must not leave images behind for FID
        os.makedirs(os.path.join(png_dir, sub), exist_ok=True)
        for f in os.listdir(os.path.join(png_dir, sub)):
            if f.endswith(".png"):
                os.remove(os.path.join(png_dir, sub, f))
    grid = os.path.join(cfg.out_dir, "eval", "grid.png")
    res = evaluate(model, teacher, dataset, tasks, env, cfg, lpips, png_dir=png_dir, grid=grid)
    where = f"{cfg.eval_data or 'shapes, train combinations, unseen images (seed ' + str(cfg.seed + 1) + ')'}"
    print(format_results(res, model, teacher, lpips, f"eval of {cfg.out_dir} on {where}"))
    if not cfg.eval_data:  # and the combinations no stage ever trains on (data.HELDOUT)
        held = evaluate(model, teacher, ShapesDataset(cfg.eval_n, seed=cfg.seed + 1, split="heldout"), tasks, env, cfg,
                        lpips)
        print(format_results(held, model, teacher, lpips, f"eval of {cfg.out_dir} on shapes, held-out combinations"))
    print(f"PNGs: {png_dir}/real and {png_dir}/recon ({res['n']} each), grid {grid}; rFID with clean-fid: "
          f"python -c \"from cleanfid import fid; print(fid.compute_fid('{png_dir}/real', '{png_dir}/recon'))\"")
    return res


def main(argv=None):
    return run_main("tokenizer.py", _main, argv)


def _main(argv):
    cfg = parse_args(argv)
    check_inputs(cfg)
    if not (cfg.eval or cfg.stage == "eval"):
        writable_dir("--out_dir", cfg.out_dir)  # before any work that could not be saved
    env = setup(cfg)
    try:
        if cfg.stage == "teacher":
            train_teacher(cfg, env)
        elif cfg.eval or cfg.stage == "eval":
            run_eval(cfg, env)
        else:
            train_tokenizer(cfg, env)
    finally:
        if env.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
