"""
Data for DualToken: the embedded shapes benchmark, real-world image readers, the text tokenizer.

Every stage reads its data through this file:
- the shapes benchmark (DESIGN.md, "Embedded default"): `render_shapes`, `shapes_sample`,
  `read_shapes`, `ShapesDataset` — a small offline world in which the whole method trains on a CPU;
- real data in the layouts people already have, all yielding [-1, 1] image tensors:
  `WebDataset` (img2dataset tar shards such as CC12M; streaming, split over DDP ranks and
  DataLoader workers), `ClassFolderDataset` (ImageNet-style, for zero-shot), `CaptionFolderDataset`
  (images with sidecar .txt captions), `LlavaDataset` (LLaVA instruction JSON);
- preprocessing as SigLIP does it: any PIL mode to RGB, a direct resize to the square input size,
  scale to [-1, 1] (`to_tensor`), and back (`to_pil`);
- the text side: `load_text_tokenizer` (an HF byte-level BPE tokenizer as a tiktoken Encoding, or the
  tiny "bytes" demo encoding) and `encode_chat` (Qwen chat format -> token ids + loss mask).

Bad samples never stop training: unreadable images, missing captions and broken shards are skipped
and counted in each dataset's `stats` dict, which the training scripts print in their logs. A source
with no readable sample at all never hangs a run either: `NoSamples`, one line naming it, in seconds.

Imports only the standard library, torch, numpy, pillow and tiktoken. `python data.py bench` times
the shapes benchmark.
"""

import io
import itertools
import json
import os
import random
import re
import sys
import tarfile
import time
import unicodedata
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import tiktoken
import torch
from PIL import Image, ImageDraw, ImageOps

# ----------------------------------------------------------------------------------------------
# The shapes benchmark (DESIGN.md, "Embedded default")

BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 16, "large": 28}  # pixels across (bounding box side)
WHERES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WHERE_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
# question per attribute; "caption" is the free-form description
QUESTIONS = {
    "shape": "What shape is in the image?",
    "color": "What color is the shape?",
    "where": "Where is the shape?",
    "background": "What color is the background?",
    "size": "Is the shape large or small?",
    "caption": "Describe the image.",
}
SHAPES_RES = 64
SHAPES_SUPERSAMPLE = 4  # drawn at 4x and LANCZOS-downsampled, so edges are anti-aliased
SHAPES_JITTER = 2  # +-px on the object center; the bbox center stays inside its third

# Held-out (color, shape, where) combinations for compositional generalization: with colors, shapes
# and positions indexed in the order above (positions row-major), a combination is held out iff
# where_index == (color_index + 3 * shape_index) % 9. That is 18 of 162 (11%), one position per
# (color, shape) pair, and no two held-out combinations share a (color, where) or a (shape, where)
# pair — so every color, shape and position, and every pair of them, still appears in training.
HELDOUT = tuple(
    (c, s, w)
    for ci, c in enumerate(COLORS) for si, s in enumerate(SHAPES) for wi, w in enumerate(WHERES)
    if wi == (ci + 3 * si) % len(WHERES)
)
TRAIN_COMBOS = tuple(
    (c, s, w) for c in COLORS for s in SHAPES for w in WHERES if (c, s, w) not in set(HELDOUT)
)
SHAPES_SPLITS = {"train": TRAIN_COMBOS, "heldout": HELDOUT}


def shapes_center(attrs, offset=(0, 0)):
    """Object center (x, y) in pixels: {m, 32, 64 - m} per axis with m = size/2 + 4, plus jitter."""
    size = SIZES[attrs["size"]]
    m = size / 2 + 4
    row, col = divmod(WHERES.index(attrs["where"]), 3)
    grid = (m, SHAPES_RES / 2, SHAPES_RES - m)
    return grid[col] + offset[0], grid[row] + offset[1]


def _draw_shape(draw, shape, box, fill):
    """Draw one benchmark shape filling the pixel box [x0, x1) x [y0, y1) (integers, at the drawing's
    resolution); PIL's ellipse/rectangle include their end pixel. render_shapes and the reader's
    ideal shapes both draw through here."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":  # pointing up, base = box width, height = box height
        draw.polygon(((round((x0 + x1) / 2), y0), (x1 - 1, y1 - 1), (x0, y1 - 1)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_shapes(attrs, offset=(0, 0)):
    """attrs (shape, color, size, where, background) -> 64x64 RGB PIL image. `offset` is the jitter."""
    s = SHAPES_SUPERSAMPLE
    img = Image.new("RGB", (SHAPES_RES * s, SHAPES_RES * s), BACKGROUNDS[attrs["background"]])
    cx, cy = shapes_center(attrs, offset)
    half = SIZES[attrs["size"]] / 2  # base = height = size for the triangle too: the bbox is size x size
    box = tuple(round(v * s) for v in (cx - half, cy - half, cx + half, cy + half))
    _draw_shape(ImageDraw.Draw(img), attrs["shape"], box, COLORS[attrs["color"]])
    return img.resize((SHAPES_RES, SHAPES_RES), Image.Resampling.LANCZOS)


def shapes_caption(attrs):
    """The benchmark's caption of `attrs`. A partial dict gives a partial caption (the teacher's
    shapes_partial_captions): a missing shape reads "shape", any other missing attribute is left out."""
    where, background = attrs.get("where"), attrs.get("background")
    words = ("a", attrs.get("size"), attrs.get("color"), attrs.get("shape", "shape"), where and WHERE_PHRASES[where],
             background and f"on a {background} background")
    return " ".join(w for w in words if w)


_CAPTION_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(WHERE_PHRASES.values())}) on a ({'|'.join(BACKGROUNDS)}) background"
)


def parse_shapes_caption(caption):
    """The inverse of shapes_caption (sample.py's eval turns prompts back into expected attributes)."""
    m = _CAPTION_RE.fullmatch(caption.strip())
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    size, color, shape, phrase, background = m.groups()
    where = next(w for w, p in WHERE_PHRASES.items() if p == phrase)
    return dict(shape=shape, color=color, size=size, where=where, background=background)


def shapes_qa(attrs):
    """The six (question, answer) pairs, in QUESTIONS order; "where" answers drop the preposition."""
    answers = dict(attrs, caption=shapes_caption(attrs))
    return [(q, answers[k]) for k, q in QUESTIONS.items()]


def shapes_sample(index, seed=0, split="train"):
    """One benchmark sample, a pure function of (seed, index, split).

    -> dict(image=PIL 64x64 RGB, caption=str, attrs=dict(shape, color, size, where, background),
            qa=[(question, answer)] * 6, offset=(dx, dy) jitter in px)
    split "train" draws (color, shape, where) from TRAIN_COMBOS, "heldout" from HELDOUT; size,
    background and jitter are uniform in both.
    """
    if split not in SHAPES_SPLITS:
        raise ValueError(f"split must be one of {tuple(SHAPES_SPLITS)}, got {split!r}")
    # a private generator per sample: str seeds are hashed with SHA-512, so the stream is identical in
    # every process and DataLoader worker and independent of PYTHONHASHSEED and of the global RNG
    rng = random.Random(f"shapes:{split}:{seed}:{index}")
    color, shape, where = rng.choice(SHAPES_SPLITS[split])
    attrs = dict(shape=shape, color=color, size=rng.choice(tuple(SIZES)), where=where,
                 background=rng.choice(tuple(BACKGROUNDS)))
    offset = (rng.randint(-SHAPES_JITTER, SHAPES_JITTER), rng.randint(-SHAPES_JITTER, SHAPES_JITTER))
    return dict(image=render_shapes(attrs, offset), caption=shapes_caption(attrs), attrs=attrs,
                qa=shapes_qa(attrs), offset=offset)


# every attribute of the benchmark and its values, in caption order of importance for the tables
SHAPES_ATTRS = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "where": WHERES,
                "background": tuple(BACKGROUNDS)}


