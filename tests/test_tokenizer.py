import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode  # shapes without memory

import tokenizer as T

# Tiny transformers configs. v1-style: text width = vision width, 32000-style small vocab, a patch
# that does not divide the image (the conv drops the remainder, like 384 / 14). SigLIP2-style:
# Gemma-size-like vocabulary (scaled down), narrower text tower with a projection_size head,
# different eps, bilinear preprocessing; saved in bf16 and sharded.
V1 = dict(
    vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       image_size=30, patch_size=7),
    text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=320, max_position_embeddings=16))
V2 = dict(
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3,
                       image_size=32, patch_size=8, layer_norm_eps=1e-5),
    text_config=dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=2560, max_position_embeddings=12, projection_size=48, layer_norm_eps=1e-5))


def hf_siglip(kw, seed=0):
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(**kw)).eval()
    with torch.no_grad():  # HF inits biases/logit params to zero; randomize so parity sees them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf(model, path, bf16=False, resample=None):
    if bf16:
        # round to bf16 in place, so the fp32 HF reference holds exactly the weights written in bf16
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
        model.float()
    else:
        model.save_pretrained(path, safe_serialization=True)
    if resample is not None:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "SiglipImageProcessor", "resample": resample}, f)


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("siglip_v1"))
    model = hf_siglip(V1)
    save_hf(model, path, resample=3)
    return path, model


# -----------------------------------------------------------------------------
# SigLIP


def check_parity(ours, hf, image_size, vocab, text_len):
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, image_size, image_size) * 2 - 1
    ids = torch.randint(0, vocab, (2, text_len))
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, output_hidden_states=True, return_loss=True)
        vis = hf.vision_model(pixel_values=pixels, output_hidden_states=True)
        states = ours.vision_hidden_states(pixels)
        assert len(states) == len(vis.hidden_states) == ours.config.layers + 1
        for i, (a, b) in enumerate(zip(states, vis.hidden_states)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"hidden state {i}")
        torch.testing.assert_close(ours.encode_image(pixels), vis.pooler_output, atol=1e-4, rtol=0)
        text = out.text_model_output.pooler_output
        torch.testing.assert_close(ours.encode_text(ids), text, atol=1e-4, rtol=0)
        logits, loss = ours(pixels, ids)
        torch.testing.assert_close(logits, out.logits_per_text, atol=1e-4, rtol=0)
        torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=0)


def test_parity_siglip_v1(v1_dir):
    path, hf = v1_dir
    ours = T.SigLIP.from_pretrained(path)
    assert ours.config.grid == 4 and ours.config.resample == "bicubic"
    check_parity(ours, hf, 30, 320, 16)


def test_parity_siglip2_bf16_sharded(tmp_path):
    hf = hf_siglip(V2, seed=1)
    save_hf(hf, str(tmp_path), bf16=True, resample=2)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    assert {t.dtype for t in load_file(shards[0]).values()} == {torch.bfloat16}
    ours = T.SigLIP.from_pretrained(str(tmp_path))
    assert ours.config.embed_dim == 48 and ours.config.text_width == 32 and ours.config.resample == "bilinear"
    assert next(ours.parameters()).dtype == torch.float32
    check_parity(ours, hf, 32, 2560, 12)


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import SiglipModel
    cfg = replace(T.SIGLIP_PRESETS["shapes"], layers=2, text_layers=1)
    ours = T.SigLIP(cfg).eval()
    ours.save_pretrained(str(tmp_path))
    assert T.SigLIPConfig.from_hf(cfg.to_hf(), cfg.resample) == cfg
    hf = SiglipModel.from_pretrained(str(tmp_path)).eval()
    check_parity(ours, hf, 64, 512, cfg.text_len)
    again = T.SigLIP.from_pretrained(str(tmp_path))
    assert again.config == cfg
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_so400m_key_set_shapes_and_count():
    # transformers' so400m on the meta device: the exact HF key set and shapes, no weights. The
    # preset loads it strictly (the copies are no-ops on meta) and has the same parameter count.
    from transformers import SiglipConfig, SiglipModel
    for preset, image, patch, vocab in (("so400m", 384, 14, 256000), ("so400m-256", 256, 16, 256000)):
        so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
        hf_cfg = SiglipConfig(vision_config=dict(so400m, image_size=image, patch_size=patch),
                              text_config=dict(so400m, vocab_size=vocab))
        with torch.device("meta"):
            hf = SiglipModel(hf_cfg)
            ours = T.SigLIP(T.SIGLIP_PRESETS[preset])
        ours.load_hf_state_dict(hf.state_dict())
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
        assert T.SigLIPConfig.from_hf(hf_cfg.to_diff_dict()) == T.SIGLIP_PRESETS[preset]
    assert ours.config.grid == 16
    # google/siglip-so400m-patch14-384 (v1) config.json as published: vocab_size omitted (HF default 32000)
    v1 = {"model_type": "siglip",
          "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27},
          "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                            "model_type": "siglip_vision_model", "num_attention_heads": 16,
                            "num_hidden_layers": 27, "patch_size": 14}}
    assert T.SigLIPConfig.from_hf(v1, "bicubic") == replace(T.SIGLIP_PRESETS["so400m"], vocab_size=32000,
                                                            resample="bicubic")
    assert T.SIGLIP_PRESETS["so400m"].grid == 27


