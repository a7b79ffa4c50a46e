# Stage-1 training, evaluation and the command line of tokenizer.py, on CPU with tiny configs: a
# 3-layer, 64-wide SigLIP stands in for the teacher, and the shapes preset is shrunk by flags.
import os
import re
import socket
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import data as D
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SIGLIP = replace(T.SIGLIP_PRESETS["shapes"], width=64, mlp=128, layers=3, heads=2, text_width=64,
                      text_mlp=128, text_layers=1, text_heads=2, embed_dim=64, text_len=72)
# the shapes preset shrunk: taps shortcut 1 / reconstruction 2 / semantic 2 of the 3 layers, so one
# layer runs after the quantized semantics; GAN from step 1, two micro-batches per step
TINY = ["--preset", "shapes", "--sem_layer", "2", "--batch_size", "4", "--grad_accum", "2", "--disc_start", "1",
        "--warmup", "2", "--eval_n", "8", "--eval_every", "100", "--ckpt_every", "100", "--log_every", "1"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher"))
    T.SigLIP(TINY_SIGLIP).save_pretrained(path)
    return path


def run(argv, capsys):
    T.main(argv)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def straight(teacher_dir, tmp_path_factory):
    # 4 uninterrupted steps; shared by the resume and eval tests
    out = str(tmp_path_factory.mktemp("straight"))
    T.main(TINY + ["--siglip", teacher_dir, "--out_dir", out, "--max_steps", "4"])
    return out


# -----------------------------------------------------------------------------
# command line


def test_flags_mirror_train_config():
    assert T.parse_args([]) == T.TrainConfig() == T.TRAIN_PRESETS["so400m"]
    c = T.TrainConfig()  # the official recipe (run_stage1.sh, train.py)
    assert (c.lr, c.betas, c.weight_decay, c.warmup, c.batch_size) == (7.2e-5, (0.5, 0.9), 1e-4, 10000, 32)
    assert (c.sem_layer_weight, c.sem_pool_weight, c.commit_weight, c.mse_weight, c.lpips_weight,
            c.gan_weight) == (5, 1, 5, 5, 1, 0.75)
    # every field is a flag of its own type: giving each its default back reproduces the defaults
    argv = []
    for f in fields(T.TrainConfig):
        v = f.default
        if v is None:
            continue
        argv += [f"--{f.name}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    assert T.parse_args(argv) == T.TrainConfig()
    # a preset, then explicit flags over it
    cfg = T.parse_args(["--preset", "shapes", "--lr", "0.01", "--betas", "0.9,0.99", "--compile", "--resume",
                        "false", "--rec_layer", "3"])
    assert cfg == replace(T.TRAIN_PRESETS["shapes"], lr=0.01, betas=(0.9, 0.99), compile=True, rec_layer=3)


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "unrecognized arguments: --lrr"),
    (["--l", "1"], "unrecognized arguments: --l"),  # no prefix abbreviations
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--compile", "maybe"], "expected true or false"),
    (["--preset", "Shapes"], "unknown preset 'Shapes'"),  # exact names only
    (["--stage", "train"], "--stage 'train': choose from"),
    (["--max_steps", "0"], "--max_steps must be at least 1"),
    (["--preset", "shapes-teacher", "--eval"], "--eval evaluates a tokenizer checkpoint"),
    (["--ablation", "joint", "--rec_layer", "6"], "drop --rec_layer"),
    (["--ablation", "recon_only", "--sem_weight", "0.5"], "drop --sem_weight"),
])
def test_flag_errors(argv, message):
    with pytest.raises(T.UsageError, match=re.escape(message)):
        T.parse_args(argv)


