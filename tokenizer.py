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
presets, projections, decoder, model).
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

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
    # DualToken taps (shortcut/reconstruction/semantic) scale down to 1/2/7; text over the byte-level
    # demo encoding (data.load_text_tokenizer("bytes"): 278 ids, padded to 512 rows), captions ≤ 65
    # bytes.
    "shapes": SigLIPConfig(
        image_size=64, patch_size=8, width=128, mlp=512, layers=8, heads=4, vocab_size=512,
        text_len=80, text_width=128, text_mlp=512, text_layers=4, text_heads=4, embed_dim=128),
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


def sigmoid_loss(logits):
    """SigLIP loss (Zhai et al. 2023, eq. 1) for matched pairs: logits (B, B), pair i ↔ i.

    Every (text, image) cell is an independent binary problem, label +1 on the diagonal and −1
    elsewhere: −mean over rows of Σ over columns of log σ(label · logit).
    """
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(-1).mean()


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


def _safetensors_files(path):
    # HF writes model.safetensors, or shards listed in model.safetensors.index.json's weight_map
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    return [os.path.join(path, "model.safetensors")]


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
        # checkpoints overwrite everything.
        self.apply(self._init_weights)
        for p in (self.vision.pos_embed, self.text.pos_embed, self.vision.head.probe):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
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

    def forward(self, pixels, ids):
        """Matched image/text batches -> (logits (B_text, B_image), sigmoid loss)."""
        img = F.normalize(self.encode_image(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        logits = txt @ img.t() * self.logit_scale.exp() + self.logit_bias
        return logits, sigmoid_loss(logits)

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

    def check_hf_shapes(self, shapes):
        """Strict: `shapes` (HF name → shape) must hold exactly our keys, each with our shape."""
        key_map, params = self.hf_key_map(), dict(self.named_parameters())
        missing = sorted(set(key_map) - set(shapes))
        extra = sorted(set(shapes) - set(key_map))
        if missing or extra:
            raise ValueError(f"SigLIP checkpoint keys differ: {len(missing)} missing {missing[:8]}, "
                             f"{len(extra)} unexpected {extra[:8]}")
        for hf, ours in key_map.items():
            if tuple(shapes[hf]) != tuple(params[ours].shape):
                raise ValueError(f"shape mismatch for {hf} (ours: {ours}): checkpoint {tuple(shapes[hf])}, "
                                 f"model {tuple(params[ours].shape)}")

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict):
        """Strictly load an HF SiglipModel state dict (any float dtype; cast to ours)."""
        self.check_hf_shapes({k: v.shape for k, v in state_dict.items()})
        self._copy_hf(state_dict)

    @torch.no_grad()
    def _copy_hf(self, tensors):
        params = dict(self.named_parameters())
        for hf, ours in self.hf_key_map().items():
            if hf in tensors:
                params[ours].copy_(tensors[hf])

    @classmethod
    def from_pretrained(cls, path):
        """A transformers SigLIP directory: config.json + model.safetensors (or sharded), fp32 or bf16."""
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        resample = None
        preprocessor = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(preprocessor):
            with open(preprocessor) as f:
                resample = _PIL_RESAMPLE[json.load(f).get("resample", 3)]  # HF's SigLIP default: bicubic
        config = SigLIPConfig.from_hf(hf, resample)
        # Built on meta and then given storage: every parameter is overwritten below, so skip init.
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        files = _safetensors_files(path)
        shapes = {}
        for fn in files:  # check every key and shape from the headers before reading any tensor
            with safe_open(fn, framework="pt") as f:
                shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        model.check_hf_shapes(shapes)
        for fn in files:
            model._copy_hf(load_file(fn))
        return model.eval()  # as transformers does; training calls .train()

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
    # Table 3 ablations: "Recon.(26) + Sem.(26)" (joint at the deep layer) is rec_layer = sem_layer
    # = 26 with shortcut_weight = 0; "Recon.(6)" alone is the default model trained with semantic
    # weight 0 (a training setting, not an architecture one).
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

    @property
    def output_size(self):
        return self.latent_size * 2 ** (len(self.dec_ch_mult) - 1)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["siglip"] = SigLIPConfig(**d["siglip"])
        for k in ("dec_ch_mult", "dec_attn"):  # JSON lists back to tuples, so configs compare equal
            d[k] = tuple(d[k])
        return cls(**d)


TOKENIZER_PRESETS = {
    "so400m": TokenizerConfig(),
    # official model_config_siglip_256_rvq4: SigLIP2 so400m patch16-256, codes 16×16×4, latent 16
    "so400m-256": TokenizerConfig(
        siglip=SIGLIP_PRESETS["so400m-256"], depth=4, latent_size=16, dec_attn=(16,)),
    # the CPU demo: micro-SigLIP (8 layers, 8×8 tokens) with the taps scaled from 4/6/26 of 27 to
    # 1/2/7 of 8; codes 8×8×4 from 1024 entries; the decoder needs no resize (latent = grid = 8)
    # and upsamples 3× to 64×64.
    "shapes": TokenizerConfig(
        siglip=SIGLIP_PRESETS["shapes"], rec_layer=2, shortcut_layer=1, sem_layer=7,
        codebook_size=1024, depth=4, latent_size=8, dec_in=128, dec_ch=32, dec_ch_mult=(1, 2, 2, 4),
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

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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
        # pixel branch: rec_layer (+ shortcut) → RVQ(pix) → post-quant → resize → ResNet → decoder
        self.pix_pre = Projection(D, c.code_dim)
        self.pix_short = Projection(D, c.code_dim) if c.shortcut_weight else None
        self.pix_rvq = ResidualVQ(c.code_dim, c.codebook_size, c.depth, decay=c.decay)
        self.pix_post = Projection(c.code_dim, D)
        self.post_quant = ResBlock(D, c.dec_in, k1=1)
        self.decoder = Decoder(c)
        # semantic branch: layer sem_layer → RVQ(sem) → post-quant → back into the ViT at sem_layer
        self.sem_pre = Projection(D, c.code_dim)
        self.sem_rvq = ResidualVQ(c.code_dim, c.codebook_size, c.depth, decay=c.decay)
        self.sem_post = Projection(c.code_dim, D)
        # Activation checkpointing of the ViT blocks in training (so400m); set by the trainer.
        self.grad_checkpointing = False

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
            if i == c.rec_layer:
                pix = self.pix_pre(h)      # (B, N, code_dim)
        if self.pix_short is not None:
            pix = pix + c.shortcut_weight * short
        return pix.unflatten(1, (g, g)), h

    def forward(self, images):
        """Training pass: images (B, 3, S, S) in [-1, 1] -> TokenizerOutput (see its fields)."""
        c, vision = self.config, self.siglip.vision
        g = c.siglip.grid
        pix, f_sem = self.features(images)
        zq_pix, pix_codes, commit_pix = self.pix_rvq(pix)  # (B, h, w, code_dim), (B, h, w, depth)
        zq_sem, sem_codes, commit_sem = self.sem_rvq(self.sem_pre(f_sem).unflatten(1, (g, g)))
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
        return _codes(self.pix_rvq, pix), _codes(self.sem_rvq, self.sem_pre(f_sem).unflatten(1, (g, g)))

    def decode_latent(self, z):
        # quantized pixel features (B, h, w, code_dim) -> (B, 3, H, W), not clamped (training)
        x = self.pix_post(z).permute(0, 3, 1, 2)  # (B, D, h, w)
        size = self.config.latent_size
        if x.shape[-1] != size:
            # official: bilinear resize of the 27×27 map to the 24×24 decoder latent
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.decoder(self.post_quant(x))

    @torch.no_grad()
    def decode(self, pix_codes):
        """pix_codes (B, h, w, depth) -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_latent(self.pix_rvq.decode(pix_codes)).clamp(-1, 1)

    def save_pretrained(self, path):
        """config.json + model.safetensors, from this (unwrapped) module: no DDP/compile prefixes."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"format": CHECKPOINT_FORMAT, **asdict(self.config)}, f, indent=2)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f)
        if d.pop("format", None) != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
        # Built on meta, then given storage: the strict load below overwrites every tensor.
        with torch.device("meta"):
            model = cls(TokenizerConfig.from_dict(d))
        model.to_empty(device=device)
        state_dict = load_file(os.path.join(path, "model.safetensors"), device=str(device))
        model.load_state_dict(state_dict, strict=True)  # errors name the key and both shapes
        return model.eval()  # as transformers does; training calls .train()