def _combo(attrs):  # what a split is made of (SHAPES_SPLITS)
    return attrs["color"], attrs["shape"], attrs["where"]


# The order in which shapes_hard_negatives changes attributes: each once, then place three more times.
# Place is what the teacher learns last: a place-changed negative is nearly its own caption to a text
# tower that does not yet read place, so the loss's pull on place is weak (EXPERIMENTS.md, §11).
HARD_NEGATIVE_ORDER = (*SHAPES_ATTRS, "where", "where", "where")


def shapes_hard_negatives(attrs, k, key, split="train"):
    """k captions that each differ from `attrs` in exactly one attribute (the combination stays in
    `split`), for the teacher's sigmoid loss: text-only negatives, a pure function of `key`.

    With independent samples two captions of a batch almost always differ in several attributes, so
    the loss is satisfied by the most salient one (background, then color) and learns shape and place
    last ("feature suppression"); a negative that differs in one attribute only makes every attribute
    pay from the first step (EXPERIMENTS.md, "The semantic teacher").
    """
    rng = random.Random(f"shapes-negatives:{split}:{key}")
    allowed, names, out = set(SHAPES_SPLITS[split]), list(HARD_NEGATIVE_ORDER), []
    while len(out) < k:
        name = names[len(out) % len(names)]  # every attribute in turn, then place again
        options = [v for v in SHAPES_ATTRS[name] if v != attrs[name] and _combo({**attrs, name: v}) in allowed]
        if not options:  # every alternative of this attribute is held out: take the next attribute
            names = [n for n in names if n != name]
            continue
        out.append(shapes_caption({**attrs, name: rng.choice(options)}))
    return out


def shapes_partial_captions(attrs, k, key):
    """k partial attribute dicts of `attrs` (caption each with shapes_caption), for the teacher's
    sigmoid loss: each keeps one attribute (2 draws in 5) or 2-4 of them, and is a positive for every
    image of the batch that it describes. A pure function of `key`.

    Full captions alone teach a text embedding that tells all 972 captions apart but is not additive:
    a class's mean over captions that vary the other attributes mixes them back in, and the prompt
    ensemble misreads size, place and background. A caption that names one attribute must align with
    every image that has it, which gives each attribute its own direction (EXPERIMENTS.md, §11).
    """
    rng = random.Random(f"shapes-partial:{key}")
    out = []
    for _ in range(k):
        keep = rng.sample(list(SHAPES_ATTRS), rng.choice((1, 1, 2, 3, 4)))
        out.append({a: v for a, v in attrs.items() if a in keep})
    return out


def shapes_words(text):
    return re.findall(r"[a-z]+", text.lower())


def shapes_vocabulary():
    """-> sorted tuple of the lower-case words of every benchmark caption (every combination of
    SHAPES_ATTRS through shapes_caption) and question (QUESTIONS): what the demo can understand, and
    the micro-SigLIP teacher's word-level text vocabulary."""
    captions = (shapes_caption(dict(zip(SHAPES_ATTRS, values)))
                for values in itertools.product(*SHAPES_ATTRS.values()))
    return tuple(sorted(set(shapes_words(" ".join(itertools.chain(captions, QUESTIONS.values()))))))


def _nearest(palette, rgb):
    return min(palette, key=lambda k: sum((a - b) ** 2 for a, b in zip(palette[k], rgb)))


