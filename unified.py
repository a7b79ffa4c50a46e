"""
The stage-2 unified model of DualToken (arXiv 2503.14324, §3.3) and its training.

The LLM is Qwen2.5 (the paper's backbone is Qwen2.5-3B) in plain PyTorch: a decoder-only
transformer with RMSNorm, half-split rotary embeddings, grouped-query attention with biased q/k/v
projections, and a SwiGLU MLP. It loads Hugging Face `Qwen2ForCausalLM` checkpoints (one file or
sharded, tied or untied embeddings, bf16 or fp32) strictly through an explicit key map, and
generates with a static, preallocated KV cache (gpt-fast style: one small module of buffers per
layer, positions passed in as a tensor).

The unified model (the paper never released it; the design is in DESIGN.md, "Stage 2") reads an
image as one LLM position per patch, embedding the pixel and the semantic codes of the DualToken
tokenizer concatenated along the embedding dimension, and writes images back through two
RQ-Transformer-style depth heads, one per code kind, trained with the next-token loss of eq. (6)-(8).
A sampler runs `embed`, `llm.hidden` with the KV cache (a [cond; uncond] batch for classifier-free
guidance) and `sample_codes`.

Sections: Qwen2 (config, blocks, model, HF checkpoints), the unified model, stage-2 sequences and
data sources, training (`python unified.py --preset shapes --tokenizer DIR`, or under torchrun),
code extraction (`python unified.py extract-codes ...`), export of a checkpoint for sample.py
(`python unified.py export SRC DST`), and the LLM inputs' norms (`python unified.py norms CKPT`).
"""

import argparse
import copy
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import (IMAGE_PLACEHOLDER, QUESTIONS, QWEN_SPECIAL_TOKENS, LlavaDataset, ShapesDataset, WebDataset,
                  encode_chat, load_text_tokenizer, shapes_sample, to_tensor)
# the training skeleton is stage 1's: flags from the config dataclass, torchrun setup, the schedule,
# AdamW, strict loading, atomic checkpoints, the one-line error handler
from tokenizer import (MANIFEST, DualTokenizer, UsageError, _Parser, add_flags, build_on_meta, check_fits,
                       check_ranks_in_sync, check_state_shapes, check_training, check_types, config_from_dict, confined,
                       latest_checkpoint, load_strict, lr_at, make_optimizer, model_dir, read_json, read_train_state,
                       reading, run_main, safetensors_shapes, setup, synced_tensors, verify_checkpoint, writable_dir,
                       write_checkpoint)


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Qwen2Config:
    # defaults are Qwen2.5-3B, the paper's LLM (its config.json on the Hugging Face hub)
    vocab_size: int = 151936         # embedding rows: 151643 BPE ranks + 22 special tokens, padded
    dim: int = 2048                  # HF hidden_size
    intermediate_size: int = 11008
    n_layer: int = 36
    n_head: int = 16
    n_kv_head: int = 2               # grouped-query attention: n_head // n_kv_head queries per K/V head
    head_dim: int | None = None      # None -> dim // n_head (what HF Qwen2 uses when config.json has none)
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    tie_embeddings: bool = True      # lm_head reuses the token embedding (HF tie_word_embeddings)
    max_seq_len: int = 32768         # HF max_position_embeddings; informational, RoPE has no table

    def __post_init__(self):
        check_types(self, "Qwen2Config")  # a config.json value of the wrong type fails here, by name
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown Qwen2 preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_file(cls, path):
        """from_hf of a config.json file, with every problem one ValueError naming the file."""
        hf = read_json(path)
        try:
            if not isinstance(hf, dict):
                raise ValueError("expected a JSON object")
            return check_types(cls.from_hf(hf), path)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            msg = msg if msg.startswith(str(path)) else f"{path}: " + (f"no {msg}" if isinstance(e, KeyError) else msg)
            raise ValueError(msg) from None

    @classmethod
    def from_hf(cls, hf):
        """Read a Hugging Face Qwen2 config.json (already parsed into a dict)."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r}: Qwen2 here is SwiGLU (silu) only")
        if hf.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (Qwen2.5 checkpoints ship it off)")
        # transformers 4 writes rope_theta (+ rope_scaling) at the top level, transformers 5 nests
        # both in rope_parameters; HF's default theta when neither is present is 10000
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r} is not supported, only plain RoPE")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        n_head = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,  # HF: None means no grouping
            head_dim=hf.get("head_dim"),
            rope_theta=float(theta),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),  # HF Qwen2Config's default
            max_seq_len=hf.get("max_position_embeddings", 32768),
        )

    def to_hf(self):
        """The config.json fields that make transformers build the same Qwen2ForCausalLM."""
        hf = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_seq_len,
            "use_sliding_window": False,
        }
        if self.head_dim != self.dim // self.n_head:
            hf["head_dim"] = self.head_dim
        return hf


# exact-name lookup through Qwen2Config.preset(name); figures from the Qwen2.5 config.json files
PRESETS = {
    "qwen2.5-0.5b": dict(dim=896, intermediate_size=4864, n_layer=24, n_head=14, n_kv_head=2),
    "qwen2.5-1.5b": dict(dim=1536, intermediate_size=8960, n_layer=28, n_head=12, n_kv_head=2),
    "qwen2.5-3b": dict(),
    # The embedded shapes benchmark's LLM, trained from scratch on a CPU in minutes. Its text is the
    # byte-level demo encoding (256 byte ranks + the 22 Qwen special tokens = 278 ids), padded to
    # 320 rows the way Qwen pads 151665 ids to 151936. Sequences are a caption plus one image of
    # a few hundred positions, so a small rope_theta keeps every frequency useful at that length.
    "shapes": dict(vocab_size=320, dim=256, intermediate_size=1024, n_layer=4, n_head=4,
                   n_kv_head=2, rope_theta=10000.0, max_seq_len=1024),
}


# ----------------------------------------------------------------------------------------------
# Qwen2 building blocks

class RMSNorm(nn.Module):

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Qwen2: normalize in fp32, cast back to the input dtype, and only then scale by the weight
        # (in bf16 the order changes the rounding, and HF checkpoints were trained with this one)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(pos, head_dim, theta):
    """cos, sin of the rotary angles for positions pos (T,) -> two (T, head_dim) fp32 tensors.

    Half-split layout (HF `rotate_half`): dims i and i + head_dim/2 form a pair rotating at
    frequency theta^(-2i/head_dim). Computed per call from the positions, so there is no table to
    outgrow and nothing to rebuild after loading weights onto a meta-initialized model.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x (B, nh, T, hs); rotate each (x_i, x_{i+hs/2}) pair by its angle
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention_mask(q_pos, n_keys, key_mask=None):
    """Boolean "may attend" mask for queries at positions q_pos (T,) over key slots 0..n_keys-1.

    Causal: slot s is visible from position p iff s <= p -> (T, S). With key_mask (B, S) (False at
    padding slots, e.g. a left-padded [cond; uncond] CFG batch) -> (B, 1, T, S): padding slots are
    hidden from every query except the padding query itself, so no query row is fully masked (a
    fully masked softmax row is NaN in some SDPA kernels, and a NaN in a padding row would reach
    the cache at the next layer, where 0 * NaN in the attention sum spreads it to real rows).
    Because RoPE is relative, a left-padded row computes what the unpadded row would.
    """
    s = torch.arange(n_keys, device=q_pos.device)
    mask = s[None, :] <= q_pos[:, None]  # (T, S)
    if key_mask is not None:
        mask = mask & (key_mask[:, None, None, :] | (s[None, :] == q_pos[:, None]))  # (B, 1, T, S)
    return mask


