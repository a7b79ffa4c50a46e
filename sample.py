"""
Sample from a trained DualToken unified model (paper §3.3, §4.1).

    python sample.py --prompt "a large red circle in the center on a white background"   # text → image
    python sample.py --image x.png --prompt "What shape is in the image?"                # image → text
    python sample.py --image x.png                                                       # describe it
    python sample.py --eval shapes                                # the benchmark table
    python sample.py --figure assets/demo.png                     # the README's picture
    python sample.py --reader_grid assets/reader_verdicts.png     # data.read_shapes' verdicts, to check by eye

Text → image: the caption is the user turn and the assistant turn opens with <|vision_start|>; then
grid × grid visual positions are generated one by one through the LLM's static KV cache. At each
position both depth heads draw their D residual codes depth by depth; classifier-free guidance runs
the conditional and the unconditional (empty caption) prompts as one batch [cond; uncond], combines
each depth's logits as uncond + s·(cond − uncond) (s = 3 in the paper, §4.1) and feeds the same codes
to both halves. Only the pixel codes are decoded, by the tokenizer's decoder (§3.3).

Image → text: the image is encoded by the checkpoint's own DualTokenizer into pixel and semantic
codes, read as one LLM position per patch, and the answer is decoded greedily (or sampled) through
the KV cache, streamed as it is produced.
"""

import argparse
import codecs
import contextlib
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from data import (BACKGROUNDS, HELDOUT, IMAGE_PLACEHOLDER, QUESTIONS, SHAPES_ATTRS, SIZES, TRAIN_COMBOS,
                  BadImage, encode_chat, open_image, parse_shapes_caption, read_back_accuracy, read_shapes,
                  shapes_caption,
                  shapes_sample, shapes_vocabulary, shapes_words, to_pil, to_tensor)
from tokenizer import UsageError, _Parser, add_flags, check_device, check_numbers, model_dir, reading, run_main, writable_dir
from unified import load_pretrained, sample_logits

# the shipped demo checkpoint (trained on the shapes benchmark by the README's commands)
DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shapes")
DESCRIBE = "Describe the image."  # the question asked when --image comes without --prompt


# ----------------------------------------------------------------------------------------------
# Prompts

def left_pad(rows, pad_id):
    """Token lists of different lengths -> ids (B, T) left-padded with pad_id, and key_mask (B, T),
    False at the padding. Left, so every row's last prompt token sits at the same position and one
    input_pos serves the whole batch; RoPE is relative, so the shift changes nothing else."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = True
    return ids, mask


def image_prompt(enc, special, caption):
    # generation_messages() of unified.py up to the image: user turn, assistant header, <|vision_start|>
    ids, _ = encode_chat(enc, [{"role": "user", "content": caption}], add_generation_prompt=True)
    return ids + [special["<|vision_start|>"]]


# ----------------------------------------------------------------------------------------------
# Text → image

@torch.no_grad()
def generate_codes(model, enc, captions, cfg=3.0, temperature=1.0, top_k=None, top_p=None,
                   generator=None, progress=False):
    """Codes for one image per caption -> (pix (N, g, g, D), sem (N, g, g, D) or None).

    cfg None: conditional rows only. cfg s: rows [cond; uncond] (uncond = the empty caption, as
    dropped in training), logits combined per depth per head inside model.sample_codes. cfg 1 is
    the conditional model, so it runs without the unconditional rows.
    """
    c, special = model.config, model.config.special_tokens
    cfg = None if cfg == 1 else cfg
    rows = [image_prompt(enc, special, cap) for cap in captions]
    if cfg is not None:
        rows += [image_prompt(enc, special, "")] * len(captions)
    ids, key_mask = left_pad(rows, special["<|endoftext|>"])
    ids, key_mask = ids.to(model.pix_codebook.device), key_mask.to(model.pix_codebook.device)
    R, T = ids.shape
    P = c.grid * c.grid
    if T + P > c.llm.max_seq_len:
        raise UsageError(f"prompt of {T} tokens + {P} image positions exceeds the model's context of "
                         f"{c.llm.max_seq_len}")
    llm = model.llm
    llm.setup_cache(R, T + P)
    cache_mask = torch.ones(R, T + P, dtype=torch.bool, device=ids.device)
    cache_mask[:, :T] = key_mask
    pix, sem = [], []
    try:
        h = llm.hidden(input_embeds=model.embed(ids), input_pos=torch.arange(T, device=ids.device),
                       key_mask=cache_mask, kv_len=T)[:, -1]  # (R, dim): the state at <|vision_start|>
        for p in tqdm(range(P), desc="positions", disable=not progress, leave=False):
            pc, sc = model.sample_codes(h, cfg, temperature, top_k, top_p, generator)  # (N, D) each
            pix.append(pc)
            sem.append(sc)
            if p == P - 1:
                break  # the last position's state would only predict <|vision_end|>
            rep = 2 if cfg is not None else 1
            v = model.visual_embed(pc.repeat(rep, 1), None if sc is None else sc.repeat(rep, 1),
                                   torch.full((R,), p, device=ids.device))
            h = llm.hidden(input_embeds=v[:, None].to(h.dtype), input_pos=torch.tensor([T + p], device=ids.device),
                           key_mask=cache_mask, kv_len=T + p + 1)[:, -1]
    finally:
        llm.clear_cache()
    g, N = c.grid, len(captions)
    pix = torch.stack(pix, 1).view(N, g, g, -1)
    sem = None if sem[0] is None else torch.stack(sem, 1).view(N, g, g, -1)
    return pix, sem


def image_grid(images, ncol=None):
    """(N, 3, H, W) in [-1, 1] -> one PIL image, ncol columns with 2 px white gutters."""
    N, _, H, W = images.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    canvas = torch.ones(3, nrow * (H + 2) - 2, ncol * (W + 2) - 2)
    for i, im in enumerate(images):
        r, col = divmod(i, ncol)
        canvas[:, r * (H + 2): r * (H + 2) + H, col * (W + 2): col * (W + 2) + W] = im.float().cpu()
    return to_pil(canvas)


# ----------------------------------------------------------------------------------------------
# Image → text

def not_answer_ids(enc, vocab_size, stops):
    """Ids an answer may never contain -> sorted list: every special token but the end-of-turn ones
    (stops; an answer is text, and e.g. <|vision_start|> would open an image), and the LLM's rows
    past the text tokenizer's ids (Qwen: 151936 rows for 151665 tokens)."""
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    return sorted((special - set(stops)) | set(range(enc.n_vocab, vocab_size)))