def _components(mask):
    """4-connected blobs of a boolean mask, largest first, each as a pair of index arrays (ys, xs)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    blobs = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        blob, todo = [], deque([(y, x)])
        while todo:
            p, q = todo.popleft()
            blob.append((p, q))
            for a, b in ((p - 1, q), (p + 1, q), (p, q - 1), (p, q + 1)):
                if 0 <= a < h and 0 <= b < w and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    todo.append((a, b))
        blobs.append(tuple(np.array(blob).T))
    return sorted(blobs, key=lambda b: -len(b[0]))


def _ideal_mask(shape, box, res):
    """The pixels (res x res) more than half covered by the ideal shape drawn in box (x0, y0, x1, y1),
    rendered as render_shapes renders: at 4x through _draw_shape, LANCZOS-downsampled."""
    s = SHAPES_SUPERSAMPLE
    img = Image.new("L", (res * s, res * s), 0)
    _draw_shape(ImageDraw.Draw(img), shape, tuple(round(v * s) for v in box), 255)
    return np.asarray(img.resize((res, res), Image.Resampling.LANCZOS)) > 127


# The reader's thresholds, measured on every (shape, color, size, where, background) with jitter
# (clean), on hand-made failures, and on the shipped checkpoint's images of 72 training-split prompts
# (EXPERIMENTS.md, "The strict reader"; never on held-out prompts). IoU = |object ∩ ideal| / |∪|.
READER_FAR = 40  # RGB distance from the background that is "not background": below the closest
                 # object/background pair (purple on gray, ~100) and above LANCZOS ringing (<= 3)
SHAPE_MIN_IOU = 0.7  # best IoU below this: no shape fits. Clean renders >= 0.96; the decoder's blurry
                     # but plainly triangular triangles 0.74-0.88
SHAPE_MIN_MARGIN = 0.08  # best minus second-best IoU below this: between two shapes, "unclear". Clean
                         # renders >= 0.19 (a circle's IoU with its bbox square is pi/4); a square with
                         # corners rounded by 30 % of its side (circle or square?) 0.04-0.05, by 25 %
                         # 0.10-0.12: the threshold sits between, a 25 % rounding still reads square
EXTRA_MIN_PIXELS = 8  # a second blob this large (about 3x3) is an extra object or a stray blob; the
                      # decoder's faint 1-7 px specks are not, and count in bg_dirty only


def read_shapes(image):
    """Read a benchmark image back from its pixels alone, strictly (tests, and sample.py's eval).

    -> dict(shape, color, size, where, background, extra, bg_dirty)
    background: the palette background nearest to the median of the four 2x2 corners (objects never
    reach them). Pixels farther than READER_FAR from that median are "not background"; their largest
    4-connected blob is the object, and extra counts the other blobs of >= EXTRA_MIN_PIXELS pixels
    (a second object, a stray blob): an image with extra > 0 is wrong as a whole. bg_dirty: the
    fraction of pixels outside the object (grown by 1 px for its anti-aliased edge) farther than
    READER_FAR from the palette background color itself (0 on clean renders).
    color: the palette color nearest to the median of the object's pixels farthest from the
    background (its interior, free of anti-aliasing). Object mask: its pixels more than half way from
    the background to that color, so anti-aliased edges keep exactly the pixels more than half
    covered. size: the mask's bbox's longer side against the midpoint of 16 and 28 px. where: the
    third of the image holding the bbox center.
    shape: the IoU of the mask with the ideal circle, square and triangle drawn in its bbox as
    render_shapes draws them (the triangle's apex also 1-3 px above the bbox: a thin apex falls below
    half coverage). The best is the shape if its IoU >= SHAPE_MIN_IOU and it beats the second by
    >= SHAPE_MIN_MARGIN; otherwise "unclear" — a rounded square is neither circle nor square.
    No object: shape, color, size, where None. Takes a PIL image or a [3, H, W] tensor in [-1, 1],
    at any square resolution.
    """
    if isinstance(image, torch.Tensor):
        image = to_pil(image)
    x = np.asarray(to_rgb(image), dtype=np.float32)
    h, w = x.shape[:2]
    corners = np.concatenate([x[:2, :2], x[:2, -2:], x[-2:, :2], x[-2:, -2:]]).reshape(-1, 3)
    bg = np.median(corners, axis=0)
    background = _nearest(BACKGROUNDS, bg)
    dirty = np.linalg.norm(x - np.asarray(BACKGROUNDS[background], dtype=np.float32), axis=-1) > READER_FAR
    dist = np.linalg.norm(x - bg, axis=-1)
    blobs = _components(dist > READER_FAR)
    out = dict(shape=None, color=None, size=None, where=None, background=background,
               extra=sum(len(b[0]) >= EXTRA_MIN_PIXELS for b in blobs[1:]), bg_dirty=float(dirty.mean()))
    if not blobs:
        return out
    obj = np.zeros((h, w), bool)
    obj[blobs[0]] = True
    region = obj.copy()  # the object grown by 1 px: its anti-aliased rim is not background
    region[1:] |= obj[:-1]
    region[:-1] |= obj[1:]
    region[:, 1:] |= obj[:, :-1]
    region[:, :-1] |= obj[:, 1:]
    out["bg_dirty"] = float(dirty[~region].mean()) if (~region).any() else 0.0
    core = obj & (dist >= 0.8 * np.percentile(dist[obj], 95))
    color = _nearest(COLORS, np.median(x[core], axis=0))
    v = np.asarray(COLORS[color], dtype=np.float32) - bg
    alpha = (x - bg) @ v / (v @ v)
    inner = _components(obj & (alpha > 0.5))
    mask = np.zeros((h, w), bool)
    mask[inner[0] if inner else blobs[0]] = True
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    iou = {}
    for shape in SHAPES:
        for up in range(4 if shape == "triangle" else 1):
            ideal = _ideal_mask(shape, (x0, y0 - up, x1, y1), w)
            iou[shape] = max(iou.get(shape, 0.0), (mask & ideal).sum() / (mask | ideal).sum())
    best, second = sorted(iou, key=iou.get, reverse=True)[:2]
    clear = iou[best] >= SHAPE_MIN_IOU and iou[best] - iou[second] >= SHAPE_MIN_MARGIN
    col = min(int((x0 + x1) / 2 * 3 / w), 2)
    row = min(int((y0 + y1) / 2 * 3 / h), 2)
    out.update(
        shape=best if clear else "unclear",
        color=color,
        size="small" if max(x1 - x0, y1 - y0) < (SIZES["small"] + SIZES["large"]) / 2 * w / SHAPES_RES else "large",
        where=WHERES[3 * row + col],
    )
    return out


def read_back_accuracy(wants, images):
    """attrs dicts and images [3, H, W] -> {attr: fraction read back by data.read_shapes as wanted,
    "all": fraction with every attribute right, "bg_dirty": the mean of read_shapes' bg_dirty (the
    fraction of background pixels more than 40/255 from the palette background color)}. A shape the
    reader calls "unclear" is wrong; an image with an extra object or stray blob is wrong on every
    attribute."""
    hits = {a: 0 for a in (*SHAPES_ATTRS, "all", "bg_dirty")}
    for want, im in zip(wants, images):
        got = read_shapes(im)
        ok = [got[a] == want[a] and not got["extra"] for a in SHAPES_ATTRS]
        for a, k in zip(SHAPES_ATTRS, ok):
            hits[a] += k
        hits["all"] += all(ok)
        hits["bg_dirty"] += got["bg_dirty"]
    return {a: hits[a] / max(len(wants), 1) for a in hits}


class ShapesDataset(torch.utils.data.Dataset):
    """n benchmark samples as tensors, for both stages.

    item i -> dict(image=[3, 64, 64] in [-1, 1], caption=str, question=str, answer=str, index=int).
    Stage 1 uses image (+ caption to pretrain the micro-SigLIP teacher). Stage 2 builds a generation
    sample from (caption, image) and an understanding sample from (image, question, answer); the
    question cycles through the six types with the index, so every type is equally frequent.
    """

    def __init__(self, n, seed=0, split="train"):
        self.n, self.seed, self.split = n, seed, split

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = shapes_sample(i, self.seed, self.split)
        question, answer = s["qa"][i % len(QUESTIONS)]
        return dict(image=to_tensor(s["image"]), caption=s["caption"], question=question,
                    answer=answer, index=i)


# ----------------------------------------------------------------------------------------------
# Images: decoding, any mode to RGB, resize, [-1, 1] tensors

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")  # what img2dataset writes
FOLDER_IMAGE_EXTS = IMAGE_EXTS + (".bmp", ".gif", ".tif", ".tiff")
# PIL's own decompression-bomb threshold; images above it are skipped rather than decoded
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
}


class BadImage(Exception):
    """An unusable image; `reason` is the stats key it is counted under."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(im):
    """Any PIL mode -> RGB.

    Transparency (RGBA, LA, PA, P or L/RGB with a transparent color) is composited over white, as a
    viewer shows it. 16-bit grayscale (I;16*, and I, which 16-bit PNG/TIFF decode to) is scaled by
    255/65535 — a plain convert would clip everything above 255 to white. F (float) is taken as [0, 1].
    CMYK, YCbCr, 1, L and P go through PIL's own conversion.
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.round(np.clip(a, 0, 65535) / 257).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def resize(im, size, resample="bicubic"):
    """Resize straight to size x size, no crop: SigLIP's processor does exactly this (aspect ratio is
    not kept), with bicubic for SigLIP v1 and bilinear for SigLIP2 — pass the checkpoint's choice."""
    if im.size == (size, size):
        return im
    return im.resize((size, size), RESAMPLE[resample])