class KVCache(nn.Module):
    """Static keys and values of one attention layer for batch_size rows of max_seq_len slots.

    Preallocated once (gpt-fast style) so every decoding step has the same shapes; slots past the
    current position hold zeros or stale values that the causal mask never lets a query see.
    Non-persistent buffers: they move with .to() but never enter a state_dict or checkpoint.
    """

    def __init__(self, batch_size, max_seq_len, n_kv_head, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v, kv_len=None):
        # input_pos (T,), k and v (B, n_kv, T, hs) -> the first kv_len slots (all if None), (B, n_kv, S', hs)
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"batch of {k.shape[0]} rows but the cache was set up for {self.k.shape[0]}")
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # Qwen2: q/k/v have bias, o_proj does not
        self.wq = nn.Linear(config.dim, config.n_head * config.head_dim, bias=True)
        self.wk = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=True)
        self.wv = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=True)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache = None  # a KVCache while Qwen2.setup_cache is in effect

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query head h reads K/V head h // rep, as HF repeat_kv does
        rep = self.n_head // self.n_kv_head
        if input_pos is None:  # training / full sequence
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, T, hs)
            # mask None: plain causal, lets SDPA pick a fused kernel
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            y = y.transpose(1, 2)  # (B, T, nh, hs)
        else:  # decoding through the cache
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)  # (B, n_kv, S', hs): the filled prefix
            # The rep query heads that share a K/V head become rep·T query rows of that head, so K/V
            # are read as stored, never copied rep times (8× for Qwen2.5-3B). mask None: every slot
            # of the prefix is visible (one query per row, no padding).
            q = q.reshape(B, self.n_kv_head, rep * T, self.head_dim)  # (B, n_kv, rep·T, hs)
            if mask is not None:
                mask = mask.repeat(*(1,) * (mask.dim() - 2), rep, 1)  # (..., rep·T, S')
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_kv, rep·T, hs)
            y = y.view(B, self.n_head, T, self.head_dim).transpose(1, 2)  # (B, T, nh, hs)
        return self.wo(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.mlp(self.mlp_norm(x))


# Hugging Face Qwen2ForCausalLM key -> our key; {} stands for the layer index (as in gpt-fast's
# checkpoint converter). lm_head.weight exists only for untied models: a tied checkpoint omits it.
HF_KEY_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.wq.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.wq.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.wk.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.wk.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.wv.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def compute_dtype(weight, device):
    # the dtype matmuls run in: autocast's where it is on (bf16 on a GPU), else the weights'
    on = device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if on else weight.dtype


def sample_logits(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, V) -> (B,) long. temperature 0 means greedy (argmax).

    Otherwise: divide by the temperature, keep the top_k largest logits, then keep the smallest
    set of most likely tokens whose probability reaches top_p (nucleus sampling; the most likely
    token always stays), and sample from what is left renormalized. Same order as HF's warpers.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely tokens before it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The LLM

class Qwen2(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # tied: the logits reuse tok_embeddings.weight, so there is no second matrix to load or count
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # Activation checkpointing of the blocks in training (set by the stage-2 trainer): recompute
        # each block's activations in the backward pass instead of storing them.
        self.grad_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # HF Qwen2 initialization (initializer_range 0.02), for training from scratch (the shapes preset)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- KV cache

    def setup_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        """Preallocate a static KV cache for batch_size rows (2B for a [cond; uncond] CFG batch)
        of max_seq_len positions. Afterwards, calls with input_pos read and write it. dtype None:
        the compute dtype (autocast's if on, else the weights'), so attention never recasts it."""
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or compute_dtype(self.tok_embeddings.weight, device)
        c = self.config
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, max_seq_len, c.n_kv_head, c.head_dim, dtype, device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.kv_cache = None

    # --- forward

    def hidden(self, idx=None, input_embeds=None, input_pos=None, key_mask=None, kv_len=None):
        """Final hidden states (after the last RMSNorm), (B, T, dim).

        Input is token ids idx (B, T) or embeddings input_embeds (B, T, dim) (image positions of
        the unified model), exactly one of them. Without input_pos: the whole sequence from
        position 0, causal, no cache. With input_pos (T,) long: the positions of these T inputs;
        their keys/values are written to the cache set up by setup_cache, and they attend to every
        cached slot at or before their position. key_mask (B, T) without a cache or (B, S) with
        one marks padding slots False (see attention_mask). kv_len: how many cache slots attention
        reads, the filled prefix rather than the whole allocation: the last position + 1 (None: read
        off input_pos, a host sync on a GPU). With key_mask it may be larger (the causal mask hides
        the rest), which lets a compiled step round it up and see few shapes.
        """
        if (idx is None) == (input_embeds is None):
            raise ValueError("pass exactly one of idx and input_embeds")
        x = self.tok_embeddings(idx) if input_embeds is None else input_embeds  # (B, T, dim)
        T = x.shape[1]
        if input_pos is None:
            pos = torch.arange(T, device=x.device)
            mask = None if key_mask is None else attention_mask(pos, T, key_mask)
        else:
            cache = self.layers[0].attn.kv_cache
            if cache is None:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache(batch_size, max_seq_len)")
            pos = input_pos
            kv_len = int(pos[-1]) + 1 if kv_len is None else kv_len
            key_mask = None if key_mask is None else key_mask[:, :kv_len]
            # one query per row and no padding: the whole prefix is visible, no mask to build or read
            mask = None if T == 1 and key_mask is None else attention_mask(pos, kv_len, key_mask)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)  # (T, hs) each
        for layer in self.layers:
            if self.grad_checkpointing and self.training and input_pos is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, kv_len)
        return self.norm(x)

    def head(self, h):
        # h (..., dim) -> logits (..., vocab_size)
        w = self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def forward(self, idx=None, targets=None, input_embeds=None, input_pos=None, key_mask=None):
        """-> (logits (B, T, vocab_size), loss or None). targets (B, T) are aligned with the logits
        (nanoGPT convention: targets[:, t] is the token after position t, already shifted), and
        -100 marks positions without a loss. Other arguments as in hidden()."""
        logits = self.head(self.hidden(idx, input_embeds, input_pos, key_mask))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                 generator=None):
        """Continue the prompts idx (B, T) by up to max_new_tokens -> (B, T + n) ids.

        One prefill over the prompt, then one token per step through the static KV cache. With
        eos_id, a row that has produced it keeps producing it, and generation stops once all rows
        have (so n can be shorter than max_new_tokens).
        """
        B, T = idx.shape
        self.setup_cache(B, T + max_new_tokens, device=idx.device)
        try:
            h = self.hidden(idx, input_pos=torch.arange(T, device=idx.device), kv_len=T)
            logits = self.head(h[:, -1])  # (B, V): only the last position is needed
            out, done = idx, torch.zeros(B, dtype=torch.bool, device=idx.device)
            for t in range(T, T + max_new_tokens):
                nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_id is not None:
                    nxt = nxt.masked_fill(done, eos_id)
                    done = done | (nxt == eos_id)
                out = torch.cat((out, nxt[:, None]), dim=1)
                if done.all() or t == T + max_new_tokens - 1:
                    break
                h = self.hidden(nxt[:, None], input_pos=torch.tensor([t], device=idx.device), kv_len=t + 1)
                logits = self.head(h[:, -1])
        finally:
            self.clear_cache()
        return out

    # --- Hugging Face checkpoints

    def hf_key_map(self):
        """{HF key: our key} for exactly the tensors an HF checkpoint of this config holds."""
        out = {}
        for hf, ours in HF_KEY_MAP.items():
            if "{}" in hf:
                out.update({hf.format(i): ours.format(i) for i in range(self.config.n_layer)})
            elif not (hf == "lm_head.weight" and self.lm_head is None):
                out[hf] = ours
        return out

    def _hf_hint(self, keys):
        # the usual cause of a lm_head.weight mismatch, said in words
        if "lm_head.weight" in keys and self.lm_head is None:
            return " (lm_head.weight in a checkpoint whose config ties the embeddings)"
        if "lm_head.weight" not in keys and self.lm_head is not None:
            return " (no lm_head.weight: is the checkpoint tied while config.json says untied?)"
        return ""

    def load_hf_state_dict(self, sd, assign=False):
        """Load an HF-keyed state dict strictly: every key present, none unexpected, every shape
        equal. assign=True takes the tensors as they are (for a model built on the meta device)."""
        key_map, own = self.hf_key_map(), self.state_dict()
        check_state_shapes({k: (ours, own[ours].shape) for k, ours in key_map.items()},
                           {k: v.shape for k, v in sd.items()}, "checkpoint", self._hf_hint(sd))
        self.load_state_dict({ours: sd[k].to(own[ours].dtype) for k, ours in key_map.items()},
                             strict=True, assign=assign)

    def hf_state_dict(self):
        own = self.state_dict()
        return {k: own[ours] for k, ours in self.hf_key_map().items()}

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """A Qwen2 from an HF directory: config.json + model.safetensors, or shards listed in
        model.safetensors.index.json. dtype None keeps the checkpoint's (that of its embedding)."""
        source = os.path.join(path, "config.json")
        config = Qwen2Config.from_hf_file(source)
        model = build_on_meta(cls, config, source)  # no random init of weights about to be replaced
        files, shapes = safetensors_shapes(path)
        if dtype is None:
            for fn in files:
                with safe_open(fn, framework="pt") as f:
                    if "model.embed_tokens.weight" in f.keys():
                        dtype = f.get_slice("model.embed_tokens.weight").get_dtype()
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
        return load_strict(model.to(dtype), path, key_map=model.hf_key_map(), hint=model._hf_hint(shapes))

    def save_pretrained(self, path):
        """Write an HF-format directory (config.json + model.safetensors) that both
        Qwen2.from_pretrained and transformers' Qwen2ForCausalLM.from_pretrained read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.hf_state_dict().items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def load_safetensors(path):
    """All tensors of an HF checkpoint directory, single-file or sharded, keyed as stored."""
    files, _ = safetensors_shapes(path)  # shard names confined to path, headers checked
    return {k: v for fn in files for k, v in load_file(fn).items()}


# ----------------------------------------------------------------------------------------------
# The unified model (§3.3): Qwen2 + dual visual embedding + pixel and semantic depth heads

# The special tokens the model and a sampler need, by name; their ids live in UnifiedConfig (the
# same names sit at 151643 + i in Qwen2.5 and at 256 + i in the "bytes" demo encoding)
SPECIAL_NAMES = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>")


def _special_ids(base):
    return {name: base + QWEN_SPECIAL_TOKENS.index(name) for name in SPECIAL_NAMES}


@dataclass
class UnifiedConfig:
    # Defaults: the paper's unified model (§3.3, §4.1) on Qwen2.5-3B with the 384/rvq8 tokenizer.
    llm: Qwen2Config = field(default_factory=Qwen2Config)
    # the tokenizer's codes (the trainer copies these from the tokenizer it is given)
    code_dim: int = 32               # RVQ vector width, both branches
    codebook_size: int = 16384       # one codebook shared by all depths, per branch
    rvq_depth: int = 8               # D: codes per position and branch
    grid: int = 27                   # an image is grid × grid visual positions (27×27 = 729)
    # depth heads (§3.3: "three layers of depth transformers (each with a depth of 8) and eight
    # classification heads"); the paper gives no width, RQ-Transformer's depth transformer has the
    # width of its spatial transformer, so the LLM's
    depth_layers: int = 3
    depth_dim: int | None = None     # None -> the LLM width
    depth_heads: int = 16
    depth_mlp: int | None = None     # SwiGLU hidden width; None -> 4 × depth_dim (RQ-Transformer's ratio)
    # ablations: visual input "dual" = pixel ⊕ semantic (§3.3), "sem" / "pix" one branch (Table 4
    # compares sem. alone with sem. + pixel); gen_codes "pix" drops the semantic head so generation
    # writes pixel codes only (§4.3, Fig. 4: pixel-only vs dual vocabularies). A model that writes
    # pixel codes only must read pixel codes only, or it could not feed its own samples back.
    visual_input: str = "dual"
    gen_codes: str = "dual"
    # A learned embedding of the grid position added to each visual input (off in the paper's
    # setting). With 1D RoPE alone a model knows where in the image it is only by counting the
    # visual positions before it — a pretrained 3B LLM learns to, a small LLM trained from scratch in
    # minutes (the shapes demo) does not; with it, the hidden state at visual position i knows i.
    grid_pos_embed: bool = False
    # the std of its init: 0.02 (the LLM's) leaves it ~1/10 of the normed visual inputs after
    # training; 1.0 starts place at the scale of content (EXPERIMENTS.md, §6)
    grid_pos_init: float = 0.02
    # An RMSNorm at the projector's output, its gain starting at projector_norm (0 = none, the
    # paper's LLaVA MLP): every code enters at one learned scale, and a small LLM trained from
    # scratch generates and understands far better with it (EXPERIMENTS.md, §6; kept at full length, §19)
    projector_norm: float = 0.0
    # text → image sampling defaults, which sample.py uses unless given: §4.1 samples with
    # classifier-free guidance 3; a small model trained briefly samples best with less (EXPERIMENTS.md, §3)
    sample_cfg: float = 3.0
    sample_temperature: float = 1.0
    # eq. (6)-(8) weigh text and every depth of both heads alike
    text_weight: float = 1.0
    pix_weight: float = 1.0
    sem_weight: float = 1.0
    # weight of depths 2..D relative to depth 1 within each head (the paper: 1): residual codes are
    # detail no caption determines, and their gradients drown the caption's (EXPERIMENTS.md, §6; §21)
    residual_weight: float = 1.0
    # "bytes" (the demo encoding) or a directory of HF tokenizer files; None until the trainer sets it
    # (from --llm DIR for Qwen2.5). save_pretrained copies HF files into the checkpoint.
    text_tokenizer: str | None = None
    special_tokens: dict = field(default_factory=lambda: _special_ids(151643))  # Qwen2.5's ids

    def __post_init__(self):
        if isinstance(self.llm, dict):
            self.llm = Qwen2Config(**self.llm)
        check_types(self, "UnifiedConfig")
        if self.depth_dim is None:
            self.depth_dim = self.llm.dim
        if self.depth_mlp is None:
            self.depth_mlp = 4 * self.depth_dim
        if self.visual_input not in ("dual", "pix", "sem"):
            raise ValueError(f"visual_input={self.visual_input!r}: one of 'dual', 'pix', 'sem'")
        if self.gen_codes not in ("dual", "pix"):
            raise ValueError(f"gen_codes={self.gen_codes!r}: one of 'dual', 'pix'")
        if self.sample_cfg < 0 or self.sample_temperature < 0:
            raise ValueError(f"sample_cfg={self.sample_cfg}, sample_temperature={self.sample_temperature}: "
                             "both must be ≥ 0")
        if self.gen_codes == "pix" and self.visual_input != "pix":
            raise ValueError("gen_codes='pix' needs visual_input='pix': generated images are fed back "
                             "as input, and without a semantic head there are no semantic codes")
        if self.depth_dim % self.depth_heads:
            raise ValueError(f"depth_dim={self.depth_dim} is not a multiple of depth_heads={self.depth_heads}")
        missing = [n for n in SPECIAL_NAMES if n not in self.special_tokens]
        if missing:
            raise ValueError(f"special_tokens lacks {missing}")
        if max(self.special_tokens.values()) >= self.llm.vocab_size:
            raise ValueError(f"special token ids {self.special_tokens} exceed vocab_size {self.llm.vocab_size}")

    @classmethod
    def preset(cls, name):
        if name not in UNIFIED_PRESETS:
            raise ValueError(f"unknown UnifiedConfig preset {name!r}; known: {', '.join(UNIFIED_PRESETS)}")
        return cls(**copy.deepcopy(UNIFIED_PRESETS[name]))


# exact-name lookup through UnifiedConfig.preset(name)
UNIFIED_PRESETS = {
    "dualtoken-3b": dict(),
    # The CPU demo: the shapes LLM (256 wide, 4 layers, byte-level text) and the codes of
    # tokenizer.py's "shapes" preset (8×8 positions × 4 depths from 256 entries of 32-d vectors).
    # One-layer depth heads: as good as 3 and faster (EXPERIMENTS.md, §4); text weighs 4, or the
    # model learns to answer far later than to draw (§5); guidance 1.5 at temperature 0.4: §12, §17, §18; the
    # other values: §3, §6.
    "shapes": dict(llm=Qwen2Config.preset("shapes"), codebook_size=256, rvq_depth=4, grid=8,
                   depth_dim=128, depth_heads=4, depth_layers=1, grid_pos_embed=True, grid_pos_init=1.0,
                   residual_weight=0.1, projector_norm=1.0, text_weight=4.0, sample_cfg=1.5,
                   sample_temperature=0.4, text_tokenizer="bytes", special_tokens=_special_ids(256)),
}

UNIFIED_FORMAT = "dualtoken-unified/1"  # written to config.json, checked on load


class DepthHead(nn.Module):
    """RQ-Transformer depth transformer (§3.3, eq. 5) for one code kind (pixel or semantic).

    Slot 1 reads the LLM hidden state h_p, slot d > 1 the sum of the code vectors of depths < d
    (I_pd = Σ_{d'<d} e(r_pd'), from the frozen tokenizer codebook), each through its own input
    projection, plus a learned depth position embedding. Causal layers over the D slots, so the
    logits of depth d see h_p and r_<d only; then a separate classifier per depth (the paper; VILA-U
    and RQ-Transformer share one). The layers are the LLM's own Block (RMSNorm, SwiGLU); its RoPE
    runs over the slot index, which is harmless next to the learned depth embedding (both only tell
    the slots apart).
    """

    def __init__(self, config):
        super().__init__()
        c = config
        W = c.depth_dim
        self.depth = c.rvq_depth
        self.block_config = Qwen2Config(vocab_size=1, dim=W, intermediate_size=c.depth_mlp,
                                        n_layer=c.depth_layers, n_head=c.depth_heads,
                                        n_kv_head=c.depth_heads, rope_theta=10000.0,
                                        norm_eps=c.llm.norm_eps, max_seq_len=c.rvq_depth)
        self.in_h = nn.Linear(c.llm.dim, W)       # slot 1: h_p
        self.in_code = nn.Linear(c.code_dim, W)   # slots 2..D: Σ_{d'<d} e(r_d')
        self.pos = nn.Parameter(torch.zeros(c.rvq_depth, W))
        self.layers = nn.ModuleList(Block(self.block_config) for _ in range(c.depth_layers))
        self.norm = RMSNorm(W, c.llm.norm_eps)
        self.classifier = nn.Parameter(torch.zeros(c.rvq_depth, c.codebook_size, W))  # (D, K, W)
        self.grad_checkpointing = False  # recompute the layers' activations in backward (set by the trainer)

    def forward(self, h, code_vecs):
        """h (M, llm dim): hidden states that predict a visual position; code_vecs (M, d, C): the
        vectors e(r_1..r_d) of the codes known so far, 0 <= d <= D -> logits (M, n, K), n = min(d+1, D).

        Teacher forcing passes all D codes (logits for every depth; the last code is not read);
        sampling passes the d codes drawn so far and takes logits[:, -1] for depth d + 1.
        """
        n = min(code_vecs.shape[1] + 1, self.depth)
        x = self.in_h(h)[:, None]  # (M, 1, W)
        if n > 1:
            prefix = code_vecs[:, : n - 1].cumsum(1)  # (M, n-1, C): I_pd for d = 2..n, eq. (5)
            x = torch.cat((x, self.in_code(prefix.to(x.dtype))), dim=1)  # (M, n, W)
        x = x + self.pos[:n]
        pos = torch.arange(n, device=x.device)
        cos, sin = rope_cos_sin(pos, self.block_config.head_dim, self.block_config.rope_theta)
        for layer in self.layers:  # causal over the slots
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        x = self.norm(x)
        return torch.einsum("mdw,dkw->mdk", x, self.classifier[:n].to(x.dtype))  # (M, n, K)

    @torch.no_grad()
    def sample(self, h, codebook, draw):
        """Draw D codes per row, depth by depth, as forward would score them, at a fraction of the work.

        h (R, llm dim); codebook (K, C); draw(logits (R, K) fp32) -> codes (R,) long. -> (R, D).
        Slot d runs once: its keys/values go into a D-slot cache that later slots attend to, and only
        classifier d is applied to it (teacher forcing needs all slots at once, sampling one at a time).
        """
        x = self.in_h(h)  # (R, W): slot 1
        cache = self.layers[0].attn.kv_cache
        if cache is None or cache.k.shape[0] != x.shape[0] or cache.k.dtype != x.dtype or cache.k.device != x.device:
            # kept between positions (a few KB per row): slot d is written before any query reads it,
            # and a compiled slot step sees the same buffers every time
            c = self.block_config
            for layer in self.layers:
                layer.attn.kv_cache = KVCache(x.shape[0], self.depth, c.n_kv_head, c.head_dim, x.dtype, x.device)
        prefix = torch.zeros(h.shape[0], codebook.shape[1], device=h.device)  # Σ_{d'<d} e(r_d'), eq. (5)
        codes = []
        for d in range(self.depth):
            if d:
                prefix = prefix + codebook[codes[-1]]
                x = self.in_code(prefix.to(x.dtype))  # (R, W)
            codes.append(draw(self.slot(x, d).float()))  # (R, K) -> (R,)
        return torch.stack(codes, dim=1)

    def slot(self, x, d):
        """One cached step: slot d's input x (R, W) -> the logits of depth d (R, K). Writes slot d's
        keys/values and attends to slots ≤ d; only classifier d runs."""
        c = self.block_config
        pos = torch.full((1,), d, device=x.device)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta)  # (1, hs) each
        y = (x + self.pos[d])[:, None]  # (R, 1, W)
        for layer in self.layers:
            y = layer(y, cos, sin, None, pos, d + 1)
        return F.linear(self.norm(y[:, 0]), self.classifier[d])  # (R, K)


def total_loss(config, text, pix, sem=None):
    """Eq. (6)-(8): text CE + Σ_d pixel CE_d + Σ_d semantic CE_d, with the config's weights (all 1 in
    the paper). text: scalar; pix, sem: (D,) per-depth CEs (sem None without a semantic head)."""
    c = config
    w = torch.full_like(pix, c.residual_weight)
    w[0] = 1.0  # (D,): depth 1, then the residual depths 2..D
    loss = c.text_weight * text + c.pix_weight * (w * pix).sum()
    if sem is not None:
        loss = loss + c.sem_weight * (w * sem).sum()
    return loss


def _depth_ce(logits, codes):
    # logits (M, D, K), codes (M, D) -> mean CE per depth (D,); zeros when M = 0, and the graph still
    # reaches every head parameter then (a rank whose batch has no generation sample stays in DDP step)
    ce = F.cross_entropy(logits.float().transpose(1, 2), codes, reduction="none")  # (M, D)
    return ce.sum(0) / max(codes.shape[0], 1)


class UnifiedModel(nn.Module):
    """§3.3 / Fig. 3 (c): one LLM sequence of text tokens and visual positions.

    Visual input: one position per patch, at each <|image_pad|>; its embedding is a 2-layer GELU MLP
    (LLaVA-1.5's projector) of the pixel feature Σ_d e_pix(r_d) concatenated with the semantic one
    Σ_d e_sem(r_d) along the embedding dimension (or one of them, see visual_input). The codebooks are
    the frozen tokenizer's, held as buffers so a checkpoint is self-contained.

    Visual output: the hidden state that precedes a visual position (the one at <|vision_start|> for
    position 0, then each visual position for the next) goes through the pixel and the semantic
    depth heads; the last visual position predicts <|vision_end|> through the text head.
    """

    def __init__(self, config, llm=None):
        super().__init__()
        c = self.config = config
        if llm is not None and llm.config != c.llm:
            raise ValueError(f"the LLM given has config {llm.config}, the UnifiedConfig says {c.llm}")
        self.llm = llm if llm is not None else Qwen2(c.llm)
        # Frozen tokenizer codebooks (K, C): buffers, not parameters — the codes and their meaning
        # are fixed by stage 1. Random until from_tokenizer / from_pretrained fill them.
        self.register_buffer("pix_codebook", torch.randn(c.codebook_size, c.code_dim))
        self.register_buffer("sem_codebook", torch.randn(c.codebook_size, c.code_dim))
        in_dim = c.code_dim * (2 if c.visual_input == "dual" else 1)
        self.projector = nn.Sequential(nn.Linear(in_dim, c.llm.dim), nn.GELU(), nn.Linear(c.llm.dim, c.llm.dim))
        if c.projector_norm:  # its gain starts at projector_norm (_init_weights leaves norms alone)
            self.projector.append(RMSNorm(c.llm.dim, c.llm.norm_eps))
            nn.init.constant_(self.projector[-1].weight, c.projector_norm)
        self.grid_pos = (nn.Parameter(c.grid_pos_init * torch.randn(c.grid ** 2, c.llm.dim))
                         if c.grid_pos_embed else None)
        self.pix_head = DepthHead(c)
        self.sem_head = DepthHead(c) if c.gen_codes == "dual" else None
        for module in (self.projector, self.pix_head, self.sem_head):
            if module is not None:
                module.apply(self.llm._init_weights)  # the LLM's init (normal 0.02, zero bias)
        for head in (self.pix_head, self.sem_head):
            if head is not None:
                nn.init.normal_(head.pos, std=0.02)
                nn.init.normal_(head.classifier, std=0.02)
        self.image_pad_id = c.special_tokens["<|image_pad|>"]

    @classmethod
    def from_tokenizer(cls, config, tokenizer, llm=None):
        """A fresh model whose codebooks are copied from a DualTokenizer (its codes' meaning)."""
        tc = tokenizer.config
        theirs = (tc.code_dim, tc.codebook_size, tc.depth, tc.siglip.grid)
        ours = (config.code_dim, config.codebook_size, config.rvq_depth, config.grid)
        if theirs != ours:
            raise ValueError(f"tokenizer codes (code_dim, codebook_size, depth, grid) = {theirs}, "
                             f"UnifiedConfig says {ours}")
        if tc.joint:
            raise ValueError("a Table 3(b) tokenizer (joint: one codebook) has no pixel codes; stage 2 reads DualToken's two")
        if not (tokenizer.pix_rvq.shared_codebook and tokenizer.sem_rvq.shared_codebook):
            raise ValueError("the unified model embeds codes with one codebook shared by all depths")
        model = cls(config, llm)
        with torch.no_grad():
            model.pix_codebook.copy_(tokenizer.pix_rvq.codebook[0])
            model.sem_codebook.copy_(tokenizer.sem_rvq.codebook[0])
        return model

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- input

    def visual_features(self, pix_codes=None, sem_codes=None):
        # codes (P, D) each -> (P, in_dim): Σ_d e(r_d) per branch, concatenated (§3.3)
        parts = []
        if self.config.visual_input in ("dual", "pix"):
            parts.append(self.pix_codebook[pix_codes].sum(-2))  # (P, C)
        if self.config.visual_input in ("dual", "sem"):
            parts.append(self.sem_codebook[sem_codes].sum(-2))  # (P, C)
        return torch.cat(parts, dim=-1)

    def visual_embed(self, pix_codes=None, sem_codes=None, positions=None):
        """codes (P, D) each, positions (P,) in [0, grid²) -> the LLM inputs of P visual positions
        (P, llm dim): the projector of their features, plus the grid-position embedding if any."""
        v = self.projector(self.visual_features(pix_codes, sem_codes))
        if self.grid_pos is not None:
            v = v + self.grid_pos[positions]
        return v

    def embed(self, ids, pix_codes=None, sem_codes=None):
        """ids (B, T) with one <|image_pad|> per visual position; codes (P, D) for the P pads in
        row-major order of ids -> input embeddings (B, T, llm dim)."""
        x = self.llm.tok_embeddings(ids)  # (B, T, dim)
        if pix_codes is None and sem_codes is None:
            return x
        is_pad = ids == self.image_pad_id
        # a pad's grid position = the pads since the last <|vision_start|> before it (row-major; a
        # prefix of an image, as while sampling, holds its first positions)
        n_pad = is_pad.cumsum(1)  # (B, T)
        start = torch.where(ids == self.config.special_tokens["<|vision_start|>"], n_pad, 0).cummax(1).values
        positions = (n_pad - start - 1)[is_pad]  # (P,)
        P = (pix_codes if pix_codes is not None else sem_codes).shape[0]
        if not torch.compiler.is_compiling() and int(is_pad.sum()) != P:
            raise ValueError(f"{int(is_pad.sum())} <|image_pad|> positions but codes for {P}")
        v = self.visual_embed(pix_codes, sem_codes, positions).to(x.dtype)  # (P, dim)
        return x.masked_scatter(is_pad[..., None], v)

    # --- forward

    def hidden(self, x, lengths=None, length_groups=3):
        """x (B, T, dim): input embeddings of right-padded rows -> final hidden states (B, T, dim).

        lengths (B,): each row's length before its padding. Rows then run in groups of similar
        length (groups_by_length), each group cut at its longest row: under a causal mask a real
        position never sees the padding after it, so its hidden state is the same (up to float
        rounding) and the padding is not computed (a quarter of a shapes batch; EXPERIMENTS.md §28).
        Hidden states past a row's length are zeros then; no target reads them.
        """
        if lengths is None:
            return self.llm.hidden(input_embeds=x)
        groups = groups_by_length(lengths.tolist(), length_groups)
        if len(groups) == 1 and groups[0][1] == x.shape[1]:
            return self.llm.hidden(input_embeds=x)
        h = x.new_zeros(x.shape)
        for rows, L in groups:
            rows = torch.tensor(rows, device=x.device)
            h[rows, :L] = self.llm.hidden(input_embeds=x[rows, :L])  # (b, L, dim)
        return h

    def forward(self, ids, pix_codes=None, sem_codes=None, text_targets=None, vis_targets=None, lengths=None,
                length_groups=3):
        """-> (text logits, losses or None). Without targets: logits (B, T, vocab), losses None. With
        targets: logits (N, vocab) at the N text-target positions only, in row-major order — the full
        (B, T, vocab) tensor would be stage 2's largest activation, and ~3 % of it has a target.
        lengths (B,): the rows' lengths before their right padding, which then is not computed: the
        rows run in up to length_groups groups (hidden).

        text_targets (B, T): the token after each position, -100 where it is not a text target.
        vis_targets (B, T): for a position whose next position is a visual position to generate,
        the row of pix_codes/sem_codes holding that position's codes; -100 elsewhere. With targets,
        losses = {"loss": eq. (6) with the config's weights, "text": CE, "pix": (D,) CE per depth,
        "sem": (D,) or None without a semantic head}; each CE is a mean over its positions.
        """
        h = self.hidden(self.embed(ids, pix_codes, sem_codes), lengths, length_groups)  # (B, T, dim)
        if text_targets is None and vis_targets is None:
            return self.llm.head(h), None
        c = self.config
        sel = text_targets != -100
        logits = self.llm.head(h[sel])  # (N, vocab)
        text = F.cross_entropy(logits.float(), text_targets[sel], reduction="sum") / sel.sum().clamp(min=1)
        vsel = vis_targets != -100
        hv, rows = h[vsel], vis_targets[vsel]  # (M, dim), (M,)
        pix_t = pix_codes[rows]                 # (M, D)
        pix = _depth_ce(self.pix_head(hv, self.pix_codebook[pix_t]), pix_t)
        sem = None
        if self.sem_head is not None:
            sem_t = sem_codes[rows]
            sem = _depth_ce(self.sem_head(hv, self.sem_codebook[sem_t]), sem_t)
        return logits, {"loss": total_loss(c, text, pix, sem), "text": text, "pix": pix, "sem": sem}

    @torch.no_grad()
    def sample_codes(self, h, guidance=None, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Draw the codes of one visual position per row, depth by depth, from both heads.

        h (R, llm dim): the hidden states that predict this position. Without guidance R = B rows.
        With guidance s (classifier-free): R = 2B rows [cond; uncond], each depth's logits are
        uncond + s·(cond − uncond), and the code drawn continues both halves, so the caller feeds the
        same codes to both. -> (pix (B, D), sem (B, D) or None). temperature 0 is greedy.
        """
        B = h.shape[0] // 2 if guidance is not None else h.shape[0]
        if guidance == 1:
            # uncond + 1·(cond − uncond) is the conditional model: the unconditional rows would only cost
            h, guidance = h[:B], None

        def draw(logits):  # (R, K) -> (R,)
            if guidance is not None:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            k = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
            return k if guidance is None else torch.cat((k, k))

        return tuple(None if head is None else head.sample(h, codebook, draw)[:B]
                     for head, codebook in ((self.pix_head, self.pix_codebook), (self.sem_head, self.sem_codebook)))

    # --- checkpoints

    def save_pretrained(self, path, tokenizer=None, state_dict=None, dtype=None, tokenizer_dtype="same"):
        """Write the directory sample.py loads: config.json (UnifiedConfig with the LLM config and the
        special-token ids), model.safetensors (LLM, projector, heads, frozen codebooks), the text
        tokenizer (a copy of HF files in text_tokenizer/, or "bytes" in config.json) and, given the
        DualTokenizer the codes came from, tokenizer/. state_dict: a full state dict to write
        instead of this module's (FSDP gathers one). dtype: store floating tensors in it (bfloat16
        halves a shipped checkpoint; from_pretrained loads fp32 either way); tokenizer_dtype: the
        tokenizer's ("same": dtype)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        src = self.config.text_tokenizer
        if src is None:
            raise ValueError("config.text_tokenizer is not set: 'bytes' or a directory of HF tokenizer files")
        if src != "bytes":
            dst = path / "text_tokenizer"
            if Path(src).resolve() != dst.resolve():
                files = [f for f in TEXT_TOKENIZER_FILES if (Path(src) / f).is_file()]
                if not any(f in files for f in ("tokenizer.json", "vocab.json")):
                    raise FileNotFoundError(f"{src}: no tokenizer.json or vocab.json to copy")
                dst.mkdir(exist_ok=True)
                for f in files:
                    shutil.copyfile(Path(src) / f, dst / f)
            cfg["text_tokenizer"] = "text_tokenizer"  # relative to the checkpoint directory
        (path / "config.json").write_text(json.dumps({"format": UNIFIED_FORMAT, **cfg}, indent=2) + "\n")
        sd = self.state_dict() if state_dict is None else state_dict
        tok_dtype = dtype if tokenizer_dtype == "same" else tokenizer_dtype
        # the frozen codebooks are the tokenizer's: stored as its are, so load_pretrained finds them equal
        tensors = {k: _stored(v, tok_dtype if k in ("pix_codebook", "sem_codebook") else dtype) for k, v in sd.items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path / "tokenizer"), dtype=tok_dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        """Strict load of a save_pretrained directory; errors name the missing file, key or shape."""
        path = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path}: no {f} (not a UnifiedModel.save_pretrained directory)")
        source = str(path / "config.json")
        d = read_json(source)
        if not isinstance(d, dict) or d.pop("format", None) != UNIFIED_FORMAT:
            raise ValueError(f"{source}: not a {UNIFIED_FORMAT} checkpoint")
        if d.get("text_tokenizer") not in (None, "bytes"):  # a directory inside this one, never elsewhere
            d["text_tokenizer"] = confined(str(path), d["text_tokenizer"], f"{source}: text_tokenizer")
        if isinstance(d.get("llm"), dict):
            d["llm"] = config_from_dict(Qwen2Config, d["llm"], f"{source}: llm")
        # no random init of weights that are about to be replaced; fp32 whatever the file holds (a bf16
        # checkpoint too): CPU sampling runs fp32, CUDA autocasts
        model = build_on_meta(cls, config_from_dict(UnifiedConfig, d, source), source)
        return load_strict(model, str(path), device).eval()


def _stored(v, dtype):
    v = v.detach().cpu()
    return (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()


# the files of an HF tokenizer directory that load_text_tokenizer reads (copied into checkpoints)
TEXT_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                        "added_tokens.json", "special_tokens_map.json")


def text_tokenizer_ids(enc):
    """The ids of SPECIAL_NAMES in a tiktoken Encoding, for UnifiedConfig.special_tokens."""
    try:
        return {name: enc.encode_single_token(name) for name in SPECIAL_NAMES}
    except KeyError as e:
        raise ValueError(f"text tokenizer {enc.name!r} lacks the special token {e}") from None


def load_pretrained(path, device="cpu"):
    """Everything a sampler needs from a checkpoint directory -> (UnifiedModel, text tokenizer
    (tiktoken Encoding), DualTokenizer). Checks that the three belong together."""
    path = Path(path)
    model = UnifiedModel.from_pretrained(path, device)
    enc = load_text_tokenizer(model.config.text_tokenizer)
    if text_tokenizer_ids(enc) != model.config.special_tokens:
        raise ValueError(f"{path}: the text tokenizer's special-token ids differ from config.json's")
    if not (path / "tokenizer" / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer/ (save with save_pretrained(dir, tokenizer=...))")
    tokenizer = DualTokenizer.from_pretrained(str(path / "tokenizer"), device=device)
    if not (torch.equal(tokenizer.pix_rvq.codebook[0], model.pix_codebook)
            and torch.equal(tokenizer.sem_rvq.codebook[0], model.sem_codebook)):
        raise ValueError(f"{path}: tokenizer/ is not the tokenizer whose codebooks the model was trained on")
    return model, enc, tokenizer


# ----------------------------------------------------------------------------------------------
# Stage-2 sequences (§3.3): generation and understanding samples, their targets, batches

def generation_messages(caption):
    # text → image: the caption is the user turn, the image the assistant turn (CFG drops the caption)
    return [{"role": "user", "content": caption}, {"role": "assistant", "content": IMAGE_PLACEHOLDER}]


def understanding_messages(question, answer, *more):
    """image → text: the image and the question in the user turn, loss on the answer only. More
    (question, answer) pairs continue the conversation about the same image, LLaVA-style."""
    messages = [{"role": "user", "content": IMAGE_PLACEHOLDER + "\n" + question},
                {"role": "assistant", "content": answer}]
    for q, a in more:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def sequence_targets(ids, mask, special):
    """Targets of one encode_chat sequence -> (text_targets, vis_targets), lists aligned with ids.

    Position t is trained to predict position t + 1. text_targets[t] = ids[t+1] where mask[t+1]
    marks a text target (assistant text, including <|vision_start|>, <|vision_end|> and <|im_end|>),
    else -100. vis_targets[t] = i when position t + 1 is the i-th <|image_pad|> of the sequence and
    belongs to an image the model writes — one whose <|vision_start|> is itself a text target (an
    assistant-turn image) — else -100. So the hidden state at <|vision_start|> predicts visual
    position 0, visual position i predicts i + 1, and the last one predicts <|vision_end|> as text.
    """
    vision_start, pad = special["<|vision_start|>"], special["<|image_pad|>"]
    text = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    vis = [-100] * len(ids)
    n_pad, generated = 0, False
    for t, tok in enumerate(ids):
        if tok == vision_start:
            generated = mask[t]
        elif tok == pad:
            if generated:
                vis[t - 1] = n_pad
            n_pad += 1
    return text, vis


def groups_by_length(lengths, max_groups=3):
    """Rows of lengths (list of B ints) -> at most max_groups (rows, longest length) groups of
    consecutive lengths, cut where the padding they hold, Σ rows·longest − Σ lengths, is least.

    A shapes batch is half generation rows (~140 tokens) and half 3-question conversations
    (200–280): padded to the longest, 72 % of the positions are real; in three groups, 97 %.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    s = [lengths[i] for i in order]
    n = len(s)
    # cost[g][i]: the least padded size of the shortest i rows in g groups; cut[g][i]: where the last begins
    inf = float("inf")
    cost = [[0] + [inf] * n] + [[0] * (n + 1) for _ in range(max_groups)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            cost[g][i], cut[g][i] = min((cost[g - 1][j] + (i - j) * s[i - 1], j) for j in range(i))
    groups, i, g = [], n, max_groups
    while i:
        j = cut[g][i]
        groups.append((order[j:i], s[i - 1]))
        i, g = j, g - 1
    return groups[::-1]


def collate(samples, pad_id):
    """samples: (ids, text_targets, vis_targets, pix (P, D), sem (P, D)) per sequence -> a batch dict.
    Right-padded with pad_id (<|endoftext|>, never a target; causal attention keeps real positions
    blind to it); visual targets are offset to rows of the batch's concatenated codes."""
    T = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    text = torch.full((len(samples), T), -100, dtype=torch.long)
    vis = torch.full((len(samples), T), -100, dtype=torch.long)
    offset = 0
    for b, (i, t, v, pix, _) in enumerate(samples):
        ids[b, : len(i)] = torch.tensor(i)
        text[b, : len(t)] = torch.tensor(t)
        v = torch.tensor(v)
        vis[b, : len(v)] = torch.where(v >= 0, v + offset, v)
        offset += pix.shape[0]
    return dict(ids=ids, text_targets=text, vis_targets=vis,
                pix_codes=torch.cat([s[3] for s in samples]), sem_codes=torch.cat([s[4] for s in samples]),
                lengths=torch.tensor([len(s[0]) for s in samples]))  # (B,): each row before its padding


# ----------------------------------------------------------------------------------------------
# Record sources: each record is dict(caption, conversation or None, and image (3, S, S) in [-1, 1]
# or pix/sem codes (h, w, D) from a code shard)

class ShapesSource:
    # the embedded benchmark, drawn at random (with replacement) from its first n training images;
    # the state is the generator's, so a resumed run draws exactly what the straight run would have.
    # qa_turns > 1: each understanding conversation asks that many of the six question types about
    # its image, in random order (one image read, several answers learned from it)
    def __init__(self, n, generator, qa_turns=1):
        self.n, self.gen, self.qa_turns = n, generator, qa_turns

    def take(self, k):
        out = []
        for i in torch.randint(self.n, (k,), generator=self.gen).tolist():
            s = shapes_sample(i)
            if self.qa_turns > 1:
                qa = [s["qa"][j] for j in torch.randperm(len(s["qa"]), generator=self.gen)[: self.qa_turns]]
            else:
                qa = [s["qa"][i % len(s["qa"])]]  # ShapesDataset's cycle through the types
            out.append(dict(image=to_tensor(s["image"]), caption=s["caption"],
                            conversation=understanding_messages(*qa[0], *qa[1:])))
        return out

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class WebSource:
    # webdataset tar shards of image + caption (e.g. CC12M via img2dataset), streamed by data.py;
    # understanding samples are captioning turns. Resume restarts the stream (not bit-exact).
    def __init__(self, urls, size, resample, seed, num_workers):
        self.ds = WebDataset(urls, size, resample=resample, seed=seed, repeat=True)
        self.ds.check()  # NoSamples in seconds when --data holds nothing readable, before any worker starts
        loader = torch.utils.data.DataLoader(self.ds, batch_size=None, num_workers=num_workers)
        self.it = iter(loader)

    @property
    def stats(self):  # samples read and skipped, by reason (data.STAT_KEYS), over this rank's workers
        return self.ds.stats

    def take(self, k):
        return [dict(image=s["image"], caption=s["caption"], conversation=None)
                for s in (next(self.it) for _ in range(k))]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class LlavaSource:
    # LLaVA-format conversations (data.LlavaDataset: multi-turn, images in user turns, text-only
    # entries too) for the understanding samples, drawn at random with replacement by this source's
    # own generator: its state is all a resumed run needs to draw what the straight run would have
    def __init__(self, path, image_root, size, resample, generator):
        self.ds, self.gen = LlavaDataset(path, image_root, size, resample), generator

    @property
    def stats(self):
        return self.ds.stats

    def take(self, k):
        out = []
        for i in torch.randint(len(self.ds), (k,), generator=self.gen).tolist():
            s = self.ds[i]
            out.append(dict(images=s["images"], conversation=s["messages"]))
        return out

    def state_dict(self):
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])