@torch.no_grad()
def answer(model, enc, tokenizer, image, question, max_new_tokens=64, temperature=0.0, top_k=None,
           top_p=None, generator=None, stream=None):
    """image (3, S, S) in [-1, 1] + question -> the answer text (up to <|im_end|>).

    stream: a callable given each new piece of text as soon as it forms whole UTF-8 characters.
    """
    c, special = model.config, model.config.special_tokens
    device = model.pix_codebook.device
    pix, sem = tokenizer.encode(image[None].to(device))  # (1, g, g, D) each
    msgs = [{"role": "user", "content": IMAGE_PLACEHOLDER + "\n" + question}]
    ids, _ = encode_chat(enc, msgs, add_generation_prompt=True, image_tokens=c.grid * c.grid)
    T = len(ids)
    if T + max_new_tokens > c.llm.max_seq_len:
        raise UsageError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {c.llm.max_seq_len}")
    ids = torch.tensor([ids], device=device)
    x = model.embed(ids, pix.flatten(0, 2), sem.flatten(0, 2))  # (1, T, dim)
    llm, end = model.llm, special["<|im_end|>"]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    llm.setup_cache(1, T + max_new_tokens)

    def text_logits(h):
        return llm.head(h[:, -1]).float().index_fill(-1, banned, float("-inf"))

    stops = (end, special["<|endoftext|>"])
    banned = torch.tensor(not_answer_ids(enc, c.llm.vocab_size, stops), dtype=torch.long, device=device)
    try:
        logits = text_logits(llm.hidden(input_embeds=x, input_pos=torch.arange(T, device=device), kv_len=T))
        for t in range(T, T + max_new_tokens):
            tok = int(sample_logits(logits, temperature, top_k, top_p, generator)[0])
            if tok in stops:
                break
            out.append(tok)
            if stream is not None:
                piece = utf8.decode(enc.decode_single_token_bytes(tok))
                if piece:
                    stream(piece)
            logits = text_logits(llm.hidden(torch.tensor([[tok]], device=device),
                                            input_pos=torch.tensor([t], device=device), kv_len=t + 1))
    finally:
        llm.clear_cache()
    return enc.decode(out, errors="replace")


