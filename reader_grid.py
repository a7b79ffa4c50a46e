"""The strict reader's verdicts on the demo checkpoint's own images, laid out for a person to check.

    python reader_grid.py    # -> assets/reader_verdicts.png: 8 training-split captions x 4 images

Each image is drawn by sample.py's text → image path (the checkpoint's cfg and temperature, seed 0),
shown at 2x with data.read_shapes' verdict beneath: "OK" when every attribute reads as asked, else
what the reader saw ("unclear" = no ideal shape fits; "+N extra" = a second object or stray blob).
Only training-split captions: the reader's thresholds may be checked on these, never on held-out ones.
"""

import os

import torch
from PIL import Image, ImageDraw

from data import TRAIN_COMBOS, parse_shapes_caption, read_shapes, to_pil
from sample import DEFAULT_CKPT, generate_codes, load

CAPTIONS = (
    "a large red circle in the center on a white background",  # the README's prompt
    "a small blue square at the top left on a black background",
    "a large green triangle at the bottom right on a gray background",
    "a large yellow square on the right on a black background",
    "a small purple circle at the bottom on a white background",
    "a small orange triangle at the top on a gray background",
    "a large blue circle on the left on a gray background",
    "a large purple triangle at the bottom left on a white background",
)
ATTRS = ("shape", "color", "size", "where", "background")
SCALE, PER_CAPTION, GAP, TEXT = 2, 4, 4, 12


def verdict(got, want):
    """The reader's verdict on one image as a short line: "circle OK", "unclear", "square, where: top"."""
    if got["shape"] is None:
        return "no object"
    wrong = [a for a in ATTRS[1:] if got[a] != want[a]]
    line = got["shape"] + ("" if got["shape"] == want["shape"] else " (x)")
    line += "".join(f", {a}: {got[a]}" for a in wrong) + (f", +{got['extra']} extra" if got["extra"] else "")
    return line + (" OK" if line == want["shape"] else "")


@torch.no_grad()
def main(out="assets/reader_verdicts.png", seed=0):
    wants = [parse_shapes_caption(c) for c in CAPTIONS]
    assert all((w["color"], w["shape"], w["where"]) in set(TRAIN_COMBOS) for w in wants)
    model, enc, tokenizer = load(DEFAULT_CKPT, torch.device("cpu"))
    captions = [c for c in CAPTIONS for _ in range(PER_CAPTION)]
    pix, _ = generate_codes(model, enc, captions, model.config.sample_cfg, model.config.sample_temperature,
                            generator=torch.Generator().manual_seed(seed))
    images = tokenizer.decode(pix).float()
    side = images.shape[-1] * SCALE
    cell_w, row_h = side + GAP, TEXT + side + 2 * TEXT + GAP
    canvas = Image.new("RGB", (2 * PER_CAPTION * cell_w, len(CAPTIONS) // 2 * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (caption, im) in enumerate(zip(captions, images)):
        k, j = divmod(i, PER_CAPTION)  # caption k, its j-th image; two captions a row
        x, y = (k % 2 * PER_CAPTION + j) * cell_w, k // 2 * row_h
        if j == 0:
            draw.text((x, y), caption[2:], fill="black")
        canvas.paste(to_pil(im).resize((side, side), Image.Resampling.NEAREST), (x, y + TEXT))
        text = verdict(read_shapes(im), wants[k])
        draw.text((x, y + TEXT + side + 1), text[:22], fill="black")
        draw.text((x, y + TEXT + side + 1 + TEXT), text[22:44], fill="black")
        print(f"{k}.{j}  {text}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    canvas.save(out, optimize=True)
    print(out, f"{os.path.getsize(out) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