CODES_FORMAT, CODES_VERSION = "dualtoken-codes", "1"  # code shard metadata, checked on load


def tokenizer_fingerprint(tokenizer):
    # codes mean something only with the codebooks they index: shards record whose codes they hold
    h = hashlib.sha256()
    for cb in (tokenizer.pix_rvq.codebook, tokenizer.sem_rvq.codebook):
        h.update(cb.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def code_shard_files(spec):
    # a directory (its *.safetensors) or a glob pattern
    files = sorted(glob.glob(os.path.join(spec, "*.safetensors")) if os.path.isdir(spec) else glob.glob(spec))
    if not files:
        raise FileNotFoundError(f"no code shards at {spec!r}")
    return files


def read_code_shard_meta(path, fingerprint=None):
    """The metadata of a shard written by `python unified.py extract-codes`, checked: format name,
    version and (given one) the tokenizer fingerprint. One-line errors."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CODES_FORMAT:
        raise ValueError(f"{path}: not a {CODES_FORMAT} shard (format {meta.get('format')!r}); "
                         "write shards with `python unified.py extract-codes`")
    if meta.get("version") != CODES_VERSION:
        raise ValueError(f"{path}: {CODES_FORMAT} version {meta.get('version')!r}, this unified.py reads "
                         f"version {CODES_VERSION}; re-extract with `python unified.py extract-codes`")
    if fingerprint is not None and meta.get("tokenizer") != fingerprint:
        raise ValueError(f"{path}: codes of tokenizer {meta.get('tokenizer')}, but --tokenizer is "
                         f"{fingerprint}; re-extract with this tokenizer")
    return meta


class CodeShards:
    """Pre-extracted code shards, epoch by epoch: shard order shuffled per (seed, epoch), shards
    split over ranks (or, with fewer shards than ranks, the items of each shard), items shuffled
    within a shard. The cursor (epoch, shard, item) is the state, so resume is exact."""

    def __init__(self, spec, fingerprint, seed, rank, world_size):
        self.files = code_shard_files(spec)
        for f in self.files:  # headers only: a bad shard fails at start, not hours in
            read_code_shard_meta(f, fingerprint)
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch = self.shard = self.item = 0
        self._loaded = None

    def _order(self):
        files = list(self.files)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(files)
        return files[self.rank::self.world] if len(files) >= self.world else files

    def _load(self, path):
        if self._loaded is None or self._loaded[0] != (path, self.epoch):
            meta = read_code_shard_meta(path)
            t = load_file(path)
            records = json.loads(meta["records"])
            perm = list(range(len(records)))
            random.Random(f"{self.seed}:{self.epoch}:{os.path.basename(path)}").shuffle(perm)
            if len(self.files) < self.world:
                perm = perm[self.rank::self.world]
            self._loaded = ((path, self.epoch), t["pix"], t["sem"], records, perm)
        return self._loaded[1:]

    def take(self, k):
        out = []
        while len(out) < k:
            order = self._order()
            if self.shard >= len(order):
                self.epoch, self.shard, self.item = self.epoch + 1, 0, 0
                continue
            pix, sem, records, perm = self._load(order[self.shard])
            if self.item >= len(perm):
                self.shard, self.item = self.shard + 1, 0
                continue
            i = perm[self.item]
            self.item += 1
            out.append(dict(pix=pix[i].long(), sem=sem[i].long(), **records[i]))
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "item": self.item}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.item = state["epoch"], state["shard"], state["item"]


class Batcher:
    """Micro-batches of mixed generation / understanding sequences with their targets and codes.
    Images are encoded by the frozen tokenizer here unless the records already carry codes.

    Each sample is generation with probability gen_ratio. Without und_source, both kinds come from
    source (an understanding sample asks about a generation record's image: its conversation, or a
    captioning turn). With und_source (LlavaSource), generation samples come from source and
    understanding samples are und_source's conversations, loss on every assistant turn."""

    def __init__(self, source, enc, config, tokenizer, gen_ratio, caption_drop, batch_size, generator, device,
                 und_source=None):
        self.source, self.und_source, self.enc, self.special = source, und_source, enc, config.special_tokens
        self.tokenizer, self.device = tokenizer, device
        self.gen_ratio, self.caption_drop, self.batch_size, self.gen = gen_ratio, caption_drop, batch_size, generator
        self.n_visual, self.depth, self.max_len = config.grid ** 2, config.rvq_depth, config.llm.max_seq_len

    def next(self):
        def draws():  # (generation?, caption dropped?) per sample
            return [(torch.rand(2, generator=self.gen) < torch.tensor([self.gen_ratio, self.caption_drop])).tolist()
                    for _ in range(self.batch_size)]

        if self.und_source is None:
            records = self.source.take(self.batch_size)  # (before the draws: ShapesSource shares the generator)
            kinds = draws()
        else:
            kinds = draws()  # first: they decide which source each sample comes from
            n_gen = sum(g for g, _ in kinds)
            gen_records = iter(self.source.take(n_gen) if n_gen else [])
            und_records = iter(self.und_source.take(self.batch_size - n_gen) if n_gen < self.batch_size else [])
            records = [next(gen_records) if g else next(und_records) for g, _ in kinds]
        self._encode(records)
        samples = []
        for r, (gen, drop) in zip(records, kinds):
            if gen:
                messages = generation_messages("" if drop else r["caption"])
            else:
                messages = r["conversation"] or understanding_messages(QUESTIONS["caption"], r["caption"])
            ids, mask = encode_chat(self.enc, messages, image_tokens=self.n_visual)
            text, vis = sequence_targets(ids, mask, self.special)
            pix, sem = r["pix"].flatten(0, -2), r["sem"].flatten(0, -2)  # (P, D): every image's positions in order
            if len(ids) > self.max_len:
                # a conversation longer than the context: its first max_len tokens, the codes of the pads
                # they hold, and no target past the cut
                L = self.max_len
                ids, text, vis = ids[:L], text[:L - 1] + [-100], vis[:L - 1] + [-100]
                n = ids.count(self.special["<|image_pad|>"])
                pix, sem = pix[:n], sem[:n]
            samples.append((ids, text, vis, pix, sem))
        batch = collate(samples, self.special["<|endoftext|>"])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _encode(self, records):
        # codes for the records that carry images instead: one tokenizer call for the whole batch
        todo = [(r, r["images"] if "images" in r else [r["image"]]) for r in records if "pix" not in r]
        images = [im for _, ims in todo for im in ims]
        if images:
            pix, sem = self.tokenizer.encode(torch.stack(images).to(self.device))  # (N, h, w, D) each
            pix, sem = pix.flatten(1, 2).cpu(), sem.flatten(1, 2).cpu()  # (N, h·w, D)
        i = 0
        for r, ims in todo:  # a text-only conversation gets (0, D)
            n = len(ims)
            r["pix"] = pix[i:i + n].flatten(0, 1) if n else torch.zeros(0, self.depth, dtype=torch.long)
            r["sem"] = sem[i:i + n].flatten(0, 1) if n else torch.zeros(0, self.depth, dtype=torch.long)
            i += n

    def state_dict(self):
        state = {"generator": self.gen.get_state(), "source": self.source.state_dict()}
        if self.und_source is not None:
            state["understanding"] = self.und_source.state_dict()
        return state

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])
        self.source.load_state_dict(state["source"])
        if self.und_source is not None:
            self.und_source.load_state_dict(state["understanding"])