# ----------------------------------------------------------------------------------------------
# The shapes benchmark (python sample.py --eval shapes): generation read back from pixels, and
# understanding on held-out images

ATTRS = ("shape", "color", "size", "where", "background")
EVAL_SPLITS = ("all", "train")  # --split: the whole table, or only what settings may be chosen on


def eval_prompts(split, n, seed=0):
    """n fixed prompts of a split: its (color, shape, where) combinations in turn, size and background
    cycled so every combination meets different ones -> list of attrs dicts."""
    combos = TRAIN_COMBOS if split == "train" else HELDOUT
    sizes, backgrounds = tuple(SIZES), tuple(BACKGROUNDS)
    step = max(1, len(combos) // n)  # spread train prompts over all combinations
    out = []
    for i in range(n):
        color, shape, where = combos[(i * step + seed) % len(combos)]
        out.append(dict(shape=shape, color=color, where=where, size=sizes[i % 2],
                        background=backgrounds[(i // 2) % 3]))
    return out


@torch.no_grad()
def evaluate_shapes(model, enc, tokenizer, n_prompts=36, n_images=60, cfg=3.0, temperature=1.0,
                    batch=18, seed=0, out_dir=None, progress=True, n_recon=120, top_k=None, top_p=None,
                    per_prompt=1, split="all"):
    """-> {"gen": {split: {attr: accuracy, "all": ...}}, "und": {question type: accuracy},
           "und_split": "heldout" or "train", "recon": {attr: accuracy, "all": ...}}.

    Generation: per_prompt images per fixed prompt (train combinations, and all held-out ones),
    decoded and read back by data.read_shapes; an attribute counts when the reader finds what the
    prompt asked; "bg_dirty" is the images' mean read_shapes bg_dirty. (18 held-out prompts: with
    one image each, one prompt moves a figure 5.6 points.)
    Understanding: every question type on n_images held-out images, exact match after lower-casing.
    Reconstruction: n_recon held-out images encoded and decoded by the tokenizer, read back the same
    way — what generation would score with perfect codes, the tokenizer's ceiling for it.
    split "train": settings are chosen here, so nothing held out is looked at: generation on the
    train prompts only, understanding on unseen training-split images, no reconstruction.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    gen = torch.Generator(device=model.pix_codebook.device).manual_seed(seed)
    und_split = "heldout" if split == "all" else "train"
    results = {"gen": {}, "und": {}, "und_split": und_split}
    gen_splits = [("train", n_prompts)] + ([("heldout", len(HELDOUT))] if split == "all" else [])
    for name, n in gen_splits:
        prompts = [p for p in eval_prompts(name, n, seed) for _ in range(per_prompt)]
        images = []
        for i in tqdm(range(0, len(prompts), batch), desc=f"generate {name}", disable=not progress):
            chunk = prompts[i:i + batch]
            pix, _ = generate_codes(model, enc, [shapes_caption(a) for a in chunk], cfg, temperature,
                                    top_k, top_p, generator=gen)
            images.append(tokenizer.decode(pix).float().cpu())
        images = torch.cat(images)
        results["gen"][name] = read_back_accuracy(prompts, images)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            ncol = per_prompt * max(1, 12 // per_prompt)  # a prompt's images side by side, ~12 a row
            image_grid(images, ncol=ncol).save(os.path.join(out_dir, f"eval_{name}.png"))
    size, resample = tokenizer.config.siglip.image_size, tokenizer.config.siglip.resample
    if und_split == "train":  # training-split images from a stream training never draws (seed + 1000)
        n_recon, samples = 0, [shapes_sample(i, seed=seed + 1000) for i in range(n_images)]
    else:  # the held-out images both parts read (understanding: the first n_images; reconstruction: n_recon)
        samples = [shapes_sample(i, seed=seed, split="heldout") for i in range(max(n_images, n_recon))]
    hits = {k: 0 for k in QUESTIONS}
    for s in tqdm(samples[:n_images], desc=f"answer {und_split}", disable=not progress):
        x = to_tensor(s["image"], size, resample)
        for (q, a), k in zip(s["qa"], QUESTIONS):
            got = answer(model, enc, tokenizer, x, q, max_new_tokens=len(a) + 8)
            hits[k] += got.strip().lower() == a.lower()
    results["und"] = {k: hits[k] / n_images for k in hits}
    if not n_recon:
        return results
    samples = samples[:n_recon]
    images = []
    for i in tqdm(range(0, n_recon, 2 * batch), desc="reconstruct heldout", disable=not progress):
        x = torch.stack([to_tensor(s["image"], size, resample) for s in samples[i:i + 2 * batch]])
        pix, _ = tokenizer.encode(x.to(model.pix_codebook.device))
        images.append(tokenizer.decode(pix).float().cpu())
    results["recon"] = read_back_accuracy([s["attrs"] for s in samples], torch.cat(images) if images else [])
    return results


def format_results(r):
    # generation rows end with the mean bg_dirty of the split's images (2 decimals: it is near 0)
    lines = ["generation (read back from pixels)   " + "  ".join(f"{a:>10}" for a in ATTRS + ("all", "bg dirty"))]
    for split, acc in r["gen"].items():
        lines.append(f"  {split:<35}" + "  ".join(f"{100 * acc[a]:>9.1f}%" for a in ATTRS + ("all",))
                     + f"  {100 * acc['bg_dirty']:>9.2f}%")
    where = "held-out" if r.get("und_split", "heldout") == "heldout" else "train-split"
    lines.append(f"{f'understanding ({where} images)':<37}" + "  ".join(f"{k:>10}" for k in r["und"]))
    lines.append(" " * 37 + "  ".join(f"{100 * v:>9.1f}%" for v in r["und"].values()))
    if "recon" in r:
        lines.append(f"{'tokenizer ceiling (held-out images':<37}" + "  ".join(f"{a:>10}" for a in ATTRS + ("all",)))
        lines.append(f"{'  encoded + decoded, read back)':<37}" + "  ".join(f"{100 * r['recon'][a]:>9.1f}%"
                                                                        for a in ATTRS + ("all",)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# What the shapes demo understands: the words of its captions and questions, nothing else

def unknown_words(prompt, vocabulary):
    """-> the prompt's words outside the vocabulary, each once, in order."""
    return list(dict.fromkeys(w for w in shapes_words(prompt) if w not in vocabulary))


def warn_unknown_words(prompt, model):
    # The demo checkpoint (byte-level text) was trained on the benchmark's captions and questions
    # only; any other word is noise to it. One line on stderr, and sampling goes on.
    if model.config.text_tokenizer != "bytes" or not prompt:
        return
    unknown = unknown_words(prompt, set(shapes_vocabulary()))
    if unknown:
        print(f"warning: the shapes demo never saw the word{'s' * (len(unknown) > 1)} "
              f"{', '.join(map(repr, unknown))}; it knows only its captions and six questions "
              "(README.md, \"What the demo understands\")", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Pictures: the README's (python sample.py --figure assets/demo.png) and the reader's verdicts for a
# person to check (python sample.py --reader_grid assets/reader_verdicts.png)

def enlarge(x, px):
    """(3, S, S) in [-1, 1] -> PIL image enlarged to px × px (nearest neighbour)."""
    from PIL import Image
    return to_pil(x.float().cpu()).resize((px, px), Image.Resampling.NEAREST)


def verdict(got, want):
    """data.read_shapes' verdict on one image against the asked attrs, as a short line: "circle OK"
    when every attribute reads as asked; else the shape it saw ("unclear": no ideal shape fits; "(x)":
    not the asked one), the other attributes it read differently, and "+N extra" (a second object or
    stray blob, which makes the image wrong)."""
    if got["shape"] is None:
        return "no object"
    wrong = [a for a in ATTRS[1:] if got[a] != want[a]]
    line = got["shape"] + ("" if got["shape"] == want["shape"] else " (x)")
    line += "".join(f", {a}: {got[a]}" for a in wrong) + (f", +{got['extra']} extra" if got["extra"] else "")
    return line + (" OK" if line == want["shape"] else "")


@torch.no_grad()
def demo_figure(model, enc, tokenizer, cfg=1.0, temperature=0.4, seed=0, scale=2):
    """-> a PIL image of three rows of four: prompts -> generated images (the quickstart's prompt,
    a training combination and two held-out ones), held-out images -> the model's answers to the
    five short questions, held-out images -> the tokenizer's reconstructions. Nothing is picked
    by hand after the fact: the prompts and images are fixed, the samples drawn with seed."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    col, gap, line = 200, 8, 13
    dev = model.pix_codebook.device
    size, resample = tokenizer.config.siglip.image_size, tokenizer.config.siglip.resample
    big, half = size * scale, (col - 3 * gap) // 2  # one image per cell, or a pair

    def up(x, px=big):
        return enlarge(x, px)

    train, held = eval_prompts("train", 36, seed), eval_prompts("heldout", len(HELDOUT), seed)
    quick = parse_shapes_caption("a large red circle in the center on a white background")
    prompts = [(quick, ""), (train[3], ""), (held[2], " (held-out)"), (held[5], " (held-out)")]
    gen = torch.Generator(device=dev).manual_seed(seed)
    pix, _ = generate_codes(model, enc, [shapes_caption(a) for a, _ in prompts], cfg, temperature, generator=gen)
    generated = tokenizer.decode(pix).float().cpu()
    samples = [shapes_sample(i, seed=seed, split="heldout") for i in range(8)]
    x = torch.stack([to_tensor(s["image"], size, resample) for s in samples])
    recon = tokenizer.decode(tokenizer.encode(x[4:].to(dev))[0]).float().cpu()

    cells = []  # per row: a title and four (images, text lines)
    row = []
    for (a, tag), im in zip(prompts, generated):
        read = textwrap.wrap("read back: " + verdict(read_shapes(im), a), 34)
        row.append(([up(im)], textwrap.wrap(shapes_caption(a) + tag, 34) + read))
    cells.append((f"text -> image: one sample per prompt (cfg {cfg}, temperature {temperature}, seed {seed})", row))
    row = []
    for s, xi in zip(samples[:4], x[:4]):
        lines = []
        for (q, truth), k in zip(s["qa"], QUESTIONS):
            if k == "caption":
                continue
            got = answer(model, enc, tokenizer, xi, q, max_new_tokens=len(truth) + 8).strip()
            lines.append(f"{k}? {got}" + ("" if got.lower() == truth.lower() else f"  (truth: {truth})"))
        row.append(([up(xi)], lines))
    cells.append(("image -> text: held-out images, the model's answers (greedy)", row))
    row = [([up(xi, half), up(r, half)], ["real | reconstructed"]) for xi, r in zip(x[4:], recon)]
    cells.append(("image -> codes -> image: held-out images through the tokenizer", row))

    heights = [line + max(im.height for ims, _ in r for im in ims) + gap + line * max(len(t) for _, t in r) + 2 * gap for _, r in cells]
    canvas = Image.new("RGB", (4 * col, sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (title, r), h in zip(cells, heights):
        draw.text((gap, y + 2), title, fill="black", font=font)
        top = y + line + max(im.height for ims, _ in r for im in ims) + gap  # the text under the images
        for i, (ims, lines) in enumerate(r):
            w = sum(im.width for im in ims) + gap * (len(ims) - 1)
            for j, im in enumerate(ims):
                canvas.paste(im, (i * col + (col - w) // 2 + j * (im.width + gap), y + line + 2))
            for k, text in enumerate(lines):
                draw.text((i * col + gap, top + k * line), text, fill="black", font=font)
        y += h
        draw.line((0, y - 2, 4 * col, y - 2), fill=(200, 200, 200))
    return canvas


# training-split captions only: the reader's thresholds may be checked on these, never on held-out ones
GRID_CAPTIONS = (
    "a large red circle in the center on a white background",  # the README's prompt
    "a small blue square at the top left on a black background",
    "a large green triangle at the bottom right on a gray background",
    "a large yellow square on the right on a black background",
    "a small purple circle at the bottom on a white background",
    "a small orange triangle at the top on a gray background",
    "a large blue circle on the left on a gray background",
    "a large purple triangle at the bottom left on a white background",
)


@torch.no_grad()
def reader_grid(model, enc, tokenizer, cfg=1.0, temperature=0.4, seed=0, scale=2, per_caption=4):
    """-> (a PIL image, one text line per image): per_caption images for each of GRID_CAPTIONS, two
    captions a row, each image at scale× with its verdict() beneath, for a person to judge the reader
    by eye. Drawn as text → image draws them (one batch, seed), nothing picked after the fact."""
    from PIL import Image, ImageDraw

    wants = [parse_shapes_caption(c) for c in GRID_CAPTIONS]
    assert all((w["color"], w["shape"], w["where"]) in set(TRAIN_COMBOS) for w in wants)
    captions = [c for c in GRID_CAPTIONS for _ in range(per_caption)]
    gen = torch.Generator(device=model.pix_codebook.device).manual_seed(seed)
    pix, _ = generate_codes(model, enc, captions, cfg, temperature, generator=gen)
    images = tokenizer.decode(pix).float().cpu()
    side, gap, text = images.shape[-1] * scale, 4, 12
    cell_w, row_h = side + gap, text + side + 2 * text + gap
    canvas = Image.new("RGB", (2 * per_caption * cell_w, (len(GRID_CAPTIONS) + 1) // 2 * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    lines = []
    for i, (caption, im) in enumerate(zip(captions, images)):
        k, j = divmod(i, per_caption)  # caption k, its j-th image; two captions a row
        x, y = (k % 2 * per_caption + j) * cell_w, k // 2 * row_h
        if j == 0:
            draw.text((x, y), caption[2:], fill="black")
        canvas.paste(enlarge(im, side), (x, y + text))
        v = verdict(read_shapes(im), wants[k])
        draw.text((x, y + text + side + 1), v[:22], fill="black")
        draw.text((x, y + text + side + 1 + text), v[22:44], fill="black")
        lines.append(f"{k}.{j}  {v}")
    return canvas, lines


# ----------------------------------------------------------------------------------------------
# Command line. SampleConfig is the single source of defaults; flags are generated from it.

@dataclass
class SampleConfig:
    prompt: str = ""              # text → image: the caption; with --image: the question
    eval: str = ""                # "shapes": the benchmark table (generation + understanding)
    split: str = "all"            # --eval: "all" (the table) or "train", where settings are chosen:
                                  # train prompts and unseen training-split images, nothing held out
    image: str = ""               # image → text: the image to read
    ckpt: str = DEFAULT_CKPT      # a UnifiedModel.save_pretrained directory
    num_samples: int = 4          # text → image and --eval: images per prompt
    cfg: float = -1.0             # text → image: classifier-free guidance scale; 1 = conditional only,
                                  # 0 = unconditional; -1 = the checkpoint's sample_cfg (paper: 3)
    temperature: float = -1.0     # text → image: -1 = the checkpoint's sample_temperature (1 unless
                                  # its config says); image → text answers greedily unless set
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    max_new_tokens: int = 64      # image → text
    seed: int = 0
    out: str = "samples"          # text → image: directory for the PNGs
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 0              # CPU threads: 0 = $OMP_NUM_THREADS if set, else 1 (one was 2.5-5x
                                  # faster than two on a 2-core machine: EXPERIMENTS.md, "CPU threads")
    compile: bool = False         # torch.compile the per-position steps (CUDA graphs on a GPU)
    figure: str = ""              # write the README's picture (PNG) to this path
    reader_grid: str = ""         # write the reader's verdicts on 32 generated images (PNG) to this path

# the flags that only make sense in one mode, to refuse them in the other
GENERATION_ONLY = ("num_samples", "cfg", "out")
UNDERSTANDING_ONLY = ("max_new_tokens",)


def parse_args(argv=None):
    p = _Parser(prog="sample.py", description=__doc__.strip().splitlines()[0], argument_default=argparse.SUPPRESS,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, SampleConfig)  # the trainers' flag maker: typed from the dataclass, --compile alone is true
    args = vars(p.parse_args(argv))
    return SampleConfig(**args), set(args)


def check_flags(cfg, given):
    if "split" in given and not cfg.eval:
        raise UsageError("--split applies to --eval shapes only")
    if cfg.figure or cfg.reader_grid:
        mode = "figure" if cfg.figure else "reader_grid"
        wrong = [k for k in ("prompt", "image", "eval", "figure", "reader_grid") if k in given and k != mode]
        if wrong:
            raise UsageError(f"--{wrong[0]} does not apply to --{mode}")
    elif cfg.eval:
        if cfg.eval != "shapes":
            raise UsageError(f"--eval {cfg.eval!r}: the only benchmark is 'shapes'")
        if cfg.split not in EVAL_SPLITS:
            raise UsageError(f"--split {cfg.split!r}: one of {', '.join(EVAL_SPLITS)}")
        wrong = [k for k in ("prompt", "image") if k in given]
        if wrong:
            raise UsageError(f"--{wrong[0]} does not apply to --eval")
    elif cfg.image:
        wrong = [k for k in GENERATION_ONLY if k in given]
        if wrong:
            raise UsageError(f"--{wrong[0]} applies to text → image, not to --image")
    else:
        if not cfg.prompt:
            raise UsageError("nothing to do: give --prompt CAPTION (text → image) or --image PATH")
        wrong = [k for k in UNDERSTANDING_ONLY if k in given]
        if wrong:
            raise UsageError(f"--{wrong[0]} applies to --image (image → text) only")
    check_numbers(cfg, at_least_1=("num_samples", "max_new_tokens"), at_least_0=("top_k", "threads"))
    if ("temperature" in given and cfg.temperature < 0) or not 0 < cfg.top_p <= 1:
        raise UsageError("--temperature must be ≥ 0, --top_p in (0, 1]")
    if "cfg" in given and cfg.cfg < 0:
        raise UsageError(f"--cfg must be ≥ 0, got {cfg.cfg}")
    check_device("--device", cfg.device)


def cpu_threads(flag, environ=os.environ):
    """Intra-op threads on the CPU: --threads if given, else $OMP_NUM_THREADS if set, else 1. The
    demo's matmuls are small and sampling is sequential: a second thread is not worth its
    synchronization, and on a busy machine it waits for a core (EXPERIMENTS.md, "CPU threads")."""
    if flag:
        return flag
    env = environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def compile_llm_step(llm, device, kv_round=64):
    """torch.compile a Qwen2's cached step in place (its generate, answers and image positions use
    it) -> the torch.compile arguments, for the depth heads' steps. On CUDA in "reduce-overhead"
    mode (CUDA graphs replay a step without per-kernel launches, as in LlamaGen); a graph is
    recorded per shape, so attention reads the filled prefix rounded up to kv_round slots (≈13
    shapes for 729 positions), a padding mask hiding the extra slots."""
    # a CPU step calls its kernels from generated C++ (cpp_wrapper), not from Python: 0.43-0.46x
    # transformers' greedy decode instead of 0.48-0.51x, A/B on one idle day (bench.py --compile --compare)
    kw = dict(mode="reduce-overhead") if device.type == "cuda" else dict(options={"cpp_wrapper": True})
    step = torch.compile(llm.hidden, **kw)

    def hidden(idx=None, input_embeds=None, input_pos=None, key_mask=None, kv_len=None):
        if input_pos is not None and kv_len is not None:
            cache = llm.layers[0].attn.kv_cache.k  # (B, n_kv, S, hs)
            if key_mask is None:  # nothing padded: a mask only to hide the rounded-up slots
                key_mask = torch.ones(cache.shape[0], cache.shape[2], dtype=torch.bool, device=cache.device)
            kv_len = min(cache.shape[2], -(-kv_len // kv_round) * kv_round)
        return step(idx, input_embeds, input_pos, key_mask, kv_len)

    llm.hidden = hidden
    return kw


def compile_steps(model, device, kv_round=64):
    """torch.compile the per-position work: the LLM's cached step (compile_llm_step) and each depth
    head's slot step, which has one shape per depth."""
    kw = compile_llm_step(model.llm, device, kv_round)
    for head in (model.pix_head, model.sem_head):
        if head is not None:
            head.slot = torch.compile(head.slot, **kw)


def load(ckpt, device):
    model_dir("--ckpt", ckpt, " (the demo checkpoint is made by the README's training commands)" if ckpt == DEFAULT_CKPT else "")
    with reading(f"--ckpt {ckpt}: cannot load the checkpoint"):
        return load_pretrained(ckpt, device)


def main(argv=None):
    return run_main("sample.py", _main, argv)


def _main(argv):
    cfg, given = parse_args(argv)
    check_flags(cfg, given)
    for flag, path in (("--out", cfg.out if not (cfg.image or cfg.figure or cfg.reader_grid) else ""),
                       ("--figure", os.path.dirname(cfg.figure)), ("--reader_grid", os.path.dirname(cfg.reader_grid))):
        if path:
            writable_dir(flag, path)  # before minutes of sampling
    device = torch.device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads))
    model, enc, tokenizer = load(cfg.ckpt, device)
    if device.type == "cuda":
        # bf16 weights for everything a step reads (the codebooks stay fp32): under autocast fp32
        # weights would be recast at every step, e.g. 8 classifier slices of 16384 × 2048 per position
        for part in (model.llm, model.projector, model.pix_head, model.sem_head):
            if part is not None:
                part.to(torch.bfloat16)
    # bf16 autocast on the GPU (the RVQ search and RMSNorm stay fp32 inside); plain fp32 on the CPU
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        return run(cfg, given, model, enc, tokenizer, device)


def run(cfg, given, model, enc, tokenizer, device):
    if cfg.compile:
        compile_steps(model, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    top_k = cfg.top_k or None
    top_p = cfg.top_p if cfg.top_p < 1 else None
    # text → image: the checkpoint's sampling defaults unless given
    cfg = replace(cfg, cfg=cfg.cfg if "cfg" in given else model.config.sample_cfg,
                  temperature=cfg.temperature if "temperature" in given else model.config.sample_temperature)

    if cfg.figure or cfg.reader_grid:
        t0 = time.perf_counter()
        if cfg.figure:
            path, im, lines = cfg.figure, demo_figure(model, enc, tokenizer, cfg.cfg, cfg.temperature, cfg.seed), []
        else:
            path, (im, lines) = cfg.reader_grid, reader_grid(model, enc, tokenizer, cfg.cfg, cfg.temperature, cfg.seed)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        im.save(path, optimize=True)
        print("\n".join(lines + [f"{path} ({im.width}×{im.height}, {time.perf_counter() - t0:.0f} s)"]))
        return path

    warn_unknown_words(cfg.prompt, model)
    if cfg.eval:
        t0 = time.perf_counter()
        r = evaluate_shapes(model, enc, tokenizer, cfg=cfg.cfg, temperature=cfg.temperature, seed=cfg.seed,
                            out_dir=cfg.out, top_k=top_k, top_p=top_p, per_prompt=cfg.num_samples,
                            split=cfg.split)
        print(format_results(r))
        extra = "".join(f", {k} {v}" for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None)
        print(f"({time.perf_counter() - t0:.0f} s; {cfg.num_samples} images per prompt, cfg {cfg.cfg}, "
              f"temperature {cfg.temperature}{extra}, seed {cfg.seed}; grids of the generated images in {cfg.out}/)")
        return r

    if cfg.image:
        try:
            im = open_image(cfg.image)
        except BadImage as e:
            raise UsageError(f"cannot read image {cfg.image}: {e}") from None
        size, resample = tokenizer.config.siglip.image_size, tokenizer.config.siglip.resample
        x = to_tensor(im, size, resample)
        question = cfg.prompt or DESCRIBE
        temperature = cfg.temperature if "temperature" in given else 0.0  # greedy by default
        text = answer(model, enc, tokenizer, x, question, cfg.max_new_tokens, temperature, top_k, top_p,
                      gen, stream=lambda s: print(s, end="", flush=True))
        print()
        return text

    t0 = time.perf_counter()
    captions = [cfg.prompt] * cfg.num_samples
    pix, _ = generate_codes(model, enc, captions, cfg.cfg, cfg.temperature, top_k, top_p, gen, progress=True)
    t1 = time.perf_counter()
    images = tokenizer.decode(pix).float().cpu()  # (N, 3, H, W) in [-1, 1]
    t2 = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(cfg.out, f"sample_{i:02d}.png"))
        to_pil(im).save(paths[-1])
    paths.append(os.path.join(cfg.out, "grid.png"))
    image_grid(images).save(paths[-1])
    P = model.config.grid ** 2
    print(f"{cfg.num_samples} images of {P} positions in {t1 - t0:.2f} s ({P / (t1 - t0):.1f} positions/s, "
          f"{(t2 - t0) / cfg.num_samples:.2f} s per image with decoding), cfg {cfg.cfg}, "
          f"temperature {cfg.temperature}")
    for path in paths:
        print(path)
    read_back_report(cfg.prompt, images)
    return paths


def read_back_report(prompt, images):
    """A benchmark caption as the prompt: print what data.read_shapes reads in each image, and how
    many match the prompt on every attribute. Other prompts: nothing."""
    try:
        want = parse_shapes_caption(prompt)
    except ValueError:
        return None
    got = [read_shapes(im) for im in images]
    as_asked = [all(g[a] == want[a] for a in want) and not g["extra"] for g in got]
    for i, (g, ok) in enumerate(zip(got, as_asked)):
        seen = ("no object found" if g["shape"] is None else
                shapes_caption(dict(g, shape="unclear shape" if g["shape"] == "unclear" else g["shape"])))
        extra = f" + {g['extra']} extra object{'s' * (g['extra'] > 1)}" if g["extra"] else ""
        print(f"read back sample_{i:02d}: {seen}{extra}" + ("" if ok else "  (differs)"))
    k = sum(as_asked)
    print(f"{k} of {len(got)} read back as asked")
    return k


if __name__ == "__main__":
    main()