def to_tensor(im, size=None, resample="bicubic"):
    """PIL image (any mode) -> float tensor [3, H, W] in [-1, 1] (SigLIP's mean = std = 0.5);
    resized to size x size first when size is given."""
    im = to_rgb(im)
    if size is not None:
        im = resize(im, size, resample)
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


def to_pil(x):
    """The inverse of to_tensor: [3, H, W] in [-1, 1] -> RGB PIL image (clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), "RGB")


def open_image(src, max_pixels=MAX_PIXELS):
    """Bytes or a path -> fully decoded RGB PIL image, or BadImage with reason "empty" (zero bytes),
    "too_large" (more than max_pixels: a decompression bomb) or "bad_image" (anything else: truncated,
    not an image). Decoding happens here, not lazily later, so every failure surfaces here."""
    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise BadImage("empty")
        src = io.BytesIO(src)
    else:
        try:
            if os.path.getsize(src) == 0:
                raise BadImage("empty", str(src))
        except OSError as e:
            raise BadImage("bad_image", str(e)) from None
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; a bomb is a bomb either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                if im.width * im.height > max_pixels:
                    raise BadImage("too_large", f"{im.width}x{im.height}")
                im.load()
                return to_rgb(_upright(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from None
    except BadImage:
        raise
    except Exception as e:  # truncated data, unknown format, broken headers, ...
        raise BadImage("bad_image", f"{type(e).__name__}: {e}") from None


def _upright(im):
    # Cameras store pixels as the sensor read them and the rotation in EXIF Orientation (0x0112);
    # every viewer applies it, so a model must too. An unreadable EXIF block is no reason to drop
    # the pixels: such an image is taken as stored.
    try:
        turned = im.getexif().get(0x0112, 1) not in (None, 1)
    except Exception:
        return im
    return ImageOps.exif_transpose(im) if turned else im


# ----------------------------------------------------------------------------------------------
# Real-world readers

# bad_caption_bytes: captions that are not valid UTF-8, kept with U+FFFD for the bad bytes (the rest
# of the text, usually one Latin-1 letter off, is still the caption) and counted
STAT_KEYS = ("samples", "empty", "bad_image", "too_large", "no_image", "no_caption", "bad_caption_bytes",
             "bad_conversation", "bad_path", "bad_shards")


class SkipCounts:
    """Per-reason counters that survive DataLoader workers: a shared-memory table with one row per
    worker (row 0 for the main process), so workers never race and the main process sums them."""

    def __init__(self, names=STAT_KEYS, max_workers=64):
        self.names = tuple(names)
        self.table = torch.zeros(max_workers + 1, len(self.names), dtype=torch.int64).share_memory_()

    def add(self, name, n=1):
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (len(self.table) - 1)
        self.table[row, self.names.index(name)] += n

    def as_dict(self):
        return dict(zip(self.names, self.table.sum(0).tolist()))


def _report(msg):
    print(f"data: {msg}", file=sys.stderr, flush=True)


class NoSamples(Exception):
    """A data source that yields no readable sample within a bounded number of attempts: the source
    is wrong (a glob, a directory, not a tar file, every member broken), not one sample."""

    def __str__(self):
        # re-raised from a DataLoader worker, the message is "Caught NoSamples in DataLoader worker
        # ... Original Traceback ... data.NoSamples: <message>": keep the one line that says what is wrong
        msg = super().__str__().rstrip()
        return msg.splitlines()[-1].split("NoSamples: ", 1)[-1] if msg else msg


def expand_urls(urls):
    """Brace patterns -> shard paths: 'cc12m/{00000..02175}.tar' (zero padding kept, as in bash),
    '{a,b}' lists, several groups per pattern; a list of patterns is expanded one by one."""
    if not isinstance(urls, str):
        return [u for pattern in urls for u in expand_urls(pattern)]
    m = re.search(r"\{([^{}]*)\}", urls)
    if m is None:
        return [urls]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        padded = any(len(b) > 1 and b[0] == "0" for b in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [u for it in items for u in expand_urls(urls[:m.start()] + it + urls[m.end():])]


def shard_hint(url):
    # what a user probably meant when a "shard" is not a tar file
    if os.path.isdir(url):
        return " (a directory: name its shards with a brace pattern, e.g. dir/{00000..00099}.tar)"
    if any(c in url for c in "*?[") and not os.path.exists(url):
        return " (glob patterns are not expanded: use a brace pattern, e.g. dir/{00000..00099}.tar)"
    return ""


def _distributed_rank(rank, world_size):
    """Explicit arguments win; else an initialized torch.distributed; else torchrun's environment."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def iter_tar(fileobj):
    """Stream a tar file: (key, {ext: bytes}) for each run of consecutive members sharing a key.

    webdataset convention: the key is the member path up to the first dot of its file name, the
    extension the rest ('a/0001.jpg' -> 'a/0001', 'jpg'). Nothing is extracted to disk; members are
    read in order from a non-seekable stream ("r|*": plain, gz, bz2 or xz).
    """
    key, group = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, name = os.path.split(member.name)
            if name.startswith(".") or "." not in name:  # macOS ._ files, extensionless junk
                continue
            stem, ext = name.split(".", 1)
            k = f"{folder}/{stem}" if folder else stem
            if k != key:
                if group:
                    yield key, group
                key, group = k, {}
            group[ext.lower()] = tar.extractfile(member).read()
    if group:
        yield key, group