# ----------------------------------------------------------------------------------------------
# Stage-2 training: python unified.py [--key value ...] | torchrun --nproc_per_node=N unified.py ...

@dataclass
class TrainConfig:
    # The one source of training defaults; flags are generated from these fields (and from
    # UnifiedConfig's ablation/loss/depth-head fields). The paper gives no stage-2 optimization
    # settings: these are LLaVA / VILA-U-like values for a 3B model on 8 GPUs.
    preset: str = ""                 # TRAIN_PRESETS name applied under the flags ("shapes": the CPU demo)
    model: str = "dualtoken-3b"      # UnifiedConfig preset
    llm: str = ""                    # Qwen2.5 HF directory (weights + text tokenizer) or a Qwen2 preset
                                     # name trained from scratch; "" = the model preset's LLM from scratch
    tokenizer: str = ""              # DualTokenizer directory (tokenizer.py save_pretrained); required
    resume: str = ""                 # a checkpoint directory of this script: continue that run exactly
    freeze: str = "none"             # "none", "llm" (train projector + heads) or "heads" (depth heads only)
    # data
    data: str = "shapes"             # "shapes" or webdataset tar shards of image + caption (brace pattern)
    codes: str = ""                  # code shards (dir or glob) instead of encoding images on the fly;
                                     # extract-codes writes its shards to this directory
    n_images: int = 1_000_000        # shapes: draw from the first n training images; extract-codes: how many
    shard_size: int = 4096           # extract-codes: images per shard
    gen_ratio: float = 0.5           # share of generation samples (caption → image); the rest understanding
    llava: str = ""                  # LLaVA-format conversations (.json / .jsonl, e.g. llava_v1_5_mix665k.json):
                                     # the understanding samples; --data / --codes then give generation only
    llava_images: str = ""           # the folder the LLaVA entries' image paths are relative to
    caption_drop: float = 0.1        # generation samples with an empty caption: the unconditional model of CFG
                                     # (shapes demo: 0.3 makes guidance 3 safe, not better, and draws worse; §18)
    qa_turns: int = 1                # shapes: questions per understanding conversation (1..6)
    workers: int = 4                 # DataLoader workers decoding webdataset shards
    # optimization
    batch_size: int = 8              # sequences per micro-batch and rank
    grad_accum: int = 1              # micro-batches per step and rank (the batch is × world size too)
    max_steps: int = 100_000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 1000               # linear warm-up steps, then a half cosine to min_lr (tokenizer.lr_at;
                                     # stage 2 warmed up to lr·(s+1)/(warmup+1) before: ≤ 3 % apart at 30)
    decay_steps: int = 0             # cosine length; 0 = max_steps (a run cut into pieces keeps its schedule)
    weight_decay: float = 0.0        # AdamW, on ≥ 2-D tensors only (tokenizer.make_optimizer)
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0           # 0 disables
    # system
    device: str = "auto"             # "auto" (cuda if available), "cpu", "cuda"
    dtype: str = "bfloat16"          # autocast dtype on CUDA ("float32" turns it off); CPU runs fp32
    compile: bool = False
    grad_checkpointing: bool = False  # recompute the LLM's and the depth heads' block activations in backward
    length_groups: int = 3           # the LLM runs a micro-batch's rows in up to this many groups of similar
                                     # length, their padding not computed (§28); 1 = one padded batch (under
                                     # --fsdp each group gathers the blocks' shards again). Same loss and
                                     # gradients to 1e-6; two shapes runs gave the padded runs' figures (§28)
    fsdp: bool = False               # FSDP2 (fully_shard) instead of DDP, for LLMs that do not fit DDP
    seed: int = 0
    # output
    out_dir: str = "out/unified"
    log_every: int = 10
    ckpt_every: int = 1000