def test_ablation_switches_mirror_table3():
    s = T.SIGLIP_PRESETS["shapes"]
    # (d), the paper: shallow reconstruction (+ shortcut), deep semantics
    c = T.tokenizer_config(T.parse_args(["--preset", "shapes"]), s)
    assert (c.rec_layer, c.shortcut_layer, c.shortcut_weight, c.sem_layer) == (2, 1, 0.6, 7)
    # (b) joint at the deep layer: one flag
    cfg = T.parse_args(["--preset", "shapes", "--ablation", "joint"])
    c = T.tokenizer_config(cfg, s)
    assert (c.rec_layer, c.sem_layer, c.shortcut_weight, c.joint) == (7, 7, 0.0, True)
    torch.manual_seed(0)
    m = T.DualTokenizer(c).eval()
    # one codebook (VILA-U style): no pixel branch; the pixel codes are the semantic codes, and the
    # decoder reads them through the semantic codebook, in training and in encode/decode
    assert m.pix_short is None and m.pix_rvq is None and m.pix_quantizer is m.sem_rvq
    assert not any(k.startswith(("pix_rvq.", "pix_pre.")) for k in m.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    pix, sem = m.encode(x)
    out = m(x)
    assert torch.equal(pix, sem) and torch.equal(out.pix_codes, out.sem_codes) and out.commit_pix == 0
    assert torch.allclose(m.decode(pix), out.recon.clamp(-1, 1), atol=1e-4)  # straight-through rounding
    with pytest.raises(ValueError, match="no pixel codes"):
        import unified as U
        U.UnifiedModel.from_tokenizer(U.UnifiedConfig.preset("shapes"), m)
    # (c) reconstruction only: one flag (or --sem_weight 0)
    assert T.parse_args(["--ablation", "recon_only"]).sem_weight == 0.0
    # single switches, checked against the backbone
    c = T.tokenizer_config(T.parse_args(["--preset", "shapes", "--rec_layer", "4", "--sem_layer", "6",
                                         "--shortcut_weight", "0.3"]), s)
    assert (c.rec_layer, c.sem_layer, c.shortcut_weight) == (4, 6, 0.3)
    with pytest.raises(T.UsageError, match="sem_layer = 9 outside"):
        T.tokenizer_config(T.parse_args(["--preset", "shapes", "--sem_layer", "9"]), s)
    # the codebook size: the preset's unless given, and it reaches both RVQs
    assert T.tokenizer_config(T.parse_args(["--preset", "shapes"]), s).codebook_size == 256
    c = T.tokenizer_config(T.parse_args(["--preset", "shapes", "--codebook_size", "1024"]), s)
    m = T.DualTokenizer(c)
    assert m.pix_rvq.codebook.shape[-2] == m.sem_rvq.codebook.shape[-2] == 1024
    with pytest.raises(T.UsageError, match="codebook_size and depth ≥ 1, got 32, 0, 4"):
        T.tokenizer_config(T.parse_args(["--preset", "shapes", "--codebook_size", "0"]), s)


def test_cli_errors_are_one_line(tmp_path):
    # one error from the checks on inputs, one from the flag parser (the rest: test_flag_errors)
    for argv, message in ((["--preset", "shapes", "--siglip", str(tmp_path / "none")], "none: no such directory (make it first"),
                          (["--preset", "shapes", "--bogus", "1"], "unrecognized arguments: --bogus")):
        p = subprocess.run([sys.executable, "tokenizer.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


# -----------------------------------------------------------------------------
# pieces of the recipe


def test_lr_schedule():
    cfg = T.TrainConfig(lr=1.0, min_lr=0.1, warmup=10, max_steps=110)
    lr = [T.lr_at(cfg, s) for s in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == lr[10] == 1.0  # linear warmup (open_clip: (step+1)/warmup)
    assert lr[60] == pytest.approx(0.55) and lr[110] == pytest.approx(0.1)  # half cosine to min_lr
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    # decay_steps stretches the cosine past max_steps: a run cut at 110 is the first half of a 210-step one
    assert T.lr_at(replace(cfg, decay_steps=210), 110) == pytest.approx(0.55)


def test_text_ids_are_padded_to_the_fixed_length():
    encode = T.text_encoder(T.TrainConfig(text_tokenizer="bytes"), 12)
    ids = encode(["ab", "x" * 20])
    assert ids.dtype == torch.long and ids.shape == (2, 12)
    assert ids[0].tolist() == [97, 98] + [256] * 10  # <|endoftext|> = 256 fills up to the pooled last position
    assert ids[1].tolist() == [120] * 12             # truncated


def test_shapes_prompt_ensembles():
    from collections import Counter
    for attr, n_classes in (("shape", 3), ("color", 6)):
        prompts = T.shapes_prompts(attr)
        assert len(prompts) == n_classes and all(len(p) == 18 for p in prompts)
        for value, class_prompts in zip(T.SHAPES_ATTRS[attr], prompts):
            parsed = [D.parse_shapes_caption(p) for p in class_prompts]
            assert all(a[attr] == value for a in parsed)
            # the other attributes are balanced within each class, so the mean embedding cancels them
            for other, values in T.SHAPES_ATTRS.items():
                if other != attr:
                    assert Counter(a[other] for a in parsed) == {v: 18 // len(values) for v in values}


def test_rank_digest_sees_one_element():
    torch.manual_seed(0)
    a = T.DualTokenizer(replace(T.TOKENIZER_PRESETS["shapes"], siglip=TINY_SIGLIP, sem_layer=2))
    b = T.DualTokenizer(a.config)
    b.load_state_dict(a.state_dict())
    disc = T.PatchGAN()
    assert torch.equal(T.tensor_digest(T.synced_tensors(a, disc)), T.tensor_digest(T.synced_tensors(b, disc)))
    with torch.no_grad():
        b.sem_rvq.codebook[0, 5, 3] += 1e-3  # one codebook entry, one coordinate
    assert not torch.equal(T.tensor_digest(T.synced_tensors(a, disc)), T.tensor_digest(T.synced_tensors(b, disc)))


# -----------------------------------------------------------------------------
# the stages


def test_teacher_stage(tmp_path, capsys):
    out = run(["--preset", "shapes-teacher", "--max_steps", "8", "--batch_size", "8", "--warmup", "4",
               "--log_every", "1", "--eval_every", "8", "--eval_n", "8", "--out_dir", str(tmp_path)], capsys)
    losses = [float(v) for v in re.findall(r"sigmoid loss ([\d.]+)", out)]
    assert len(losses) == 8 and all(np.isfinite(losses))
    # the bias starts at the prior log-odds of a positive among each image's 8 · (1 + 8 + 3) texts (its
    # caption, the batch's others, 8 hard negatives and 3 partial captions each): −log 95; step 1 moves
    # it by ≤ lr/4 = 2.5e-4
    b1 = float(re.search(r"^step 1 \|.* b (-?[\d.]+) \|", out, re.M).group(1))
    assert b1 == pytest.approx(-np.log(95), abs=0.006)
    for split in ("train split, unseen seed", "held-out combinations"):
        assert re.search(rf"zero-shot on 8 images \({split}\): shape [\d.]+%  color [\d.]+%", out)
        assert re.search(rf"best of the 972 captions \({split}\): shape [\d.]+%  color [\d.]+%", out)
    # a SigLIP directory like any other: the tokenizer stage loads it as it loads google/siglip2-*
    siglip = T.SigLIP.from_pretrained(str(tmp_path))
    assert siglip.config == T.SIGLIP_PRESETS["shapes"]
    torch.manual_seed(0)
    assert not torch.equal(siglip.logit_bias, T.SigLIP(siglip.config).logit_bias)  # trained, not the init


def test_teacher_batch_labels_every_text_by_the_attributes_it_names():
    # known answers on a 2-image batch: a text is +1 for exactly the images that have every attribute it
    # names (read back from its words by a regex of its own), and every text appears once
    a = dict(shape="circle", color="red", size="small", where="top left", background="gray")
    b = dict(a, shape="square", where="center")
    cfg = T.TrainConfig(hard_negatives=8, partial_captions=6, seed=3)
    encode = T.text_encoder(T.TrainConfig(text_tokenizer="words"), 16)
    _, ids, labels = T.teacher_batch({"image": torch.zeros(2, 3, 64, 64),
                                      "caption": [D.shapes_caption(a), D.shapes_caption(b)]}, cfg, encode, 5, 1)
    texts = [D.shapes_caption(a), D.shapes_caption(b)]
    for i, attrs in enumerate((a, b)):
        texts += D.shapes_hard_negatives(attrs, 8, key=f"3:5:1:{i}")
        texts += [D.shapes_caption(p) for p in D.shapes_partial_captions(attrs, 6, key=f"3:5:1:{i}")]
    texts = list(dict.fromkeys(texts))
    assert torch.equal(ids, encode(texts)) and labels.shape == (len(texts), 2)
    alt = lambda vs: "|".join(vs)
    grammar = re.compile(rf"a(?: ({alt(D.SIZES)}))?(?: ({alt(D.COLORS)}))? ({alt(D.SHAPES)}|shape)"
                         rf"(?: ({alt(D.WHERE_PHRASES.values())}))?(?: on a ({alt(D.BACKGROUNDS)}) background)?")
    phrase_to_where = {p: w for w, p in D.WHERE_PHRASES.items()}
    partial = 0
    for row, text in zip(labels.tolist(), texts):
        size, color, shape, phrase, background = grammar.fullmatch(text).groups()
        named = {k: v for k, v in dict(size=size, color=color, shape=None if shape == "shape" else shape,
                                       where=phrase_to_where.get(phrase), background=background).items() if v}
        partial += len(named) < 5
        assert row == [1.0 if all(x[k] == v for k, v in named.items()) else -1.0 for x in (a, b)], text
    assert labels[:2].tolist() == [[1, -1], [-1, 1]] and partial >= 4


def test_resume_matches_straight_run(straight, teacher_dir, tmp_path, capsys):
    # 2 steps, stop, resume for 2 more (decay_steps keeps the 4-step schedule) == 4 straight steps
    common = TINY + ["--siglip", teacher_dir, "--out_dir", str(tmp_path), "--decay_steps", "4"]
    run(common + ["--max_steps", "2"], capsys)
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 2
    out = run(common + ["--max_steps", "4", "--resume"], capsys)
    assert re.search(r"^step 3 \|", out, re.M) and not re.search(r"^step [12] \|", out, re.M)
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # weights and EMA codebooks, bit for bit
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(os.path.join(straight, "train_state.pt"), weights_only=True)
    sb = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for k in sa["disc"]:
        assert torch.equal(sa["disc"][k], sb["disc"][k]), k
    assert torch.equal(sa["rng"][0], sb["rng"][0])
    # the run trained: the ViT moved, the text tower (zero-shot's classifier) did not
    teacher = T.SigLIP.from_pretrained(teacher_dir).state_dict()
    assert not torch.equal(a["siglip.vision.blocks.0.mlp.fc.weight"], teacher["vision.blocks.0.mlp.fc.weight"])
    assert all(torch.equal(a[f"siglip.{k}"], v) for k, v in teacher.items() if k.startswith("text."))


def test_reconstruction_only_trains_the_pixel_path_only(teacher_dir, tmp_path, capsys):
    out = run(TINY + ["--siglip", teacher_dir, "--out_dir", str(tmp_path), "--max_steps", "2",
                      "--ablation", "recon_only"], capsys)
    assert "reconstruction only (Table 3(c))" in out
    m = T.DualTokenizer.from_pretrained(str(tmp_path)).state_dict()
    teacher = T.SigLIP.from_pretrained(teacher_dir).state_dict()
    moved = {k for k, v in teacher.items() if not torch.equal(m[f"siglip.{k}"], v)}
    # layers 1..rec_layer (2) and the patch embedding train; layer 3, the head and the text tower do not
    assert any(k.startswith("vision.blocks.1.") for k in moved) and "vision.pos_embed" in moved
    assert not any(k.startswith(("vision.blocks.2.", "vision.head.", "vision.ln_post.", "text.")) for k in moved)


def test_decoder_only_keeps_every_code(straight, teacher_dir, tmp_path, capsys):
    # --init a trained tokenizer --decoder_only (GAN on, as TINY): only the modules after the codes move,
    # so a stage-2 model trained on its codes reads the same codes from the result
    out = run(TINY + ["--siglip", teacher_dir, "--init", straight, "--decoder_only", "--out_dir", str(tmp_path),
                      "--max_steps", "2"], capsys)
    assert "decoder only: the codes of" in out
    a, b = T.DualTokenizer.from_pretrained(straight), T.DualTokenizer.from_pretrained(str(tmp_path))
    sa, sb = a.state_dict(), b.state_dict()
    moved = {k.split(".")[0] for k in sa if not torch.equal(sa[k], sb[k])}
    assert moved == {"pix_post", "post_quant", "decoder"}, moved  # codebooks (EMA buffers) included
    x = torch.stack([D.to_tensor(D.shapes_sample(i)["image"]) for i in range(4)])
    assert all(torch.equal(p, q) for p, q in zip(a.encode(x), b.encode(x)))
    for extra, message in ((["--decoder_only"], "--decoder_only trains a decoder on the codes of a trained tokenizer"),
                           (["--init", str(tmp_path / "none")], f"--init {tmp_path / 'none'}: no such directory"),
                           (["--init", teacher_dir], f"--init {teacher_dir}: {teacher_dir} is not a")):  # a SigLIP's
        with pytest.raises(T.UsageError, match=re.escape(message)):
            T._main(TINY + ["--siglip", teacher_dir, "--out_dir", str(tmp_path / "x"), *extra])


def test_decoder_only_resumes_exactly(straight, teacher_dir, tmp_path, capsys):
    # 2 steps, stop, resume for 2 more == 4 straight decoder-only steps, bit for bit
    common = TINY + ["--siglip", teacher_dir, "--init", straight, "--decoder_only", "--decay_steps", "4"]
    run(common + ["--out_dir", str(tmp_path / "a"), "--max_steps", "4"], capsys)
    run(common + ["--out_dir", str(tmp_path / "b"), "--max_steps", "2"], capsys)
    run(common + ["--out_dir", str(tmp_path / "b"), "--max_steps", "4", "--resume"], capsys)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.conv_out.weight"], load_file(os.path.join(straight, "model.safetensors"))["decoder.conv_out.weight"])


def test_eval_block_and_pngs(straight, teacher_dir, capsys):
    out = run(TINY + ["--siglip", teacher_dir, "--out_dir", straight, "--eval"], capsys)
    assert "==== eval of" in out and "LPIPS off" in out
    # two blocks: unseen images of the training combinations, then the held-out combinations
    out, held = out.split("on shapes, held-out combinations")
    assert len(re.findall(r"zero-shot \w+ +tokenizer [\d.]+%   teacher [\d.]+%", held)) == len(T.SHAPES_ATTRS)
    psnr = float(re.search(r"PSNR ([\d.]+) dB", out).group(1))
    used = [float(v) for v in re.findall(r"used ([\d.]+)% of 256", out)]
    assert len(used) == 2 and all(0 < u <= 100 for u in used)
    acc = {m.group(1): (float(m.group(2)), float(m.group(3)))
           for m in re.finditer(r"zero-shot (\w+) +tokenizer ([\d.]+)%   teacher ([\d.]+)%", out)}
    assert set(acc) == set(T.SHAPES_ATTRS)
    # the PNGs for clean-fid: the eval set itself and its reconstructions
    ev = os.path.join(straight, "eval")
    real = sorted(os.listdir(os.path.join(ev, "real")))
    assert real == sorted(os.listdir(os.path.join(ev, "recon"))) == [f"{i:05d}.png" for i in range(8)]
    ds = D.ShapesDataset(8, seed=1)
    x = np.stack([np.asarray(Image.open(os.path.join(ev, "real", f))) for f in real]).astype(np.float64)
    y = np.stack([np.asarray(Image.open(os.path.join(ev, "recon", f))) for f in real]).astype(np.float64)
    assert all(np.array_equal(x[i], np.asarray(D.to_pil(ds[i]["image"]))) for i in range(8))
    png_psnr = np.mean(10 * np.log10(255.0 ** 2 / ((x - y) ** 2).reshape(8, -1).mean(1)))
    assert abs(png_psnr - psnr) < 0.05  # the reported PSNR is that of the written images (up to 8-bit rounding)
    # the strict reader's line: its verdicts on the written reconstructions against the samples' attributes
    read = D.read_back_accuracy([D.shapes_sample(i, 1)["attrs"] for i in range(8)],
                                [Image.open(os.path.join(ev, "recon", f)) for f in real])
    line = re.search(r"reconstructions read right \(data.read_shapes\)   all five ([\d.]+)%(.*)", out)
    assert float(line.group(1)) == pytest.approx(100 * read["all"], abs=0.06)
    assert {a: float(v) for a, v in re.findall(r"(\w+) ([\d.]+)%", line.group(2))} == \
        {a: pytest.approx(100 * read[a], abs=0.06) for a in T.SHAPES_ATTRS}
    # the grid: the first batch (4 images), originals above reconstructions
    assert Image.open(os.path.join(ev, "grid.png")).size == (4 * 64, 2 * 64)
    # the teacher's zero-shot, recomputed independently: labels from the sample attributes,
    # embeddings from encode_image / encode_text
    teacher = T.SigLIP.from_pretrained(teacher_dir)
    encode = T.text_encoder(T.TrainConfig(text_tokenizer="words"), TINY_SIGLIP.text_len)
    with torch.no_grad():
        img = F.normalize(teacher.encode_image(torch.stack([ds[i]["image"] for i in range(8)])), dim=-1)
        for attr in T.SHAPES_ATTRS:
            W = torch.stack([F.normalize(F.normalize(teacher.encode_text(encode(p)), dim=-1).mean(0), dim=-1)
                             for p in T.shapes_prompts(attr)])
            truth = torch.tensor([T.SHAPES_ATTRS[attr].index(D.shapes_sample(i, 1)["attrs"][attr])
                                  for i in range(8)])
            assert acc[attr][1] == pytest.approx(100 * ((img @ W.t()).argmax(-1) == truth).float().mean().item(),
                                                 abs=0.06)
    # and by the best of the world's 972 captions, recomputed from an enumeration of its own
    caps = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"zero-shot (\w+) +tokenizer .*\(best caption: tokenizer [\d.]+%   teacher ([\d.]+)%\)", out)}
    world = [dict(shape=a, color=b, size=c, where=d, background=e) for a in D.SHAPES for b in D.COLORS
             for c in D.SIZES for d in D.WHERES for e in D.BACKGROUNDS]
    assert len(world) == 972
    with torch.no_grad():
        best = (img @ F.normalize(teacher.encode_text(encode([D.shapes_caption(w) for w in world])), dim=-1).t()).argmax(-1)
    for attr in T.SHAPES_ATTRS:
        hits = [world[b][attr] == D.shapes_sample(i, 1)["attrs"][attr] for i, b in enumerate(best.tolist())]
        assert caps[attr] == pytest.approx(100 * np.mean(hits), abs=0.06)


def test_torchrun_two_ranks_stay_in_sync(teacher_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "tokenizer.py", *TINY, "--siglip", teacher_dir, "--out_dir", str(tmp_path), "--max_steps", "3",
            "--ckpt_every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # after steps 2 and 3 every rank compared its weights and codebooks with the others (a mismatch raises)
    assert re.findall(r"step (\d): checkpoint in .* \(2 rank\(s\) in sync over \d+ tensors\)", p.stdout) == ["2", "3"]
    assert "2 process(es) on cpu" in p.stdout
    assert T.DualTokenizer.from_pretrained(str(tmp_path)).config.sem_layer == 2


def test_eval_on_a_class_folder_set(straight, teacher_dir, tmp_path, capsys):
    # the real-data route (ImageNet val layout via data.ClassFolderDataset), on shapes images filed by shape
    root = tmp_path / "val"
    for i in range(9):
        s = D.shapes_sample(i, seed=2)
        os.makedirs(root / s["attrs"]["shape"], exist_ok=True)
        s["image"].save(root / s["attrs"]["shape"] / f"{i}.png")
    out = run(TINY + ["--siglip", teacher_dir, "--out_dir", straight, "--eval", "--eval_data", str(root),
                      "--prompt", "a large red {} in the center on a white background"], capsys)
    assert f"on {root}: 8 images" in out  # --eval_n 8 of the 9, spread over the sorted class folders
    m = re.search(r"zero-shot top-1 +tokenizer ([\d.]+)%   teacher ([\d.]+)%", out)
    assert m and all(0 <= float(v) <= 100 for v in m.groups())
    # the images of an earlier evaluation in the same folder are gone: FID sees this set only
    assert sorted(os.listdir(os.path.join(straight, "eval", "recon"))) == [f"{i:05d}.png" for i in range(8)]
    ref = [np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))]  # ClassFolderDataset's order
    kept = [ref[i] for i in np.linspace(0, 8, 8).round().astype(int)]
    written = [np.asarray(Image.open(os.path.join(straight, "eval", "real", f"{i:05d}.png"))) for i in range(8)]
    assert all(np.array_equal(a, b) for a, b in zip(kept, written))
