import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unified import Qwen2, Qwen2Config, load_safetensors, sample_logits  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import Qwen2Config as HFQwen2Config  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

# The fields of Qwen2.5-3B's config.json as published on the Hugging Face hub (transformers 4
# layout: rope_theta at the top level, sliding window present but switched off).
QWEN25_3B_CONFIG_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 32768, "max_window_layers": 36,
    "model_type": "qwen2", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
# the other two sizes differ only in these fields; (name, overrides, parameter count on the model card)
QWEN25_SIZES = [
    ("qwen2.5-0.5b", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, max_window_layers=21), 494_032_768),
    ("qwen2.5-1.5b", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, max_window_layers=21), 1_543_714_304),
    ("qwen2.5-3b", dict(), 3_085_938_688),
]

VOCAB = 96


def tiny_hf_config(tied):
    # GQA (4 query heads over 2 K/V heads); theta and eps differ from both our and HF's defaults so
    # a value that is not read from config.json shows up as a mismatch
    return HFQwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """HF Qwen2ForCausalLM checkpoints saved by transformers, built on demand and reused."""
    cache = {}

    def get(tied=False, sharded=False, dtype=torch.float32):
        key = (tied, sharded, dtype)
        if key not in cache:
            torch.manual_seed(len(cache))
            hf = Qwen2ForCausalLM(tiny_hf_config(tied)).to(dtype)
            path = tmp_path_factory.mktemp("qwen2")
            hf.save_pretrained(path, max_shard_size="20KB" if sharded else "5GB")
            cache[key] = path
        return cache[key]
    return get


def load_hf(path):
    # the reference: transformers itself, fp32, eval, eager attention
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# ----------------------------------------------------------------------------------------------
# config

def test_config_from_hf_reads_the_published_qwen25_configs_as_the_presets():
    for name, overrides, _ in QWEN25_SIZES:
        assert Qwen2Config.from_hf({**QWEN25_3B_CONFIG_JSON, **overrides}) == Qwen2Config.preset(name)
    assert Qwen2Config() == Qwen2Config.preset("qwen2.5-3b")
    c = Qwen2Config()
    assert (c.dim, c.intermediate_size, c.n_layer, c.n_head, c.n_kv_head, c.head_dim) == \
        (2048, 11008, 36, 16, 2, 128)
    assert (c.vocab_size, c.rope_theta, c.norm_eps, c.tie_embeddings, c.max_seq_len) == \
        (151936, 1e6, 1e-6, True, 32768)
    with pytest.raises(ValueError, match="qwen2.5-3b"):  # exact names only; the error lists them
        Qwen2Config.preset("Qwen2.5-3B")


def test_config_from_hf_reads_transformers5_layout_and_round_trips(checkpoints):
    path = checkpoints(tied=True)
    hf = json.loads((path / "config.json").read_text())
    assert "rope_theta" not in hf and hf["rope_parameters"]["rope_theta"] == 50000.0  # v5 nests it
    c = Qwen2Config.from_hf(hf)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.n_kv_head, c.head_dim) == \
        (50000.0, 1e-5, True, 2, 16)
    assert Qwen2Config.from_hf(c.to_hf()) == c
    shapes = Qwen2Config.preset("shapes")
    assert Qwen2Config.from_hf(shapes.to_hf()) == shapes and shapes.vocab_size >= 256 + 22


def test_config_from_hf_refuses_what_it_cannot_run():
    for bad in ({"use_sliding_window": True}, {"rope_scaling": {"type": "yarn", "factor": 4.0}},
                {"hidden_act": "gelu"}):
        with pytest.raises(ValueError):
            Qwen2Config.from_hf({**QWEN25_3B_CONFIG_JSON, **bad})


# ----------------------------------------------------------------------------------------------
# parity with transformers