TRAIN_PRESETS = {
    # The CPU demo on the shapes benchmark: 47 min on 2 cores (2 processes × batch 8; §15); lr 1e-3
    # learns fastest (EXPERIMENTS.md, §4). The shipped demo runs --max_steps 5000 (80 min): at 3000 it
    # draws the asked shape half the time, at 5000 four times in five (§16).
    "shapes": dict(model="shapes", data="shapes", n_images=100_000, batch_size=16, max_steps=3000,
                   qa_turns=3, lr=1e-3, min_lr=1e-4, warmup=30, workers=0,
                   out_dir="out/unified-shapes", log_every=50, ckpt_every=250),
}

# UnifiedConfig fields settable from the command line. The code shape comes from the tokenizer,
# the LLM from --llm, the special-token ids from the text tokenizer.
MODEL_FLAGS = tuple(f for f in fields(UnifiedConfig)
                    if f.name not in ("llm", "code_dim", "codebook_size", "rvq_depth", "grid", "special_tokens"))


def parse_args(argv):
    """Flags -> (the TrainConfig fields given, the UnifiedConfig fields given). Every field is a
    `--key value` flag typed from its dataclass; unknown flags are an error."""
    p = _Parser(prog="unified.py", argument_default=argparse.SUPPRESS,
                description="DualToken stage 2: train the unified model (or `unified.py extract-codes ...`)")
    add_flags(p, TrainConfig)
    add_flags(p, UnifiedConfig, {f.name for f in MODEL_FLAGS}, "UnifiedConfig; default: the --model preset's")
    given = vars(p.parse_args(argv))
    model_kw = {f.name: given.pop(f.name) for f in MODEL_FLAGS if f.name in given}
    return given, model_kw