def test_strict_load_errors(v1_dir, tmp_path):
    path, _ = v1_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.link(os.path.join(path, "config.json"), tmp_path / "config.json")
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    bad = dict(tensors, **{key: torch.zeros(95, 64)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        T.SigLIP.from_pretrained(str(tmp_path))
    assert key in str(e.value) and "(95, 64)" in str(e.value) and "(96, 64)" in str(e.value)
    missing = {k: v for k, v in tensors.items() if k != "text_model.head.bias"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="text_model.head.bias"):
        T.SigLIP.from_pretrained(str(tmp_path))
    save_file(dict(tensors, extra=torch.zeros(1)), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="extra"):
        T.SigLIP.from_pretrained(str(tmp_path))


def test_preprocess_matches_hf_processor():
    from transformers import SiglipImageProcessorPil
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for resample, code in (("bilinear", 2), ("bicubic", 3)):
        ours = T.SigLIP(replace(T.SIGLIP_PRESETS["shapes"], layers=1, text_layers=1, resample=resample))
        proc = SiglipImageProcessorPil(size={"height": 64, "width": 64}, resample=code)
        ref = torch.from_numpy(np.asarray(proc(images=[img], return_tensors="np")["pixel_values"]))
        torch.testing.assert_close(ours.preprocess([img]), ref, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# DualTokenizer


class IdentityQuantizer(torch.nn.Module):
    # stands in for an RVQ: passes z through and remembers it
    def __init__(self, depth):
        super().__init__()
        self.depth = depth

    def forward(self, z):
        self.seen = z
        return z, torch.zeros(*z.shape[:-1], self.depth, dtype=torch.long), z.new_zeros(())


@pytest.fixture(scope="module")
def shapes_model():
    torch.manual_seed(0)
    return T.DualTokenizer(T.TOKENIZER_PRESETS["shapes"])


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_shapes_encode_decode(shapes_model):
    m = shapes_model.eval()
    cfg = m.config
    assert (cfg.siglip.grid, cfg.output_size, cfg.depth, cfg.codebook_size) == (8, 64, 4, 256)
    pix, sem = m.encode(images())
    for codes in (pix, sem):
        assert codes.shape == (2, 8, 8, 4) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < 256
    out = m.decode(pix)
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    # decode reads only the codes: the same codes give the same image
    assert torch.equal(m.decode(pix.clone()), out)


def test_decoder_runs_in_the_standard_layout(shapes_model):
    # the code map arrives (B, h, w, C); a permuted view would be channels-last and every conv would
    # keep that layout, 1.2-1.4x slower a training step on CPU (EXPERIMENTS.md §29)
    m = shapes_model.eval()
    seen = []
    hook = m.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        pix, _ = m.encode(images(seed=2))
        out = m.decode(pix)
    finally:
        hook.remove()
    assert seen[0].is_contiguous() and out.is_contiguous()
    # the layout is the only change: the decoder on the channels-last view gives the same image
    with torch.no_grad():
        z = m.post_quant(m.pix_post(m.pix_quantizer.decode(pix)).permute(0, 3, 1, 2))
        assert not z.is_contiguous()
        torch.testing.assert_close(m.decoder(z).clamp(-1, 1), out, atol=1e-4, rtol=0)  # fp32 rounding


def test_forward_matches_encode_and_decode(shapes_model):
    m = shapes_model.eval()
    x = images(seed=1)
    pix, sem = m.encode(x)
    with torch.no_grad():
        out = m(x)
    assert torch.equal(out.pix_codes, pix) and torch.equal(out.sem_codes, sem)
    assert out.recon.shape == (2, 3, 64, 64)
    assert out.sem.shape == (2, 64, 128) and out.pooled.shape == (2, 128)
    assert out.commit_pix.ndim == 0 and out.commit_sem.ndim == 0
    # the straight-through value z + (ẑ − z) is the code sum ẑ up to fp32 rounding, so forward's
    # reconstruction is decode(codes) before clamping
    torch.testing.assert_close(out.recon.clamp(-1, 1), m.decode(pix), atol=1e-4, rtol=0)


def test_encode_never_moves_codebooks(shapes_model):
    m = shapes_model.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.encode(images(seed=2))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m(images(seed=2))  # forward in training mode does update the EMA codebooks
    assert not torch.equal(before["pix_rvq.codebook"], m.pix_rvq.codebook)
    m.load_state_dict(before)
    m.eval()


def test_gradients_reach_the_right_layers(shapes_model):
    # §3.2: the reconstruction loss reaches only layers 1..rec_layer (shapes: 2 of 8) through the
    # straight-through estimator; the semantic loss reaches every layer. Activation checkpointing
    # gives the same gradients.
    m = shapes_model.train()
    m.pix_rvq.eval(), m.sem_rvq.eval()  # keep the codebooks fixed between the two passes
    x = images(seed=5)
    grads = []
    for ckpt in (False, True):
        m.zero_grad(set_to_none=True)
        m.grad_checkpointing = ckpt
        m(x).recon.square().mean().backward()
        blocks = m.siglip.vision.blocks
        assert all(b.mlp.fc.weight.grad.abs().sum() > 0 for b in blocks[:2])
        assert all(b.mlp.fc.weight.grad is None for b in blocks[2:])
        assert m.sem_pre.fc.weight.grad is None and m.pix_pre.fc.weight.grad.abs().sum() > 0
        out = m(x)
        (out.pooled.square().mean() + out.sem.square().mean()).backward()
        assert all(b.mlp.fc.weight.grad.abs().sum() > 0 for b in blocks)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    m.grad_checkpointing = False
    m.zero_grad(set_to_none=True)
    m.eval()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_save_load_round_trip(shapes_model, tmp_path):
    m = shapes_model.eval()
    m.save_pretrained(str(tmp_path))
    again = T.DualTokenizer.from_pretrained(str(tmp_path))
    assert again.config == m.config and not again.training
    x = images(seed=3)
    pix, sem = m.encode(x)
    pix2, sem2 = again.eval().encode(x)
    assert torch.equal(pix, pix2) and torch.equal(sem, sem2)
    assert torch.equal(m.decode(pix), again.decode(pix2))
    # strict: a config that disagrees with the weights is refused, naming the key and both shapes
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["code_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"pix_pre\.proj\.weight checkpoint \(32, 128\) vs model \(16, 128\)"):
        T.DualTokenizer.from_pretrained(str(tmp_path))


class Scale(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def test_branch_wiring_against_siglip(v1_dir):
    # A tokenizer around the tiny HF v1 SigLIP (3 layers, taps shortcut 1 / rec 2 / sem 2).
    path, hf = v1_dir
    cfg = replace(T.TOKENIZER_PRESETS["shapes"], rec_layer=2, shortcut_layer=1, sem_layer=2,
                  codebook_size=64, dec_ch=32, dec_ch_mult=(1, 1, 1), dec_res_blocks=0, latent_size=8,
                  dec_attn=(), dec_in=32)
    with pytest.raises(ValueError, match="decoder output"):  # 8 × 2² = 32 != 30
        T.DualTokenizer.from_siglip(path, cfg)
    cfg = replace(cfg, dec_ch_mult=(1,), latent_size=30)  # no upsampling: a 30×30 latent
    m = T.DualTokenizer.from_siglip(path, cfg).eval()
    assert m.config.siglip == T.SigLIP.from_pretrained(path).config and m.config.sem_layer == 2
    m.sem_pre, m.sem_post = torch.nn.Identity(), torch.nn.Identity()
    m.sem_rvq, m.pix_rvq = IdentityQuantizer(4), IdentityQuantizer(4)
    x = images(size=30, seed=4)
    with torch.no_grad():
        states = m.siglip.vision_hidden_states(x)
        # semantic branch as the identity: the pooled embedding is SigLIP's own (and HF's)
        out = m(x)
        assert torch.equal(out.pooled, m.siglip.encode_image(x))
        ref = hf.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(out.pooled, ref, atol=1e-4, rtol=0)
        assert torch.equal(out.sem, states[2])
        # the pixel quantizer receives pix_pre(layer 2) + 0.6 · pix_short(layer 1), on the h×w grid
        expect = m.pix_pre(states[2]) + 0.6 * m.pix_short(states[1])  # (B, N, code_dim)
        torch.testing.assert_close(m.pix_rvq.seen, expect.unflatten(1, (4, 4)), atol=1e-6, rtol=0)
        assert out.recon.shape == (2, 3, 30, 30)
        # a post-quant projection that changes the features: they replace layer 2's output and run
        # through layer 3 and the head (§3.2)
        m.sem_post = Scale()
        out = m(x)
        assert torch.equal(out.sem, 2 * states[2])
        torch.testing.assert_close(out.pooled, m.siglip.vision.pool(m.siglip.vision.blocks[2](2 * states[2])),
                                   atol=1e-6, rtol=0)
        assert not torch.allclose(out.pooled, m.siglip.encode_image(x), atol=1e-3)
        # teacher targets: the teacher's layer-2 output and pooled embedding
        f0, pooled0 = m.teacher_targets(m.siglip, x)
        assert torch.equal(f0, states[2]) and torch.equal(pooled0, m.siglip.encode_image(x))
    # shortcut_weight 0 removes the shortcut projection entirely (no unused parameters under DDP)
    m0 = T.DualTokenizer.from_siglip(m.siglip, replace(cfg, shortcut_weight=0.0))
    assert m0.pix_short is None and not any(k.startswith("pix_short") for k in m0.state_dict())


def test_config_validation_and_presets():
    assert set(T.TOKENIZER_PRESETS) == {"so400m", "so400m-256", "shapes"}
    assert T.TOKENIZER_PRESETS["so400m"] == T.TokenizerConfig()
    with pytest.raises(KeyError):
        T.TOKENIZER_PRESETS["so400M"]  # exact names only
    for cfg in T.TOKENIZER_PRESETS.values():  # JSON round trip gives an equal config
        assert T.TokenizerConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    shapes = T.TOKENIZER_PRESETS["shapes"]
    with pytest.raises(ValueError, match="sem_layer = 9"):
        T.DualTokenizer(replace(shapes, sem_layer=9))
    with pytest.raises(ValueError, match="deeper"):
        T.DualTokenizer(replace(shapes, rec_layer=8))


@pytest.mark.parametrize("name, grid, depth, size", [("so400m", 27, 8, 384), ("so400m-256", 16, 4, 256)])
def test_full_size_shapes_on_fake_tensors(name, grid, depth, size):
    # The paper's model without memory or compute: fake tensors carry shapes and dtypes only.
    cfg = T.TOKENIZER_PRESETS[name]
    assert cfg.output_size == cfg.siglip.image_size == size
    with FakeTensorMode():
        m = T.DualTokenizer(cfg).eval()
        x = torch.zeros(1, 3, size, size)
        pix, sem = m.encode(x)
        out = m(x)
        img = m.decode(pix)
    assert pix.shape == sem.shape == out.pix_codes.shape == (1, grid, grid, depth)
    assert img.shape == out.recon.shape == (1, 3, size, size)
    assert out.sem.shape == (1, grid * grid, 1152) and out.pooled.shape == (1, 1152)