@pytest.mark.parametrize("tied,sharded,dtype", [
    (False, False, torch.float32), (True, False, torch.float32),
    (False, True, torch.bfloat16), (True, True, torch.bfloat16),
])
def test_logits_hidden_and_loss_match_transformers(checkpoints, tied, sharded, dtype):
    path = checkpoints(tied, sharded, dtype)
    assert (path / "model.safetensors.index.json").exists() == sharded
    assert not (path / "model.safetensors").exists() or not sharded
    assert load_safetensors(path)["model.norm.weight"].dtype == dtype
    ref, ours = load_hf(path), Qwen2.from_pretrained(path, dtype=torch.float32)
    assert (ours.lm_head is None) == tied
    assert ours.num_params() == ref.num_parameters()

    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, 33))
    labels = idx.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        out = ref(idx, labels=labels, output_hidden_states=True)
        # our targets are aligned with the logits (already shifted), HF shifts labels itself
        logits, loss = ours(idx, targets=F.pad(labels[:, 1:], (0, 1), value=-100))
        h = ours.hidden(idx)
        logits_from_embeds, no_loss = ours(input_embeds=ours.tok_embeddings(idx))
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(h, out.hidden_states[-1], atol=1e-4, rtol=0)  # after the final norm
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_from_embeds, logits, atol=0, rtol=0)
    assert no_loss is None


def test_from_pretrained_keeps_the_checkpoint_dtype_by_default(checkpoints):
    path = checkpoints(tied=True, sharded=True, dtype=torch.bfloat16)
    ours = Qwen2.from_pretrained(path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    stored = load_file(next(path.glob("model-*.safetensors")))
    k, v = next(iter(stored.items()))
    assert torch.equal(ours.hf_state_dict()[k], v)


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generate_reproduces_transformers_for_64_steps(checkpoints, tied):
    path = checkpoints(tied=tied)
    ref, ours = load_hf(path), Qwen2.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 7))
    # an explicit all-ones attention_mask: otherwise HF infers padding from pad_token_id in the prompt
    expected = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=64, min_new_tokens=64,
                            do_sample=False, pad_token_id=0)
    got = ours.generate(idx, max_new_tokens=64)
    assert got.shape == (2, 7 + 64)
    assert torch.equal(got, expected)
    assert ours.layers[0].attn.kv_cache is None  # generate releases its cache


def test_save_pretrained_is_read_by_transformers_and_by_from_pretrained(tmp_path):
    torch.manual_seed(0)
    # head_dim set apart from dim // n_head: config.json must carry it for HF to build the same shapes
    ours = Qwen2(Qwen2Config(vocab_size=VOCAB, dim=64, intermediate_size=112, n_layer=2, n_head=4,
                             n_kv_head=2, head_dim=24, tie_embeddings=False, rope_theta=20000.0))
    ours.save_pretrained(tmp_path)
    ref, back = load_hf(tmp_path), Qwen2.from_pretrained(tmp_path)
    idx = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# KV cache and causality

def test_cached_logits_equal_full_prefix_recomputation(checkpoints):
    ours = Qwen2.from_pretrained(checkpoints(tied=True), dtype=torch.float32)
    torch.manual_seed(2)
    seq = torch.randint(0, VOCAB, (2, 24))
    ours.setup_cache(batch_size=2, max_seq_len=32)
    with torch.no_grad():
        # prefill from embeddings (how image positions enter), then a chunk, then one token a step
        h = ours.hidden(input_embeds=ours.tok_embeddings(seq[:, :10]), input_pos=torch.arange(10))
        torch.testing.assert_close(ours.head(h), ours(seq[:, :10])[0], atol=1e-4, rtol=0)
        chunk, _ = ours(seq[:, 10:15], input_pos=torch.arange(10, 15))
        torch.testing.assert_close(chunk, ours(seq[:, :15])[0][:, 10:], atol=1e-4, rtol=0)
        for t in range(15, 24):
            step, _ = ours(seq[:, t:t + 1], input_pos=torch.tensor([t]))
            full, _ = ours(seq[:, :t + 1])  # uncached: no input_pos, the cache is not touched
            torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-4, rtol=0)
    ours.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        ours(seq[:, :1], input_pos=torch.tensor([0]))