def resolve_train_config(given):
    """TrainConfig from defaults < preset < flags, or, with --resume, from the run's saved
    train_config.json < flags (so `--resume DIR --max_steps 2000` extends a run)."""
    if given.get("resume"):
        if "preset" in given:
            raise UsageError("--preset with --resume: the run's settings come from its checkpoint")
        given["resume"] = resume_dir(given["resume"], verify=False)  # _train verifies it
        path = Path(given["resume"]) / "train_config.json"
        if not path.is_file():
            raise UsageError(f"--resume {given['resume']}: no train_config.json (not a checkpoint of unified.py)")
        with reading(f"--resume {given['resume']}"):  # unknown keys and wrong types, by name
            base = asdict(config_from_dict(TrainConfig, _renamed(read_json(path)), str(path)))
    else:
        base = asdict(TrainConfig())
        preset = given.get("preset", "")
        if preset:
            if preset not in TRAIN_PRESETS:
                raise UsageError(f"unknown preset {preset!r}; known: {', '.join(TRAIN_PRESETS)}")
            base.update(TRAIN_PRESETS[preset])
    base.update(given)
    return check_train_config(TrainConfig(**base))


def _renamed(saved):
    # train_config.json of runs before the stages shared their names (tokenizer.py's): still resumable
    if isinstance(saved, dict):
        saved = dict(saved)
        for old, new in (("warmup_steps", "warmup"), ("lr_decay_steps", "decay_steps"), ("num_workers", "workers")):
            if old in saved:
                saved[new] = saved.pop(old)
        if "beta1" in saved and "beta2" in saved:
            saved["betas"] = (saved.pop("beta1"), saved.pop("beta2"))
        if isinstance(saved.get("betas"), list):
            saved["betas"] = tuple(saved["betas"])
    return saved


def check_train_config(tc):
    """The values of a TrainConfig, checked where it is built (flags, a resumed run's file, Python)."""
    check_training(tc, at_least_1=("n_images", "shard_size", "length_groups"), fractions=("gen_ratio", "caption_drop"))
    if tc.freeze not in ("none", "llm", "heads"):
        raise UsageError(f"--freeze {tc.freeze!r}: choose from 'none', 'llm', 'heads'")
    if not 1 <= tc.qa_turns <= len(QUESTIONS):
        raise UsageError(f"--qa_turns {tc.qa_turns}: between 1 and {len(QUESTIONS)} (the question types)")
    if bool(tc.llava) != bool(tc.llava_images):
        raise UsageError("--llava FILE and --llava_images DIR go together")
    return tc


