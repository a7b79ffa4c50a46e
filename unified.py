"""
The stage-2 unified model of DualToken (arXiv 2503.14324, §3.3), starting with its LLM.

This part is Qwen2.5 (the paper's backbone is Qwen2.5-3B) in plain PyTorch: a decoder-only
transformer with RMSNorm, half-split rotary embeddings, grouped-query attention with biased q/k/v
projections, and a SwiGLU MLP. It loads Hugging Face `Qwen2ForCausalLM` checkpoints (one file or
sharded, tied or untied embeddings, bf16 or fp32) strictly through an explicit key map, and
generates with a static, preallocated KV cache (gpt-fast style: one small module of buffers per
layer, positions passed in as a tensor).

The unified model built on top of it reads the LLM's final hidden states through `Qwen2.hidden`,
feeds image positions in through `input_embeds`, and runs classifier-free guidance by setting the
cache up for a batch of [cond; uncond] rows.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


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

    def update(self, input_pos, k, v):
        # input_pos (T,), k and v (B, n_kv, T, hs) -> the whole cache, (B, n_kv, S, hs) each
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"batch of {k.shape[0]} rows but the cache was set up for {self.k.shape[0]}")
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


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

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hs)
        # GQA: query head h reads K/V head h // (n_head // n_kv_head), as HF repeat_kv does
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        if mask is None:  # training / full-sequence path: plain causal, lets SDPA pick a fused kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hs)
        return self.wo(y)


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

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos)
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
        of max_seq_len positions. Afterwards, calls with input_pos read and write it."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        c = self.config
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, max_seq_len, c.n_kv_head, c.head_dim, dtype, device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.kv_cache = None

    # --- forward

    def hidden(self, idx=None, input_embeds=None, input_pos=None, key_mask=None):
        """Final hidden states (after the last RMSNorm), (B, T, dim).

        Input is token ids idx (B, T) or embeddings input_embeds (B, T, dim) (image positions of
        the unified model), exactly one of them. Without input_pos: the whole sequence from
        position 0, causal, no cache. With input_pos (T,) long: the positions of these T inputs;
        their keys/values are written to the cache set up by setup_cache, and they attend to every
        cached slot at or before their position. key_mask (B, T) without a cache or (B, S) with
        one marks padding slots False (see attention_mask).
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
            mask = attention_mask(pos, cache.k.shape[2], key_mask)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)  # (T, hs) each
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
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
            h = self.hidden(idx, input_pos=torch.arange(T, device=idx.device))
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
                h = self.hidden(nxt[:, None], input_pos=torch.tensor([t], device=idx.device))
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

    def load_hf_state_dict(self, sd, assign=False):
        """Load an HF-keyed state dict strictly: every key present, none unexpected, every shape
        equal. assign=True takes the tensors as they are (for a model built on the meta device)."""
        key_map, own = self.hf_key_map(), self.state_dict()
        missing = [k for k in key_map if k not in sd]
        unexpected = [k for k in sd if k not in key_map]
        if missing or unexpected:
            hint = ""
            if "lm_head.weight" in unexpected and self.lm_head is None:
                hint = " (lm_head.weight in a checkpoint whose config ties the embeddings)"
            if "lm_head.weight" in missing:
                hint = " (no lm_head.weight: is the checkpoint tied while config.json says untied?)"
            raise ValueError(f"checkpoint does not match {self.config}: {len(missing)} missing "
                             f"{missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}{hint}")
        bad = [f"{k} (ours {ours}): checkpoint shape {tuple(sd[k].shape)}, "
               f"model shape {tuple(own[ours].shape)}"
               for k, ours in key_map.items() if sd[k].shape != own[ours].shape]
        if bad:
            raise ValueError("shape mismatch:\n  " + "\n  ".join(bad))
        self.load_state_dict({ours: sd[k].to(own[ours].dtype) for k, ours in key_map.items()},
                             strict=True, assign=assign)

    def hf_state_dict(self):
        own = self.state_dict()
        return {k: own[ours] for k, ours in self.hf_key_map().items()}

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """A Qwen2 from an HF directory: config.json + model.safetensors, or shards listed in
        model.safetensors.index.json. dtype None keeps the checkpoint's (that of its embedding)."""
        path = Path(path)
        config = Qwen2Config.from_hf(json.loads((path / "config.json").read_text()))
        sd = load_safetensors(path)
        dtype = dtype or sd.get("model.embed_tokens.weight", next(iter(sd.values()))).dtype
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = cls(config).to(dtype)
        model.load_hf_state_dict(sd, assign=True)
        return model

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
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(load_file(path / shard))
        if set(sd) != set(weight_map):
            raise ValueError(f"{index}: shards hold {sorted(set(sd) - set(weight_map))} not in the "
                             f"weight_map, and lack {sorted(set(weight_map) - set(sd))}")
        return sd
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