def _caption_from(group):
    """-> (caption or None, whether its bytes were not valid UTF-8). .txt wins over .json's "caption"
    field (img2dataset writes both); None when there is neither (or it is blank)."""
    if "txt" in group:
        try:
            text, bad = group["txt"].decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad = group["txt"].decode("utf-8", errors="replace"), True
        return text.strip() or None, bad
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError:  # UnicodeDecodeError included
            return None, False
        text = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(text, str) and text.strip():
            return text.strip(), False
    return None, False


def _shuffled(items, bufsize, rng):
    """Shuffle buffer: hold bufsize items, emit a random one as each new item arrives."""
    buf = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class WebDataset(torch.utils.data.IterableDataset):
    """Streaming reader for webdataset tar shards as img2dataset writes them (e.g. CC12M).

    Yields dict(image=[3, size, size] in [-1, 1], caption=str, key=str, url=str).

    Each epoch the shard list is shuffled with (seed, epoch) — identically on every rank — and shard j
    goes to reader j mod (world_size * num_workers), reader = rank * num_workers + worker id; so every
    sample is read exactly once per epoch across all ranks and workers. With fewer shards than readers
    (one test shard and the default 4 workers) that would leave readers without data and the
    DataLoader waiting on them forever: then every reader reads every shard and keeps every
    (readers)-th sample instead, which one line on stderr says. Ranks may get slightly different
    sample counts, so train by step count. Samples are shuffled within each reader by a buffer of
    `shuffle` raw (undecoded) samples; shuffle=0 keeps shard and member order. The rank comes from
    rank/world_size if given, else from torch.distributed (build the dataset after
    init_process_group), else from torchrun's RANK/WORLD_SIZE. set_epoch(e) reshuffles (takes effect
    in workers that are started afterwards, i.e. without persistent_workers); repeat=True loops over
    epochs forever (epoch, epoch + 1, ...).

    Samples without an image or (with require_caption) a caption, and images that cannot be decoded,
    are skipped; shards that cannot be read are skipped and reported on stderr. `stats` counts all of
    it, summed over DataLoader workers. A source that is not data never hangs: NoSamples (one line
    naming it) after max_attempts skipped members and shards before the first readable sample, or
    after a whole pass with none (repeat=True). check() finds that out in the calling process.
    """

    def __init__(self, urls, size, resample="bicubic", shuffle=1000, seed=0, rank=None,
                 world_size=None, repeat=False, require_caption=True, max_pixels=MAX_PIXELS, max_attempts=1000):
        self.source = urls if isinstance(urls, str) else " ".join(urls)  # as the user wrote it
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.size, self.resample, self.shuffle, self.seed = size, resample, shuffle, seed
        self.rank, self.world_size = _distributed_rank(rank, world_size)
        self.repeat, self.require_caption, self.max_pixels = repeat, require_caption, max_pixels
        self.max_attempts = max_attempts
        self.epoch, self._first_problem = 0, None
        self.counts = SkipCounts()

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def stats(self):
        return self.counts.as_dict()

    def check(self):
        """Reads the shards in order, here, up to the first readable sample: NoSamples (naming the
        source and the first problem) if there is none within max_attempts. Seconds, not a hang."""
        probe = WebDataset(self.urls, self.size, self.resample, shuffle=0, rank=0, world_size=1,
                           require_caption=self.require_caption, max_pixels=self.max_pixels,
                           max_attempts=self.max_attempts)
        probe.source = self.source
        for _ in probe:
            return
        raise probe._no_samples(f"in any of its {len(self.urls)} shard(s)")

    def _groups(self, url):
        # -> (url, key, group) per sample, then (url, None, exception) if the shard breaks: samples
        # before the damage were already delivered, the rest of the shard is lost
        try:
            with open(url, "rb") as f:
                for key, group in iter_tar(f):
                    yield url, key, group
        except (OSError, EOFError, tarfile.TarError, ValueError) as e:
            yield url, None, e

    def _decode(self, url, key, group):
        # -> (sample, None) or (None, why it was skipped); every outcome is counted
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in group), None)
        if ext is None:
            self.counts.add("no_image")
            return None, f"{url}: {key} has no image ({', '.join(sorted(group))})"
        caption, bad_bytes = _caption_from(group)
        if caption is None and self.require_caption:
            self.counts.add("no_caption")
            return None, f"{url}: {key} has no caption"
        try:
            im = open_image(group[ext], self.max_pixels)
        except BadImage as e:
            self.counts.add(e.reason)
            return None, f"{url}: {key}.{ext}: {e}"
        self.counts.add("samples")
        if bad_bytes:
            self.counts.add("bad_caption_bytes")
        return dict(image=to_tensor(im, self.size, self.resample), caption=caption or "", key=key, url=url), None

    def _no_samples(self, where):
        return NoSamples(f"{self.source}: no readable sample {where}; first problem: {self._first_problem}"
                         + shard_hint(self.urls[0]))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        me, total = self.rank * num_workers + worker, self.world_size * num_workers
        by_sample = len(self.urls) < total
        if by_sample and me == 0:
            _report(f"{len(self.urls)} shard(s) for {total} readers ({self.world_size} rank(s) × {num_workers} "
                    f"worker(s)): each reader reads every shard and keeps every {total}th sample")
        epoch, tries, seen = self.epoch, 0, False
        self._first_problem = None
        while True:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(f"shards:{self.seed}:{epoch}").shuffle(urls)
            mine = urls if by_sample else urls[me::total]
            groups = (g for url in mine for g in self._groups(url))
            if by_sample:  # the same order in every reader, so the k-th samples partition it
                groups = (g for i, g in enumerate(groups) if i % total == me)
            if self.shuffle:
                groups = _shuffled(groups, self.shuffle, random.Random(f"samples:{self.seed}:{epoch}:{me}"))
            got = False
            for url, key, group in groups:
                if key is None:
                    self.counts.add("bad_shards")
                    sample, why = None, f"{url}: {type(group).__name__}: {group}"
                    _report(f"skipping shard {why}")
                else:
                    sample, why = self._decode(url, key, group)
                if sample is not None:
                    seen = got = True
                    yield sample
                    continue
                tries += 1
                self._first_problem = self._first_problem or why
                if not seen and tries >= self.max_attempts:
                    raise self._no_samples(f"in the first {tries} members and shards")
            if not self.repeat:
                return
            if not got:  # another pass would find nothing either: the DataLoader would wait forever
                raise self._no_samples(f"for rank {self.rank} worker {worker} in a whole pass over its share "
                                       f"({len(mine)} shard(s){', every %dth sample' % total if by_sample else ''})")
            epoch += 1