def resume_dir(path, verify=True):
    """--resume DIR: a step-N/ checkpoint, or a run's out_dir (its newest step-N/) -> the step-N/
    directory, checked against its manifest with verify (tokenizer.py, "On disk": a mixed or
    half-written one is refused in one line). A step-N/ of the older layout has no manifest and is
    taken as it is."""
    path = str(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        if verify:
            verify_checkpoint(path)
        return path
    if os.path.isfile(os.path.join(path, "train_config.json")):
        return path
    found = latest_checkpoint(path, verify)
    if found is None:
        raise UsageError(f"--resume {path}: no checkpoint (step-N/ directory) there")
    return found


def build_config(tc, model_kw, tokenizer):
    """The UnifiedConfig of a new run: the --model preset, the code shape of the tokenizer, the LLM
    of --llm and the special-token ids of the text tokenizer, then the model flags."""
    if tc.model not in UNIFIED_PRESETS:
        raise UsageError(f"unknown model preset {tc.model!r}; known: {', '.join(UNIFIED_PRESETS)}")
    kw = {**copy.deepcopy(UNIFIED_PRESETS[tc.model]), **model_kw}
    if tc.llm in PRESETS:
        kw["llm"] = Qwen2Config.preset(tc.llm)
    elif tc.llm:
        model_dir("--llm", tc.llm, f" and not a Qwen2 preset ({', '.join(PRESETS)})")
        with reading(f"--llm {tc.llm}"):  # a tokenizer's or SigLIP's directory, say, in one line
            kw["llm"] = Qwen2Config.from_hf_file(os.path.join(tc.llm, "config.json"))
        kw.setdefault("text_tokenizer", tc.llm)  # Qwen2.5 directories ship their tokenizer
    t = tokenizer.config
    kw.update(code_dim=t.code_dim, codebook_size=t.codebook_size, rvq_depth=t.depth, grid=t.siglip.grid)
    if kw.get("text_tokenizer") is None:
        raise UsageError("no text tokenizer: pass --llm DIR (a Qwen2.5 directory) or --text_tokenizer")
    with reading(f"--text_tokenizer {kw['text_tokenizer']}"):
        kw["special_tokens"] = text_tokenizer_ids(load_text_tokenizer(kw["text_tokenizer"]))
    with reading("model flags"):
        return UnifiedConfig(**kw)


def _load_tokenizer(tc, device):
    if not tc.tokenizer:
        raise UsageError("--tokenizer DIR is required: the DualTokenizer the codes come from")
    with reading(f"--tokenizer {model_dir('--tokenizer', tc.tokenizer)}"):
        tokenizer = DualTokenizer.from_pretrained(tc.tokenizer, device=device)
    tokenizer.requires_grad_(False)
    return tokenizer


def train(tc, model_kw=None):
    """Run stage 2 with TrainConfig tc (model_kw: UnifiedConfig fields for a new run) -> the trained
    UnifiedModel (unwrapped). Under torchrun each process trains its rank's share (DDP or FSDP2)."""
    env = setup(check_train_config(tc))  # stage 1's: torchrun's RANK, the device, autocast
    try:
        return _train(tc, model_kw or {}, env)
    finally:
        if env.ddp:
            dist.destroy_process_group()


def _train(tc, model_kw, env):
    rank, world, device = env.rank, env.world, env.device
    master, distributed = env.master, world > 1
    say = tqdm.write if master else (lambda *a, **k: None)
    tokenizer = _load_tokenizer(tc, device)

    # --- model: new (preset / Qwen2.5 directory + the tokenizer's codebooks) or resumed
    torch.manual_seed(tc.seed)  # the same initial weights on every rank (FSDP2 does not broadcast)
    if tc.resume:
        if model_kw:
            raise UsageError(f"model flags {sorted(model_kw)} with --resume: the model comes from the checkpoint")
        ckpt = resume_dir(tc.resume)
        with reading(f"--resume {ckpt}"):
            model = UnifiedModel.from_pretrained(ckpt, device)
        if not (torch.equal(model.pix_codebook, tokenizer.pix_rvq.codebook[0])
                and torch.equal(model.sem_codebook, tokenizer.sem_rvq.codebook[0])):
            raise UsageError(f"--tokenizer is not the tokenizer of the run in {ckpt}")
    else:
        config = build_config(tc, model_kw, tokenizer)
        check_fits(build_on_meta(UnifiedModel, config, "the model config"), str(device))  # before any allocation
        with reading(f"--llm {tc.llm}"):
            llm = Qwen2.from_pretrained(tc.llm, dtype=torch.float32) if tc.llm and tc.llm not in PRESETS else None
        model = UnifiedModel.from_tokenizer(config, tokenizer, llm)
    config = model.config
    enc = load_text_tokenizer(config.text_tokenizer)
    if text_tokenizer_ids(enc) != config.special_tokens:
        raise ValueError("the text tokenizer's special-token ids differ from the model config's")
    model.to(device).train()
    if tc.freeze != "none":
        model.requires_grad_(False)
        keep = [model.pix_head, model.sem_head] + ([model.projector] if tc.freeze == "llm" else [])
        for m in keep:
            if m is not None:
                m.requires_grad_(True)
        if tc.freeze == "llm" and model.grid_pos is not None:
            model.grid_pos.requires_grad_(True)  # an input embedding of the visual positions, like the projector
    for part in (model.llm, model.pix_head, model.sem_head):  # the LLM's blocks and the depth heads' layers
        if part is not None:
            part.grad_checkpointing = tc.grad_checkpointing
    raw = model  # saved from here: unwrapped and uncompiled
    if tc.fsdp:
        mesh = init_device_mesh(device.type, (world,))
        # one unit per transformer block (LLM and depth heads); embeddings, projector, the heads'
        # input projections and classifiers form the root unit
        heads = [h for h in (model.pix_head, model.sem_head) if h is not None]
        for block in [*model.llm.layers, *(b for h in heads for b in h.layers)]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if tc.compile:
        model = torch.compile(model)  # before the DDP wrap, as nanoGPT does
    if distributed and not tc.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    opt = make_optimizer(raw, tc, fused=device.type == "cuda")  # stage 1's AdamW groups
    params = [p for g in opt.param_groups for p in g["params"]]

    # --- data
    gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + rank)  # each rank its own draws
    if tc.codes:
        with reading(f"--codes {tc.codes}"):
            source = CodeShards(tc.codes, tokenizer_fingerprint(tokenizer), tc.seed, rank, world)
    elif tc.data == "shapes":
        source = ShapesSource(tc.n_images, gen, tc.qa_turns)
    else:
        s = tokenizer.config.siglip
        source = WebSource(tc.data, s.image_size, s.resample, tc.seed, tc.workers)
    und = None
    if tc.llava:
        s = tokenizer.config.siglip
        und_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + rank + 500_009)  # apart from the batcher's
        with reading(f"--llava {tc.llava}"):
            und = LlavaSource(tc.llava, tc.llava_images, s.image_size, s.resample, und_gen)
    batcher = Batcher(source, enc, config, tokenizer, tc.gen_ratio, tc.caption_drop, tc.batch_size, gen, device, und)

    step = 0
    if tc.resume:
        state = read_train_state(os.path.join(ckpt, "train_state.pt"))
        if state["world_size"] != world:
            raise UsageError(f"{ckpt} was written by {state['world_size']} ranks, this run has {world}")
        step = state["step"]
        set_optimizer_state_dict(raw, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        batcher.load_state_dict(state["data"][rank])

    use_autocast, ctx = device.type == "cuda" and tc.dtype != "float32", env.ctx
    say(f"unified: {raw.num_params() / 1e6:.2f}M parameters ({sum(p.numel() for p in params) / 1e6:.2f}M "
        f"trained), {world} rank(s) on {device}{' autocast ' + tc.dtype if use_autocast else ''}, "
        f"batch {tc.batch_size}×{tc.grad_accum}×{world}, steps {step}→{tc.max_steps}")

    # log figures as sums over target positions, so a micro-batch with few (or no) generation samples
    # weighs what it holds: [text CE·n, pix CE·m (D), sem CE·m (D), n, m, tokens]
    D = config.rvq_depth
    acc, t0 = torch.zeros(4 + 2 * D, dtype=torch.float64), time.time()
    bar = tqdm(total=tc.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    first = step + 1
    while step < tc.max_steps:
        lr = lr_at(tc, step)
        for g in opt.param_groups:
            g["lr"] = lr
        for micro in range(tc.grad_accum):
            b = batcher.next()
            sync = micro == tc.grad_accum - 1  # all-reduce gradients only on the last micro-batch
            if isinstance(model, DDP):
                model.require_backward_grad_sync = sync
            elif tc.fsdp:
                raw.set_requires_gradient_sync(sync)
            with ctx:
                _, losses = model(b["ids"], b["pix_codes"], b["sem_codes"], b["text_targets"], b["vis_targets"],
                                  b["lengths"], tc.length_groups)
            (losses["loss"] / tc.grad_accum).backward()
            n, m = (b["text_targets"] != -100).sum(), (b["vis_targets"] != -100).sum()
            sem = losses["sem"] if losses["sem"] is not None else torch.zeros_like(losses["pix"])
            acc += torch.cat((losses["text"][None] * n, losses["pix"] * m, sem * m,
                              torch.stack((n, m)).float(), b["lengths"].sum()[None].float())
                             ).detach().double().cpu()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % tc.log_every == 0 or step in (first, tc.max_steps):
            if distributed:  # sums over ranks
                acc = acc.to(device)
                dist.all_reduce(acc)
                acc = acc.cpu()
            n, m = acc[-3].clamp(min=1), acc[-2].clamp(min=1)
            text, pix, sem = (acc[0] / n).item(), acc[1:1 + D] / m, acc[1 + D:1 + 2 * D] / m
            loss = total_loss(config, text, pix, sem if raw.sem_head is not None else None).item()
            rate = acc[-1].item() / (time.time() - t0)
            say(f"step {step}: loss {loss:.3f} | text {text:.3f} | pix " + " ".join(f"{x:.3f}" for x in pix)
                + (" | sem " + " ".join(f"{x:.3f}" for x in sem) if raw.sem_head is not None else "")
                + f" | lr {lr:.2e} | {rate:,.0f} tok/s"
                + (" | data " + " ".join(f"{k}={v}" for k, v in source.stats.items() if v)
                   if hasattr(source, "stats") else ""))
            acc, t0 = torch.zeros_like(acc), time.time()
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            path = save_checkpoint(tc.out_dir, raw, opt, tokenizer, batcher, tc, step, env)
            say(f"saved {path}")
    bar.close()
    return raw


def save_checkpoint(out_dir, raw, opt, tokenizer, batcher, tc, step, env):
    """out_dir/step-NNNNNN/, written atomically (tokenizer.write_checkpoint): a save_pretrained
    directory (what sample.py needs) + train_state.pt (step, optimizer, every rank's data RNG /
    cursor) + train_config.json -> its path. Collective under torch.distributed."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    world, fsdp = env.world, tc.fsdp
    model_sd = get_model_state_dict(raw, options=options) if fsdp else None  # gathered on rank 0
    optim_sd = get_optimizer_state_dict(raw, opt, options=options)
    data = [batcher.state_dict()]
    if world > 1:
        data = [None] * world
        dist.all_gather_object(data, batcher.state_dict())
    path = Path(out_dir) / f"step-{step:06d}"
    if world > 1 and not fsdp:  # DDP keeps every rank's copy equal, bit for bit (FSDP holds shards)
        check_ranks_in_sync(env, synced_tensors(raw))
    if env.master:
        state = {"step": step, "optimizer": optim_sd, "data": data, "world_size": world}
        write_checkpoint(out_dir, step, [
            ("model", lambda d: raw.save_pretrained(d, tokenizer, state_dict=model_sd)),
            ("train_state", lambda d: torch.save(state, Path(d) / "train_state.pt")),
            ("train_config", lambda d: (Path(d) / "train_config.json").write_text(json.dumps(asdict(tc), indent=2) + "\n"))])
    if world > 1:
        dist.barrier()  # the directory is complete before any rank moves on (or exits)
    return path


# ----------------------------------------------------------------------------------------------
# python unified.py extract-codes --tokenizer DIR --codes OUT_DIR [--data shapes|SHARDS] [--n_images N]

@torch.no_grad()
def extract_codes(tc):
    """Encode the images of --data once with the frozen tokenizer into versioned code shards
    (safetensors: pix, sem (N, h, w, D) int16/int32; metadata: format, version, tokenizer
    fingerprint, the records' captions and conversations as JSON)."""
    device = "cuda" if (torch.cuda.is_available() if tc.device == "auto" else tc.device.startswith("cuda")) else "cpu"
    tokenizer = _load_tokenizer(tc, device)
    if not tc.codes:
        raise UsageError("--codes DIR: where to write the shards")
    out = Path(writable_dir("--codes", tc.codes))
    if tc.data == "shapes":
        ds = ShapesDataset(tc.n_images)
        items = ({"image": s["image"], "caption": s["caption"],
                  "conversation": understanding_messages(s["question"], s["answer"])} for s in map(ds.__getitem__, range(len(ds))))
    else:
        s = tokenizer.config.siglip
        ds = WebDataset(tc.data, s.image_size, resample=s.resample, shuffle=0, seed=tc.seed, rank=0, world_size=1)
        ds.check()
        items = ({"image": x["image"], "caption": x["caption"], "conversation": None}
                 for x in itertools.islice(ds, tc.n_images))
    dtype = torch.int16 if tokenizer.config.codebook_size <= 2**15 else torch.int32
    meta = {"format": CODES_FORMAT, "version": CODES_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer)}
    shard, n_shards, n = {"pix": [], "sem": [], "records": []}, 0, 0

    def flush():
        nonlocal shard, n_shards
        tensors = {k: torch.cat(shard[k]).to(dtype).contiguous() for k in ("pix", "sem")}
        save_file(tensors, out / f"codes-{n_shards:05d}.safetensors",
                  metadata={**meta, "records": json.dumps(shard["records"])})
        shard, n_shards = {"pix": [], "sem": [], "records": []}, n_shards + 1

    bar = tqdm(total=tc.n_images if tc.data == "shapes" else None, desc="extract-codes")
    while batch := list(itertools.islice(items, tc.batch_size)):
        pix, sem = tokenizer.encode(torch.stack([x["image"] for x in batch]).to(device))
        for i, x in enumerate(batch):
            shard["pix"].append(pix[i:i + 1].cpu())
            shard["sem"].append(sem[i:i + 1].cpu())
            shard["records"].append({"caption": x["caption"], "conversation": x["conversation"]})
            n += 1
            if len(shard["records"]) == tc.shard_size:
                flush()
        bar.update(len(batch))
    if shard["records"]:
        flush()
    bar.close()
    skipped = "".join(f" {k}={v}" for k, v in ds.stats.items() if v) if tc.data != "shapes" else ""
    print(f"extract-codes: {n} images -> {n_shards} shards in {out} (tokenizer {meta['tokenizer']})"
          + (f"; data{skipped}" if skipped else ""))


def _require_checkpoint(path, command):
    # a user's wrong directory is one line naming what is missing, not a traceback from deep in loading
    model_dir(command, path)
    for f in ("config.json", "model.safetensors", "tokenizer/config.json"):
        if not (Path(path) / f).is_file():
            raise UsageError(f"{command} {path}: no {f} (not a checkpoint written by unified.py)")
    with reading(f"{command} {path}"):
        return load_pretrained(path)


def same_codes(old, new, dtype):
    """`new` if it gives the codes `old` gives — the same config and every tensor before the codes
    (ViT, projections, codebooks) equal as stored in `dtype` — else a ValueError naming the first
    difference. Only the pixel decoder may differ: a model trained on `old`'s codes reads `new`'s."""
    if new.config != old.config:
        raise ValueError("another tokenizer config, not the same tokenizer with another decoder")
    a, b = old.state_dict(), new.state_dict()
    for k, v in a.items():
        if k.split(".")[0] in DualTokenizer.DECODER_PARTS:
            continue
        if not torch.equal(_stored(v, dtype), _stored(b[k], dtype)):
            raise ValueError(f"{k} differs from the checkpoint's tokenizer: its codes would differ "
                             "(only the pixel decoder may change: tokenizer.py --decoder_only --init ...)")
    return new


def export(argv):
    """python unified.py export SRC DST [--dtype bfloat16] [--tokenizer_dtype D] [--sample_cfg S]
    [--sample_temperature T] [--tokenizer DIR]: copy a checkpoint directory (a training run's out_dir)
    to what sample.py loads — model, tokenizer, text tokenizer; no optimizer state — with floating
    tensors stored in --dtype (the tokenizer's in --tokenizer_dtype, default the same), optionally new
    text → image sampling defaults in its config, and optionally SRC's tokenizer with another pixel
    decoder (tokenizer.py --decoder_only). The shipped demo checkpoint is made this way."""
    p = _Parser(prog="unified.py export", description=export.__doc__)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--tokenizer_dtype", choices=("bfloat16", "float16", "float32"),
                   help="the tokenizer's storage dtype (default: --dtype)")
    p.add_argument("--sample_cfg", type=float, help="sample.py's default guidance scale (≥ 0)")
    p.add_argument("--sample_temperature", type=float, help="sample.py's default temperature (≥ 0)")
    p.add_argument("--tokenizer", help="a tokenizer directory to write instead of SRC's: SRC's with another "
                                       "pixel decoder (tokenizer.py --decoder_only), codes unchanged")
    a = p.parse_args(argv)
    model, _, tokenizer = _require_checkpoint(a.src, "export")
    tok_dtype = a.tokenizer_dtype or a.dtype
    if a.tokenizer is not None:
        model_dir("export --tokenizer", a.tokenizer)
        with reading(f"export --tokenizer {a.tokenizer}"):
            tokenizer = same_codes(tokenizer, DualTokenizer.from_pretrained(a.tokenizer), getattr(torch, tok_dtype))
    sampling = {k: getattr(a, k) for k in ("sample_cfg", "sample_temperature") if getattr(a, k) is not None}
    with reading("export"):  # replace() re-runs UnifiedConfig's checks (≥ 0, finite)
        model.config = replace(model.config, **sampling)
    writable_dir("export DST", a.dst)
    model.save_pretrained(a.dst, tokenizer=tokenizer, dtype=getattr(torch, a.dtype),
                          tokenizer_dtype=getattr(torch, tok_dtype))
    size = sum(f.stat().st_size for f in Path(a.dst).rglob("*") if f.is_file())
    dtypes = a.dtype if tok_dtype == a.dtype else f"{a.dtype}, tokenizer {tok_dtype}"
    print(f"wrote {a.dst} ({size / 2**20:.1f} MiB = {size / 1e6:.1f} MB, {dtypes})")


@torch.no_grad()
def input_norms(model, enc, tokenizer, n_images=64, seed=0):
    """The mean L2 norm of each kind of LLM input on n held-out shapes samples -> dict: "text" (the
    caption tokens' embeddings), "visual" (the visual projector's outputs, §3.3), "grid_pos" (the
    grid-position embedding's rows, if any), "visual_input" (what the LLM reads at an image
    position: projector + grid position). EXPERIMENTS.md §6 quotes these for --projector_norm and
    --grid_pos_init."""
    dev = model.pix_codebook.device
    samples = [shapes_sample(i, seed=seed, split="heldout") for i in range(n_images)]
    size, resample = tokenizer.config.siglip.image_size, tokenizer.config.siglip.resample
    x = torch.stack([to_tensor(s["image"], size, resample) for s in samples]).to(dev)
    pix, sem = tokenizer.encode(x)  # (N, h, w, D) each
    D = pix.shape[-1]
    pix, sem = pix.reshape(-1, D), sem.reshape(-1, D)  # (N·P, D), row-major positions per image
    P = model.config.grid ** 2
    positions = torch.arange(P, device=dev).repeat(n_images)
    ids = torch.tensor([t for s in samples for t in enc.encode(s["caption"])], device=dev)
    out = {"text": model.llm.tok_embeddings(ids).norm(dim=-1).mean().item(),
           "visual": model.projector(model.visual_features(pix, sem)).norm(dim=-1).mean().item()}
    if model.grid_pos is not None:
        out["grid_pos"] = model.grid_pos.norm(dim=-1).mean().item()
    out["visual_input"] = model.visual_embed(pix, sem, positions).norm(dim=-1).mean().item()
    return out


def norms(argv):
    """python unified.py norms CKPT [--n_images N]: print input_norms of a checkpoint directory."""
    p = _Parser(prog="unified.py norms", description=norms.__doc__)
    p.add_argument("ckpt")
    p.add_argument("--n_images", type=int, default=64)
    a = p.parse_args(argv)
    if a.n_images < 1:
        raise UsageError(f"norms --n_images must be at least 1, got {a.n_images}")
    model, enc, tokenizer = _require_checkpoint(a.ckpt, "norms")
    r = input_norms(model, enc, tokenizer, a.n_images)
    print(f"mean L2 norm of the LLM inputs over {a.n_images} held-out shapes samples: "
          + "  ".join(f"{k} {v:.2f}" for k, v in r.items()))
    return r


def main(argv):
    command = "train"
    if argv and argv[0] == "export":
        return export(argv[1:])
    if argv and argv[0] == "norms":
        return norms(argv[1:])
    if argv and argv[0] == "extract-codes":
        command, argv = "extract-codes", argv[1:]
    given, model_kw = parse_args(argv)
    tc = resolve_train_config(given)
    if command == "extract-codes":
        if model_kw:
            raise UsageError(f"extract-codes takes no model flags ({sorted(model_kw)})")
        extract_codes(tc)
    else:
        writable_dir("--out_dir", tc.out_dir)  # before any work that could not be saved
        train(tc, model_kw)


if __name__ == "__main__":
    run_main("unified.py", main)
