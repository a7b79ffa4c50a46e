import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import encode_chat, load_text_tokenizer, shapes_sample, to_tensor  # noqa: E402
from sample import answer, generate_codes, image_grid, image_prompt, left_pad  # noqa: E402
from tokenizer import TOKENIZER_PRESETS, DualTokenizer  # noqa: E402
from unified import Qwen2Config, UnifiedConfig, UnifiedModel  # noqa: E402
from bench import recompute_sample_codes  # noqa: E402  (the depth sampler of before)


def tiny_tokenizer_config():
    # the shapes preset at 32 px: a 4 × 4 grid (16 visual positions), decoder 4 → 32
    c = TOKENIZER_PRESETS["shapes"]
    siglip = dataclasses.replace(c.siglip, image_size=32, width=64, mlp=128, text_width=64, text_mlp=128,
                                 embed_dim=64)
    return dataclasses.replace(c, siglip=siglip, latent_size=4, dec_attn=(4,), dec_in=64)


def tiny_config():
    llm = Qwen2Config(vocab_size=320, dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                      rope_theta=1e4, max_seq_len=400)
    # no projector norm and the LLM's init for the grid positions: with random weights RMS-1 visual
    # inputs swamp the std-0.02 text embeddings, and a random model would then sample the same
    # codes with and without the caption
    return dataclasses.replace(UnifiedConfig.preset("shapes"), llm=llm, grid=4, depth_dim=32, depth_heads=4,
                               depth_mlp=64, depth_layers=2, projector_norm=0.0, grid_pos_init=0.02)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    tok = DualTokenizer(tiny_tokenizer_config()).eval()
    model = UnifiedModel.from_tokenizer(tiny_config(), tok).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, tokenizer=tok)
    return str(path), model, tok, load_text_tokenizer("bytes")


def reference_codes(model, enc, captions, cfg, temperature, seed, sample_codes=None):
    # No cache: at each position recompute the whole prefix (prompt + every visual position drawn
    # so far) from scratch, then draw that position's codes exactly as the sampler does (or with
    # sample_codes(model, h, cfg, temperature, top_k, top_p, generator)).
    sample_codes = sample_codes or (lambda m, *a: m.sample_codes(*a))
    special = model.config.special_tokens
    rows = [image_prompt(enc, special, c) for c in captions]
    if cfg is not None:
        rows += [image_prompt(enc, special, "")] * len(captions)
    gen = torch.Generator().manual_seed(seed)
    N, P, rep = len(captions), model.config.grid ** 2, 2 if cfg is not None else 1
    pix, sem = [], []
    for p in range(P):
        ids, key_mask = left_pad([r + [special["<|image_pad|>"]] * p for r in rows], special["<|endoftext|>"])
        if p:
            pc, sc = torch.stack(pix, 1).repeat(rep, 1, 1), torch.stack(sem, 1).repeat(rep, 1, 1)
            x = model.embed(ids, pc.flatten(0, 1), sc.flatten(0, 1))
        else:
            x = model.embed(ids)
        h = model.llm.hidden(input_embeds=x, key_mask=key_mask)[:, -1]
        a, b = sample_codes(model, h, cfg, temperature, None, None, gen)
        pix.append(a)
        sem.append(b)
    g = model.config.grid
    return torch.stack(pix, 1).view(N, g, g, -1), torch.stack(sem, 1).view(N, g, g, -1)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [None, 3.0])
def test_cached_sampling_equals_full_recompute(ckpt, cfg):
    _, model, _, enc = ckpt
    captions = ["a small red circle at the top on a white background", "a large blue square"]
    pix, sem = generate_codes(model, enc, captions, cfg=cfg, temperature=1.0,
                              generator=torch.Generator().manual_seed(7))
    ref_pix, ref_sem = reference_codes(model, enc, captions, cfg, 1.0, seed=7)
    assert pix.shape == (2, 4, 4, 4)
    assert torch.equal(pix, ref_pix) and torch.equal(sem, ref_sem)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [None, 1.0, 3.0])