def test_cfg_style_batch_with_left_padding_matches_each_row_alone(checkpoints):
    # a [cond; uncond] batch: the unconditional prompt is shorter and left-padded, and the same
    # sampled token is then written to both rows
    ours = Qwen2.from_pretrained(checkpoints(tied=False), dtype=torch.float32)
    torch.manual_seed(3)
    cond, uncond, pad = torch.randint(0, VOCAB, (1, 12)), torch.randint(0, VOCAB, (1, 7)), 5
    batch = torch.cat((cond, F.pad(uncond, (pad, 0), value=0)))  # (2, 12)
    S = 16
    key_mask = torch.ones(2, S, dtype=torch.bool)
    key_mask[1, :pad] = False
    ours.setup_cache(batch_size=2, max_seq_len=S)
    with torch.no_grad():
        logits, _ = ours(batch, input_pos=torch.arange(12), key_mask=key_mask)
        uncached, _ = ours(batch, key_mask=key_mask[:, :12])
        torch.testing.assert_close(logits[0], ours(cond)[0][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(logits[1, pad:], ours(uncond)[0][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(uncached[:, pad:], logits[:, pad:], atol=1e-4, rtol=0)
        assert torch.isfinite(logits).all()  # padding rows too: none is fully masked
        new = torch.randint(0, VOCAB, (1, 4))
        for i in range(4):
            step, _ = ours(new[:, i:i + 1].expand(2, 1), input_pos=torch.tensor([12 + i]), key_mask=key_mask)
            for row, prompt in enumerate((cond, uncond)):
                alone, _ = ours(torch.cat((prompt, new[:, :i + 1]), dim=1))
                torch.testing.assert_close(step[row, -1], alone[0, -1], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="set up for 2"):
            ours(cond[:, :1], input_pos=torch.tensor([12]))
    ours.clear_cache()


def test_output_at_p_ignores_every_later_position(checkpoints):
    ours = Qwen2.from_pretrained(checkpoints(tied=True), dtype=torch.float32)
    torch.manual_seed(4)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        base, _ = ours(idx)
        for p in (0, 7, 18):
            changed = idx.clone()
            shift = torch.randint(1, VOCAB, changed[:, p + 1:].shape)  # every later token changes
            changed[:, p + 1:] = (changed[:, p + 1:] + shift) % VOCAB
            out, _ = ours(changed)
            torch.testing.assert_close(out[:, :p + 1], base[:, :p + 1], atol=1e-6, rtol=0)
            assert (out[:, p + 1:] - base[:, p + 1:]).abs().amax() > 1e-3  # the perturbation is visible later


# ----------------------------------------------------------------------------------------------
# strict loading

@pytest.mark.parametrize("name,overrides,count", QWEN25_SIZES)
def test_presets_load_exactly_the_hf_key_set_and_count_hf_parameters(name, overrides, count):
    hf_config = HFQwen2Config(**{**QWEN25_3B_CONFIG_JSON, **overrides})
    with torch.device("meta"):  # keys, shapes and counts without allocating billions of parameters
        ref, ours = Qwen2ForCausalLM(hf_config), Qwen2(Qwen2Config.preset(name))
    sd = ref.state_dict()
    # tied: HF's state_dict lists lm_head.weight as an alias of the embedding, but save_pretrained
    # stores only the embedding (the tied checkpoints in the parity tests load strictly)
    del sd["lm_head.weight"]
    ours.load_hf_state_dict(sd, assign=True)
    assert {k: v.shape for k, v in ours.hf_state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert ours.num_params() == ref.num_parameters() == count


def test_strict_load_names_key_and_both_shapes(checkpoints):
    sd = load_safetensors(checkpoints(tied=False))
    ours = Qwen2(Qwen2Config.from_hf(json.loads((checkpoints(tied=False) / "config.json").read_text())))
    ours.load_hf_state_dict(sd)  # the unmodified checkpoint loads

    bad = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 48)})
    with pytest.raises(ValueError) as err:
        ours.load_hf_state_dict(bad)
    msg = str(err.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "(32, 48)" in msg and "(32, 64)" in msg

    missing = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"1 missing keys \['model.layers.0.mlp.up_proj.weight'\]"):
        ours.load_hf_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected.*rotary_emb.inv_freq"):
        ours.load_hf_state_dict(dict(sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    tied = Qwen2(Qwen2Config.from_hf(json.loads((checkpoints(tied=True) / "config.json").read_text())))
    with pytest.raises(ValueError, match="ties the embeddings"):  # untied weights into a tied model
        tied.load_hf_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# sampling

# probabilities over 8 tokens, most likely first: 3 (.5), 1 (.3), 5 (.1), 4 (.05), 0, 6, 2, 7
PROBS = torch.tensor([0.02, 0.30, 0.01, 0.50, 0.05, 0.10, 0.015, 0.005])


@pytest.mark.parametrize("temperature,top_k,top_p,allowed", [
    (1.0, 3, None, {3, 1, 5}),
    (1.0, None, 0.75, {3, 1}),      # .5 < .75 keeps token 1; .5 + .3 >= .75 drops token 5
    (1.0, None, 0.85, {3, 1, 5}),   # .8 < .85 keeps token 5; .9 drops token 4
    (1.0, 4, 0.7, {3, 1}),          # top_k first: renormalized .526, .316 -> .842 >= .7
    (1.0, None, 0.6, {3, 1}),
    (0.5, None, 0.6, {3}),          # temperature first: p² renormalized gives token 3 .704 >= .6
])
def test_sampling_picks_only_and_all_of_the_allowed_tokens(temperature, top_k, top_p, allowed):
    gen = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(4000, -1)
    draws = sample_logits(logits, temperature, top_k, top_p, generator=gen)
    assert set(draws.tolist()) == allowed
    p = PROBS ** (1 / temperature)
    expected = {t: (p[t] / p[list(allowed)].sum()).item() for t in allowed}
    for t, q in expected.items():
        assert abs((draws == t).float().mean().item() - q) < 0.03


def test_greedy_eos_and_top_k_1_generation(checkpoints):
    ours = Qwen2.from_pretrained(checkpoints(tied=True), dtype=torch.float32)
    assert torch.equal(sample_logits(PROBS.log()[None]), torch.tensor([3]))
    torch.manual_seed(5)
    idx = torch.randint(0, VOCAB, (1, 6))
    greedy = ours.generate(idx, max_new_tokens=20)
    # top_k=1 leaves one token to sample: the greedy one
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(ours.generate(idx, 20, temperature=1.0, top_k=1, generator=gen), greedy)
    # eos: stop right after the first occurrence of the token chosen as eos
    eos = greedy[0, 6 + 4].item()
    first = (greedy[0, 6:] == eos).nonzero()[0].item()
    out = ours.generate(idx, 20, eos_id=eos)
    assert torch.equal(out, greedy[:, :6 + first + 1])


def test_shapes_preset_starts_near_uniform_and_learns():
    torch.manual_seed(0)
    config = Qwen2Config.preset("shapes")
    model = Qwen2(config)
    idx = torch.randint(0, config.vocab_size, (1, 49))
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert logits.shape == (1, 48, config.vocab_size)
    # N(0, 0.02) init keeps the logits small (std ~0.3), so the loss starts near ln(vocab) + σ²/2
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.15
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):  # memorize one batch: gradients reach every parameter through the tied head
        opt.zero_grad()
        model(idx[:, :-1], targets=idx[:, 1:])[1].backward()
        opt.step()
    assert model(idx[:, :-1], targets=idx[:, 1:])[1].item() < 0.5 * loss.item()