class _MapImages(torch.utils.data.Dataset):
    """Map-style base (subclasses define items and _load): a bad file is counted and the next index
    served instead, so a DataLoader never sees an exception. Split over ranks with
    torch.utils.data.DistributedSampler."""

    def __init__(self, size, resample, max_pixels):
        self.size, self.resample, self.max_pixels = size, resample, max_pixels
        self.counts = SkipCounts()

    @property
    def stats(self):
        return self.counts.as_dict()

    def __len__(self):
        return len(self.items)

    def _image(self, path):
        return to_tensor(open_image(path, self.max_pixels), self.size, self.resample)

    def __getitem__(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        for j in range(n):
            try:
                sample = self._load((i + j) % n)
            except BadImage as e:
                self.counts.add(e.reason)
                continue
            self.counts.add("samples")
            return sample
        raise NoSamples(f"no readable sample in {n} items ({' '.join(f'{k}={v}' for k, v in self.stats.items() if v)})")


def _image_files(folder, exts):
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts and p.is_file())


class ClassFolderDataset(_MapImages):
    """ImageNet-style root/<class folder>/**/<image>, classes in sorted folder order (torchvision's
    ImageFolder convention). Item -> dict(image, label=int, path=str).

    `class_names` gives the human-readable names zero-shot prompts need (`self.class_names`):
    None (folder names, '_' -> ' '), a list in class order, a {folder: name} dict, or a file — .json
    (list or dict) or text, one name per line in class order or 'folder name' per line (as in
    ImageNet's LOC_synset_mapping.txt).
    """

    def __init__(self, root, size, resample="bicubic", class_names=None, max_pixels=MAX_PIXELS):
        super().__init__(size, resample, max_pixels)
        self.classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"no class folders in {root}")
        self.class_names = self._names(class_names)
        self.items = [(str(p), label) for label, c in enumerate(self.classes)
                      for p in _image_files(Path(root) / c, FOLDER_IMAGE_EXTS)]

    def _names(self, spec):
        if spec is None:
            return [c.replace("_", " ") for c in self.classes]
        if isinstance(spec, (str, Path)):
            text = Path(spec).read_text(encoding="utf-8")
            if str(spec).endswith(".json"):
                spec = json.loads(text)
            else:
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                pairs = [line.split(None, 1) for line in lines]
                if all(len(p) == 2 and p[0] in self.classes for p in pairs):
                    spec = dict(pairs)
                else:
                    spec = lines
        if isinstance(spec, dict):
            missing = [c for c in self.classes if c not in spec]
            if missing:
                raise ValueError(f"class_names lacks folders {missing[:5]}")
            return [spec[c] for c in self.classes]
        if len(spec) != len(self.classes):
            raise ValueError(f"{len(spec)} class names for {len(self.classes)} class folders")
        return list(spec)

    def _load(self, i):
        path, label = self.items[i]
        return dict(image=self._image(path), label=label, path=path)