def test_greedy_codes_equal_the_uncached_sampler_of_before(ckpt, cfg):
    # The fast path (LLM cache read up to the filled prefix with K/V heads shared, not copied; depth
    # heads cached over their slots with one classifier per depth; no unconditional rows at cfg 1)
    # against the full recompute of both with the old depth sampler, which still runs the
    # unconditional rows at cfg 1. In float64, so the different summation orders cannot flip an argmax.
    _, model, _, enc = ckpt
    model = copy.deepcopy(model).double()
    captions = ["a small red circle at the top on a white background", "a large blue square"]
    pix, sem = generate_codes(model, enc, captions, cfg=cfg, temperature=0.0)
    ref_pix, ref_sem = reference_codes(model, enc, captions, cfg, 0.0, seed=0, sample_codes=recompute_sample_codes)
    assert torch.equal(pix, ref_pix) and torch.equal(sem, ref_sem)
    assert len(set(pix.flatten().tolist())) > 4  # a random model draws varied codes: not a vacuous match


@torch.no_grad()
def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(ckpt):
    _, model, _, enc = ckpt
    cap = ["a large green triangle on the left on a black background"]

    def run(captions, cfg, seed=3):
        return generate_codes(model, enc, captions, cfg=cfg, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed))

    cond, uncond, one, zero = run(cap, None), run([""], None), run(cap, 1.0), run(cap, 0.0)
    assert torch.equal(one[0], cond[0]) and torch.equal(one[1], cond[1])
    assert torch.equal(zero[0], uncond[0]) and torch.equal(zero[1], uncond[1])
    # and guidance matters: scale 3 draws other codes than the conditional model somewhere (a random
    # model's cond/uncond logits differ only a little, so a few draws are compared)
    assert any(not torch.equal(a, b) for seed in range(3, 7)
               for a, b in zip(run(cap, 3.0, seed), run(cap, None, seed)))


@torch.no_grad()
def test_answer_equals_uncached_greedy_forward(ckpt):
    _, model, tok, enc = ckpt
    image = to_tensor(shapes_sample(5)["image"], size=32)
    question = "What shape is in the image?"
    got = answer(model, enc, tok, image, question, max_new_tokens=24)
    # reference: greedy decoding with the model's full forward over the whole sequence each step
    special = model.config.special_tokens
    ids, _ = encode_chat(enc, [{"role": "user", "content": "<image>\n" + question}],
                         add_generation_prompt=True, image_tokens=16)
    pix, sem = tok.encode(image[None])
    out = []
    for _ in range(24):
        logits, _ = model(torch.tensor([ids + out]), pix.flatten(0, 2), sem.flatten(0, 2))
        logits = logits[0, -1].clone()
        logits[enc.n_vocab:] = float("-inf")
        t = int(logits.argmax())
        if t in (special["<|im_end|>"], special["<|endoftext|>"], special["<|im_start|>"]):
            break
        out.append(t)
    assert got == enc.decode(out, errors="replace")
    assert len(out) > 0  # a random model does not stop at once, so the comparison covers real tokens


def test_image_grid_layout():
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    g = image_grid(images)  # 3 columns, 2 rows, 2 px gutters
    assert g.size == (3 * 10 - 2, 2 * 10 - 2)


def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_text_to_image_writes_pngs_and_grid(ckpt, tmp_path):
    path = ckpt[0]
    r = run_cli("--ckpt", path, "--prompt", "a small red circle in the center on a white background",
                "--num_samples", "3", "--out", str(tmp_path), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        im = Image.open(tmp_path / f"sample_{i:02d}.png")
        assert im.size == (32, 32) and im.mode == "RGB"  # the checkpoint's resolution
        assert str(tmp_path / f"sample_{i:02d}.png") in r.stdout
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 34 - 2, 2 * 34 - 2)  # 3 images → 2 × 2 cells
    assert "positions/s" in r.stdout
    # sampling settings: the checkpoint's unless given
    c = ckpt[1].config
    assert f"cfg {c.sample_cfg}, temperature {c.sample_temperature}" in r.stdout
    r = run_cli("--ckpt", path, "--prompt", "a small red circle", "--num_samples", "1", "--cfg", "2",
                "--temperature", "0.5", "--out", str(tmp_path), "--device", "cpu")
    assert r.returncode == 0 and "cfg 2.0, temperature 0.5" in r.stdout, r.stderr


def test_export_stores_bfloat16_and_loads_back_as_fp32(ckpt, tmp_path):
    from unified import load_pretrained
    path, model, tok, _ = ckpt
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unified.py"), "export", path, str(tmp_path / "x"),
                        "--sample_cfg", "1.5", "--sample_temperature", "0.7"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    def size(d):
        return sum(f.stat().st_size for f in Path(d).rglob("*.safetensors"))
    assert size(tmp_path / "x") < 0.55 * size(path)
    m2, _, tok2 = load_pretrained(tmp_path / "x")
    assert (m2.config.sample_cfg, m2.config.sample_temperature) == (1.5, 0.7)  # and nothing else changed:
    assert dataclasses.replace(m2.config, sample_cfg=model.config.sample_cfg,
                               sample_temperature=model.config.sample_temperature) == model.config
    for theirs, ours in ((m2.state_dict(), model.state_dict()), (tok2.state_dict(), tok.state_dict())):
        for k, v in ours.items():
            assert theirs[k].dtype == v.dtype
            expect = v.to(torch.bfloat16).float() if v.is_floating_point() else v
            assert torch.equal(theirs[k], expect), k
    # --tokenizer_dtype float32: the tokenizer exactly as trained, the model still bf16
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unified.py"), "export", path, str(tmp_path / "z"),
                        "--tokenizer_dtype", "float32"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "bfloat16, tokenizer float32" in r.stdout, r.stderr
    m3, _, tok3 = load_pretrained(tmp_path / "z")
    for k, v in tok.state_dict().items():
        assert torch.equal(tok3.state_dict()[k], v), k
    for k, v in model.state_dict().items():  # bf16 but the codebooks, which are the tokenizer's
        assert torch.equal(m3.state_dict()[k], v if k.endswith("_codebook") else m2.state_dict()[k]), k
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unified.py"), "export", str(tmp_path / "nope"),
                        str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "nope: no such directory" in r.stderr and "Traceback" not in r.stderr