class CaptionFolderDataset(_MapImages):
    """A folder (searched recursively) of images with sidecar captions: x.jpg + x.txt.
    Item -> dict(image, caption, path). Images without a .txt are left out and counted as no_caption."""

    def __init__(self, root, size, resample="bicubic", max_pixels=MAX_PIXELS):
        super().__init__(size, resample, max_pixels)
        images = _image_files(root, FOLDER_IMAGE_EXTS)
        self.items = [str(p) for p in images if p.with_suffix(".txt").is_file()]
        self.counts.add("no_caption", len(images) - len(self.items))

    def _load(self, i):
        path = self.items[i]
        caption = Path(path).with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            raise BadImage("no_caption", path)
        return dict(image=self._image(path), caption=caption, path=path)


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}


class LlavaDataset(_MapImages):
    """LLaVA instruction data: a .json list (or .jsonl) of {"id", "image" (path relative to image_root,
    a list of them, or absent for text-only), "conversations": [{"from": "human"|"gpt", "value"}]}.

    Item -> dict(id=str, images=[[3, size, size] tensors], messages=[{"role", "content"}]) with roles
    mapped to Qwen's (human -> user, gpt -> assistant) and the `<image>` placeholders kept for
    encode_chat. An entry with images but no placeholder gets "<image>\\n" before its first user turn
    (LLaVA's own preprocessing does the same); placeholder/image count mismatches are skipped as
    bad_conversation. Batches hold lists of varying length: use collate_fn=list.
    """

    def __init__(self, path, image_root, size, resample="bicubic", max_pixels=MAX_PIXELS):
        super().__init__(size, resample, max_pixels)
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        try:
            if str(path).endswith(".jsonl"):  # a line that is not JSON is one bad entry, not a bad file
                self.items = [_json_or_none(line) for line in text.splitlines() if line.strip()]
            else:
                self.items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(self.items, list):
            raise ValueError(f"{path}: expected a JSON list of entries, got {type(self.items).__name__}")
        self.image_root = Path(image_root)

    def _load(self, i):
        entry = self.items[i]
        if not isinstance(entry, dict):
            raise BadImage("bad_conversation", f"entry {i} is not an object")
        name = str(entry.get("id", i))
        files = entry.get("image") or []
        files = [files] if isinstance(files, str) else files
        turns = entry.get("conversations")
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise BadImage("bad_conversation", f"{name}: image must be a path or a list of paths")
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and t["from"] in LLAVA_ROLES
                and isinstance(t.get("value"), str) for t in turns):
            raise BadImage("bad_conversation", f"{name}: conversations must be a non-empty list of "
                                               "{from: human|gpt|..., value: text}")
        messages = [dict(role=LLAVA_ROLES[t["from"]], content=t["value"]) for t in turns]
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if files and placeholders == 0:
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise BadImage("bad_conversation", f"{name}: images but no user turn")
            first["content"] = IMAGE_PLACEHOLDER * len(files) + "\n" + first["content"]
        elif placeholders != len(files):
            raise BadImage("bad_conversation", f"{name}: {placeholders} <image> for {len(files)} images")
        images = [self._image(self._path(f, name)) for f in files]
        return dict(id=name, images=images, messages=messages)

    def _path(self, f, name):
        # the json names files under image_root; an absolute path or one that climbs out with ".." could
        # read any file the process can (a json from elsewhere is data, not trusted)
        if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == os.pardir:
            raise BadImage("bad_path", f"{name}: {f!r} is outside the image root")
        return self.image_root / f