def test_export_swaps_in_a_decoder_only_if_the_codes_stay(ckpt, tmp_path):
    # export --tokenizer: the checkpoint's tokenizer with another pixel decoder goes in; one whose codes
    # would differ (a moved ViT weight or codebook) is refused in one line naming the tensor
    from unified import load_pretrained
    path, model, tok, _ = ckpt
    new = copy.deepcopy(tok)
    with torch.no_grad():
        new.decoder.conv_out.bias.add_(0.25)
    new.save_pretrained(str(tmp_path / "dec"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unified.py"), "export", path, str(tmp_path / "x"),
                        "--tokenizer", str(tmp_path / "dec"), "--dtype", "float32"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    m2, _, tok2 = load_pretrained(tmp_path / "x")
    for k, v in new.state_dict().items():
        assert torch.equal(tok2.state_dict()[k], v), k
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    x = to_tensor(shapes_sample(0)["image"], tok.config.siglip.image_size, tok.config.siglip.resample)[None]
    assert all(torch.equal(a, b) for a, b in zip(tok2.encode(x), tok.encode(x)))       # the same codes,
    assert not torch.equal(tok2.decode(tok.encode(x)[0]), tok.decode(tok.encode(x)[0]))  # another picture
    for key, edit in (("siglip.vision.blocks.0.mlp.fc.weight", lambda t: t.siglip.vision.blocks[0].mlp.fc.weight),
                      ("sem_rvq.codebook", lambda t: t.sem_rvq.codebook)):
        bad = copy.deepcopy(tok)
        with torch.no_grad():
            edit(bad).mul_(1.5)
        bad.save_pretrained(str(tmp_path / "bad"))
        r = subprocess.run([sys.executable, os.path.join(ROOT, "unified.py"), "export", path, str(tmp_path / "y"),
                            "--tokenizer", str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{key} differs from the checkpoint's tokenizer" in r.stderr, r.stderr


def test_cli_image_to_text(ckpt, tmp_path):
    path = ckpt[0]
    shapes_sample(1)["image"].save(tmp_path / "x.png")
    r = run_cli("--ckpt", path, "--image", str(tmp_path / "x.png"), "--prompt", "What color is the shape?",
                "--max_new_tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "/nonexistent/ckpt", "--prompt", "x"], "--ckpt /nonexistent/ckpt: no such directory"),
    (["--prompt", "x", "--image", "IMG", "--cfg", "2"], "--cfg applies to text → image"),
    (["--prompt", "x", "--max_new_tokens", "3"], "--max_new_tokens applies to --image"),
    (["--prompt", "x", "--cfg", "-2"], "--cfg must be ≥ 0"),
    (["--prompt", "x", "--split", "train"], "--split applies to --eval"),
    (["--eval", "shapes", "--split", "heldout"], "--split 'heldout'"),
    ([], "nothing to do"),
    (["--image", "NOTIMG"], "cannot read image"),
    (["--prompt", "a " * 250], "exceeds the model's context"),  # known words: no vocabulary warning
])
def test_cli_errors_are_one_line(ckpt, tmp_path, args, message):
    (tmp_path / "notimage.png").write_bytes(b"this is not a png")
    shapes_sample(0)["image"].save(tmp_path / "img.png")
    args = [a.replace("NOTIMG", str(tmp_path / "notimage.png")).replace("IMG", str(tmp_path / "img.png"))
            for a in args]
    if "--ckpt" not in args:
        args += ["--ckpt", ckpt[0]]
    r = run_cli(*args, "--device", "cpu")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error:") and message in lines[0], r.stderr


def test_eval_prompts_cover_their_split():
    from data import HELDOUT, TRAIN_COMBOS
    from sample import eval_prompts
    held = eval_prompts("heldout", len(HELDOUT))
    assert {(a["color"], a["shape"], a["where"]) for a in held} == set(HELDOUT)
    train = eval_prompts("train", 36)
    assert all((a["color"], a["shape"], a["where"]) in set(TRAIN_COMBOS) for a in train)
    assert len({(a["color"], a["shape"], a["where"]) for a in train}) == 36


def test_evaluate_shapes_scores_known_answers(monkeypatch):
    # A stand-in model that "generates" exactly the prompted image, except that every red object
    # comes out blue, and answers every question right: the table must say so, attribute by attribute.
    import sample
    from data import QUESTIONS, parse_shapes_caption, read_shapes, render_shapes, shapes_caption

    class FakeTokenizer:
        class config:
            class siglip:
                image_size, resample = 64, "bicubic"

        def encode(self, images):  # "codes" = the caption read off the image; decode renders it
            return [shapes_caption(read_shapes(x)) for x in images], None

        def decode(self, captions):
            ims = []
            for cap in captions:
                a = parse_shapes_caption(cap)
                a["color"] = "blue" if a["color"] == "red" else a["color"]
                ims.append(to_tensor(render_shapes(a)))
            return torch.stack(ims)

    class FakeModel:
        pix_codebook = torch.zeros(1)

    drawn = []

    def fake_codes(model, enc, captions, *args, **kw):
        drawn.extend(captions)
        return captions, None  # the "codes" are the captions; FakeTokenizer.decode renders them

    def answer_from_pixels(model, enc, tok, x, q, max_new_tokens=0):
        # answer from the image itself with the pixel reader, so the understanding table is exact
        a = read_shapes(x)
        a = dict(a, caption=shapes_caption(a))
        return a[{v: k for k, v in QUESTIONS.items()}[q]]

    monkeypatch.setattr(sample, "generate_codes", fake_codes)
    monkeypatch.setattr(sample, "answer", answer_from_pixels)
    r = sample.evaluate_shapes(FakeModel(), None, FakeTokenizer(), n_prompts=36, n_images=12, progress=False,
                               n_recon=50, per_prompt=2)
    assert len(drawn) == 2 * (36 + len(sample.HELDOUT))  # every prompt twice
    assert drawn[0] == drawn[1] and drawn[1] != drawn[2]
    for split, prompts in (("train", sample.eval_prompts("train", 36)),
                           ("heldout", sample.eval_prompts("heldout", len(sample.HELDOUT)))):
        red = sum(p["color"] == "red" for p in prompts) / len(prompts)
        assert red > 0
        acc = r["gen"][split]
        assert acc["shape"] == acc["size"] == acc["where"] == acc["background"] == 1.0
        assert acc["color"] == pytest.approx(1 - red) and acc["all"] == pytest.approx(1 - red)
        assert acc["bg_dirty"] == 0.0  # clean renders
    assert all(v == 1.0 for v in r["und"].values())
    # reconstructions: the held-out images through encode/decode, the same red -> blue flaw
    from data import shapes_sample
    red = sum(shapes_sample(i, split="heldout")["attrs"]["color"] == "red" for i in range(50)) / 50
    assert 0 < red < 1
    acc = r["recon"]
    assert acc["shape"] == acc["size"] == acc["where"] == acc["background"] == 1.0
    assert acc["color"] == pytest.approx(1 - red) and acc["all"] == pytest.approx(1 - red)
    table = sample.format_results(r)
    assert "tokenizer ceiling" in table
    assert "heldout" in table and "100.0%" in table
    # the generation rows end with the mean bg_dirty, in percent with two decimals
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["bg", "dirty"]
    assert [line.split()[-1] for line in lines[1:3]] == ["0.00%", "0.00%"]
    r["gen"]["train"]["bg_dirty"] = 0.0123
    assert sample.format_results(r).splitlines()[1].endswith(" 1.23%")


def test_evaluate_shapes_train_split_looks_at_nothing_held_out(monkeypatch):
    # --split train is where settings are chosen: train prompts only, understanding on training-split
    # images of a stream training never draws (ShapesSource reads seed 0), no reconstruction
    import sample
    from data import HELDOUT, QUESTIONS, shapes_sample

    drawn, read = [], []

    def fake_codes(model, enc, captions, *args, **kw):
        drawn.extend(captions)
        return torch.zeros(len(captions)), None

    class FakeTokenizer:
        class config:
            class siglip:
                image_size, resample = 64, "bicubic"

        def decode(self, codes):
            return torch.zeros(len(codes), 3, 64, 64)

    class FakeModel:
        pix_codebook = torch.zeros(1)

    def fake_sample(i, seed=0, split="train"):
        read.append((seed, split))
        return shapes_sample(i, seed=seed, split=split)

    monkeypatch.setattr(sample, "generate_codes", fake_codes)
    monkeypatch.setattr(sample, "shapes_sample", fake_sample)
    monkeypatch.setattr(sample, "answer", lambda *a, **k: "?")
    r = sample.evaluate_shapes(FakeModel(), None, FakeTokenizer(), n_prompts=6, n_images=5, progress=False,
                               split="train")
    assert list(r["gen"]) == ["train"] and len(drawn) == 6 and r["und_split"] == "train"
    assert "recon" not in r and set(r["und"]) == set(QUESTIONS)
    assert len(read) == 5 and all(split == "train" and seed != 0 for seed, split in read)
    held = {sample.shapes_caption(dict(shape=s, color=c, where=w, size=z, background=b))
            for c, s, w in HELDOUT for z in sample.SIZES for b in sample.BACKGROUNDS}
    assert not held & set(drawn)
    assert "understanding (train-split images)" in sample.format_results(r)
    with pytest.raises(ValueError, match="split"):
        sample.evaluate_shapes(FakeModel(), None, FakeTokenizer(), split="heldout")


def test_shipped_checkpoint_loads_and_draws_the_default_prompt():
    # the demo checkpoint in the repository (README quickstart): strict load, its sampling defaults,
    # and the README's default prompt read back as asked by data.read_shapes in at least one of the
    # four default samples (seed 0: the strict reader finds four lumpy circles; color, size, place
    # and background right in all four, no stray blob)
    from sample import DEFAULT_CKPT
    from data import parse_shapes_caption, read_shapes
    import unified as U
    if not os.path.isdir(DEFAULT_CKPT):
        pytest.skip("no shipped checkpoint in this checkout")
    model, enc, tok = U.load_pretrained(DEFAULT_CKPT)
    assert (model.config.sample_cfg, model.config.sample_temperature) == (1.5, 0.4)
    prompt = "a large red circle in the center on a white background"
    with torch.no_grad():
        pix, _ = generate_codes(model, enc, [prompt] * 4, model.config.sample_cfg,
                                model.config.sample_temperature, generator=torch.Generator().manual_seed(0))
        got = [read_shapes(im) for im in tok.decode(pix).float()]
    want = parse_shapes_caption(prompt)
    assert all(g[k] == want[k] for g in got for k in ("color", "size", "where", "background")), got
    assert all(g["extra"] == 0 for g in got), got
    assert sum(g["shape"] == want["shape"] for g in got) >= 1, got


def test_read_back_report_counts_images_that_match_a_benchmark_prompt(capsys):
    # the text → image CLI's last lines: per-image read-back and the count matching the prompt
    from sample import ATTRS, read_back_accuracy, read_back_report
    from data import parse_shapes_caption, read_shapes, render_shapes
    prompt = "a large red circle in the center on a white background"
    want = parse_shapes_caption(prompt)
    images = torch.stack([to_tensor(render_shapes(want)), to_tensor(render_shapes(dict(want, shape="square"))),
                          to_tensor(render_shapes(want))])
    assert read_back_report(prompt, images) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"read back sample_00: {prompt}"
    assert out[1] == "read back sample_01: a large red square in the center on a white background  (differs)"
    assert out[-1] == "2 of 3 read back as asked"
    assert read_back_report("a cat on a sofa", images) is None  # not a benchmark caption: silent
    assert capsys.readouterr().out == ""
    # a stray blob beside the right object makes the image wrong, on every attribute
    blob = images[0].clone()
    blob[:, 6:10, 50:54] = -1  # black
    assert read_back_report(prompt, torch.stack([images[0], blob])) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"read back sample_01: {prompt} + 1 extra object  (differs)"
    acc = read_back_accuracy([want] * 2, [images[0], blob])
    dirt = acc.pop("bg_dirty")  # the mean of read_shapes' bg_dirty: 0 on the clean render
    assert acc == {a: 0.5 for a in ATTRS + ("all",)}
    assert dirt == pytest.approx(read_shapes(blob)["bg_dirty"] / 2) and dirt > 0


def test_evaluate_shapes_passes_its_sampling_settings(monkeypatch):
    # --eval shapes --top_k/--top_p reach the sampler (EXPERIMENTS.md's sampling sweep is run this way)
    import sample
    seen = []

    def record(model, enc, captions, cfg, temperature, top_k=None, top_p=None, generator=None):
        seen.append((cfg, temperature, top_k, top_p))
        raise StopIteration  # enough: the first call's arguments are what this test is about

    class FakeModel:
        pix_codebook = torch.zeros(1)

    monkeypatch.setattr(sample, "generate_codes", record)
    with pytest.raises(StopIteration):
        sample.evaluate_shapes(FakeModel(), None, None, cfg=1.5, temperature=0.7, top_k=3, top_p=0.9, progress=False)
    assert seen == [(1.5, 0.7, 3, 0.9)]


@torch.no_grad()
def test_answer_never_contains_special_tokens(ckpt, monkeypatch):
    # A model whose logits favour every special token but the end-of-turn ones by a wide margin
    # (today's failure: "<|vision_start|>ree") must still answer with text only, the very text the
    # unmodified model answers; and favouring <|im_end|> ends the answer at once.
    _, model, tok, enc = ckpt
    image = to_tensor(shapes_sample(5)["image"], size=32)
    question = "What shape is in the image?"
    plain = answer(model, enc, tok, image, question, max_new_tokens=24)
    assert plain and "<|" not in plain
    special = model.config.special_tokens
    ends = {special["<|im_end|>"], special["<|endoftext|>"]}
    others = sorted({enc.encode_single_token(t) for t in enc.special_tokens_set} - ends)
    assert special["<|vision_start|>"] in others
    head = model.llm.head

    def favour(ids):
        def biased(h):
            logits = head(h).clone()
            logits[..., ids] += 100.0
            return logits
        return biased

    monkeypatch.setattr(model.llm, "head", favour(others))
    assert answer(model, enc, tok, image, question, max_new_tokens=24) == plain
    monkeypatch.setattr(model.llm, "head", favour([special["<|im_end|>"]]))
    assert answer(model, enc, tok, image, question, max_new_tokens=24) == ""


def test_shapes_vocabulary_is_the_benchmarks_words():
    from data import QUESTIONS, shapes_vocabulary
    from sample import unknown_words
    vocab = shapes_vocabulary()
    for i in range(50):
        s = shapes_sample(i)
        assert unknown_words(s["caption"], vocab) == []
        assert all(unknown_words(q + " " + a, vocab) == [] for q, a in s["qa"])
    assert unknown_words(" ".join(QUESTIONS.values()), vocab) == []
    assert unknown_words("How many shapes are there? How many?", vocab) == ["how", "many", "shapes", "are", "there"]
    assert unknown_words("A LARGE Red circle on a white background", vocab) == []
    assert {"purple", "triangle", "bottom", "gray", "describe"} <= set(vocab) and "cat" not in vocab
    assert list(vocab) == sorted(set(vocab))  # sorted, once each: the teacher's word ids


def test_cli_warns_in_one_line_about_words_the_demo_never_saw(ckpt, tmp_path):
    shapes_sample(1)["image"].save(tmp_path / "x.png")
    args = ("--ckpt", ckpt[0], "--image", str(tmp_path / "x.png"), "--max_new_tokens", "4", "--device", "cpu")
    r = run_cli(*args, "--prompt", "How many shapes are there?")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:"), r.stderr
    assert all(repr(w) in lines[0] for w in ("how", "many", "shapes", "are", "there"))
    r = run_cli(*args, "--prompt", "What color is the shape?")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_cpu_threads_default_to_one_unless_set():
    from sample import cpu_threads
    assert cpu_threads(0, {}) == 1
    assert cpu_threads(0, {"OMP_NUM_THREADS": "3"}) == 3
    assert cpu_threads(0, {"OMP_NUM_THREADS": ""}) == 1
    assert cpu_threads(2, {"OMP_NUM_THREADS": "3"}) == 2  # --threads wins


def test_cli_figure_writes_the_demo_picture(ckpt, tmp_path):
    r = run_cli("--ckpt", ckpt[0], "--figure", str(tmp_path / "a" / "demo.png"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "a" / "demo.png")
    assert im.mode == "RGB" and im.width == 800 and im.height > 3 * 64
    r = run_cli("--ckpt", ckpt[0], "--figure", str(tmp_path / "b.png"), "--prompt", "x", "--device", "cpu")
    assert r.returncode == 2 and "--prompt does not apply to --figure" in r.stderr


def test_verdict_says_what_the_reader_saw():
    from data import parse_shapes_caption, read_shapes, render_shapes
    from sample import verdict
    want = parse_shapes_caption("a large red circle in the center on a white background")
    assert verdict(read_shapes(render_shapes(want)), want) == "circle OK"
    got = read_shapes(render_shapes(dict(want, shape="square", where="top")))
    assert verdict(got, want) == "square (x), where: top"
    assert verdict(dict(got, shape="unclear", where="center", extra=2), want) == "unclear (x), +2 extra"
    assert verdict(dict(got, shape=None), want) == "no object"


def test_cli_reader_grid_writes_the_verdicts_picture(ckpt, tmp_path):
    from sample import GRID_CAPTIONS
    r = run_cli("--ckpt", ckpt[0], "--reader_grid", str(tmp_path / "a" / "v.png"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "a" / "v.png")
    side = 2 * 32  # the tiny checkpoint's 32 px images at 2x
    assert im.mode == "RGB" and im.size == (8 * (side + 4), len(GRID_CAPTIONS) // 2 * (side + 40))
    lines = r.stdout.splitlines()
    assert len(lines) == 4 * len(GRID_CAPTIONS) + 1 and lines[0].startswith("0.0  ")
    assert lines[-1].startswith(str(tmp_path / "a" / "v.png"))
    r = run_cli("--ckpt", ckpt[0], "--reader_grid", str(tmp_path / "b.png"), "--eval", "shapes", "--device", "cpu")
    assert r.returncode == 2 and "--eval does not apply to --reader_grid" in r.stderr
    r = run_cli("--ckpt", ckpt[0], "--reader_grid", "x.png", "--figure", "y.png", "--device", "cpu")
    assert r.returncode == 2 and "does not apply to --figure" in r.stderr


@torch.no_grad()
def test_compiled_steps_read_a_rounded_prefix_and_draw_the_same_codes(ckpt, monkeypatch):
    # compile_steps with torch.compile left out (compiling takes minutes on a busy CPU): what remains
    # is the wrapper that rounds the LLM's cache reads up to kv_round slots, the mask hiding the extra.
    import sample
    from unified import KVCache
    _, model, tok, enc = ckpt
    captions = ["a small red circle at the top on a white background", "a large blue square"]
    want = generate_codes(model, enc, captions, cfg=3.0, temperature=0.0)
    model = copy.deepcopy(model)
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    sample.compile_steps(model, torch.device("cpu"), kv_round=8)
    reads, update = [], KVCache.update

    def recording(self, input_pos, k, v, kv_len=None):
        if self.k.shape[2] > model.config.rvq_depth:  # the LLM's cache, not a depth head's
            reads.append((kv_len, self.k.shape[2]))
        return update(self, input_pos, k, v, kv_len)

    monkeypatch.setattr(KVCache, "update", recording)
    got = generate_codes(model, enc, captions, cfg=3.0, temperature=0.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(n % 8 == 0 or n == size for n, size in reads) and len({n for n, _ in reads}) > 1
    # image → text through the same wrapper (no padding there: it adds the mask itself)
    image, question = to_tensor(shapes_sample(5)["image"], size=32), "What shape is in the image?"
    want = answer(ckpt[1], enc, tok, image, question, max_new_tokens=12)
    reads.clear()
    assert answer(model, enc, tok, image, question, max_new_tokens=12) == want
    assert reads and all(n % 8 == 0 or n == size for n, size in reads)