def _json_or_none(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Text tokenizer: HF byte-level BPE as a tiktoken Encoding (DESIGN.md, "Stage 2 — text tokenizer")

# Qwen2's pre-tokenizer (the Split regex in its tokenizer.json; the same as Qwen1's tiktoken pattern)
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT-2's, used by tokenizer.json files whose ByteLevel pre-tokenizer splits with its built-in regex
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Qwen2.5's special tokens, at ids 151643 + i there and at 256 + i in the "bytes" demo encoding
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
IMAGE_PLACEHOLDER = "<image>"


def bytes_to_unicode():
    """GPT-2's byte -> character table. Byte-level BPE files (GPT-2, Qwen) spell each token's bytes
    with these characters so that vocab.json and merges.txt stay printable: bytes that are printable
    Latin-1 stand for themselves, the other 68 become chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _build_encoding(name, vocab, merges, added, pattern):
    """vocab {token string: id}, merges [(a, b)] in priority order, added {content: id}."""
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(char_to_byte[ch] for ch in tok): i for tok, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"{name}: vocabulary is not byte-level BPE (character {e} has no byte)") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if len(ranks) != len(vocab) or missing:
        raise ValueError(f"{name}: byte-level vocabulary needs all 256 bytes once (missing {missing[:8]})")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair listed
    # first in merges, so ranks = ids needs the merges listed in the order of their results' ids.
    # GPT-2-style files are (Qwen: merge i creates id 256 + i); any other file is refused here
    # rather than silently mis-encoded. tests/test_data.py checks Qwen against HF id for id.
    prev = -1
    for i, (a, b) in enumerate(merges):
        r = vocab.get(a + b)
        if r is None or r <= prev:
            raise ValueError(f"{name}: merge {i} ({a!r}, {b!r}) is not in id order; tiktoken ranks "
                             "cannot reproduce this BPE")
        prev = r
    # every added token (HF matches special and non-special added tokens alike in raw text) that is
    # not already a BPE token; with allowed_special="all" tiktoken then splits on all of them
    ids = set(vocab.values())
    specials = {}
    for content, i in added.items():
        if content in vocab:  # some files re-list ordinary vocabulary entries as added tokens
            continue
        if i in ids:
            raise ValueError(f"{name}: added token {content!r} reuses id {i} of a BPE token")
        specials[content] = i
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def _bytes_encoding():
    """The demo encoding: ids 0-255 are the bytes themselves, 256 + i is QWEN_SPECIAL_TOKENS[i]
    (<|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, <|vision_start|> 265, <|vision_end|> 266,
    <|image_pad|> 268, ..., <|file_sep|> 277); n_vocab 278."""
    return tiktoken.Encoding(
        name="bytes", pat_str=QWEN_PATTERN,
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)},
    )


def _pattern_from(pre_tokenizer):
    """The splitting regex of an HF pre_tokenizer: a Split step's regex, or GPT-2's for ByteLevel
    with use_regex."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return GPT2_PATTERN
    raise ValueError(f"no splitting regex in pre_tokenizer {json.dumps(pre_tokenizer)[:200]}")


def load_text_tokenizer(path):
    """An HF byte-level BPE tokenizer as a tiktoken Encoding whose ids are the model's ids.

    path: a directory with tokenizer.json, or with vocab.json + merges.txt (added tokens then come
    from tokenizer_config.json's added_tokens_decoder and added_tokens.json); or one of those files;
    or "bytes" for the demo encoding (256 byte ids + QWEN_SPECIAL_TOKENS at 256 + i). Every added
    token becomes a tiktoken special token at its id: encode(text, allowed_special="all") splits
    them out of text as HF does.

    One difference from HF: tiktoken has no normalizer, and Qwen's tokenizer.json applies NFC
    first. NFC text (nearly all text; encode_chat normalizes for you) gives identical ids.
    """
    if str(path) == "bytes":
        return _bytes_encoding()
    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    elif p.is_dir():
        p = p / "vocab.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json or vocab.json + merges.txt at {path}")
    name = p.parent.name or "hf"
    if p.name != "vocab.json":
        spec = json.loads(p.read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{p}: only byte-level BPE tokenizers are supported")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        return _build_encoding(name, model["vocab"], merges, added, _pattern_from(spec.get("pre_tokenizer")))
    vocab = json.loads(p.read_text(encoding="utf-8"))
    lines = (p.parent / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
    added = {}
    config = p.parent / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        added.update({t["content"]: int(i) for i, t in decoder.items()})
    if (p.parent / "added_tokens.json").is_file():
        added.update(json.loads((p.parent / "added_tokens.json").read_text(encoding="utf-8")))
    # vocab.json alone does not say how Qwen splits text; its pre-tokenizer is the Qwen pattern
    return _build_encoding(name, vocab, merges, added, QWEN_PATTERN)


def encode_chat(enc, messages, add_generation_prompt=False, image_tokens=1):
    """Qwen chat format -> (ids, mask), two lists of equal length.

    Each message {"role", "content"} becomes `<|im_start|>{role}\\n{content}<|im_end|>\\n`; with
    add_generation_prompt, `<|im_start|>assistant\\n` follows. Each `<image>` in a content becomes
    `<|vision_start|>` + image_tokens x `<|image_pad|>` + `<|vision_end|>`: the model puts one visual
    position at each pad (image_tokens = 1 reproduces Qwen2-VL's unexpanded template string).

    mask[t] is True where ids[t] is a text-loss target (shift by one: targets ids[1:], mask[1:]):
    the tokens of assistant turns after the role header, including <|vision_start|>/<|vision_end|>
    and the <|im_end|> that ends the turn, but never pads (the visual loss covers those) nor the "\\n"
    after <|im_end|>. Content is NFC-normalized (as Qwen's tokenizer.json does) and encoded as plain
    text, so a literal "<|im_end|>" in data cannot forge a turn boundary. The role header and the
    first text of the content are one tokenizer segment, exactly as HF tokenizes the rendered
    template; a token spanning both counts as content.
    """
    tok = enc.encode_single_token
    im_start, im_end = tok("<|im_start|>"), tok("<|im_end|>")
    vision_start, vision_end, pad = tok("<|vision_start|>"), tok("<|vision_end|>"), tok("<|image_pad|>")
    ids, mask = [], []

    def text(s, train, skip_bytes=0):
        end = 0
        for t in enc.encode(s, disallowed_special=()):
            end += len(enc.decode_single_token_bytes(t))
            ids.append(t)
            mask.append(train and end > skip_bytes)

    for m in messages:
        role, train = m["role"], m["role"] == "assistant"
        parts = unicodedata.normalize("NFC", m["content"]).split(IMAGE_PLACEHOLDER)
        header = f"{role}\n"
        ids.append(im_start)
        mask.append(False)
        text(header + parts[0], train, skip_bytes=len(header.encode("utf-8")))
        for part in parts[1:]:
            ids.extend([vision_start] + [pad] * image_tokens + [vision_end])
            mask.extend([train] + [False] * image_tokens + [train])
            text(part, train)
        ids.append(im_end)
        mask.append(train)
        text("\n", False)
    if add_generation_prompt:
        ids.append(im_start)
        mask.append(False)
        text("assistant\n", False)
    return ids, mask


# ----------------------------------------------------------------------------------------------

def bench(n=2000):
    """Shapes samples/s in this process: rendering + caption + QA, then as tensors via ShapesDataset."""
    shapes_sample(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        shapes_sample(i)
    t1 = time.perf_counter()
    ds = ShapesDataset(n)
    for i in range(n):
        ds[i]
    t2 = time.perf_counter()
    print(f"shapes benchmark, 1 process, torch threads {torch.get_num_threads()}: "
          f"{n / (t1 - t0):.0f} samples/s (PIL image + caption + QA), "
          f"{n / (t2 - t1):.0f} samples/s (ShapesDataset: [3, 64, 64] tensors)")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "bench" or len(args) > 2:
        sys.exit("usage: python data.py bench [num_samples]")
    bench(int(args[1]) if len(args) == 2 else 2000)
