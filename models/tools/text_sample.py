#!/usr/bin/env python3
"""Photographs with text drawn on them: test and calibration images for text detection.

No registry package ships a small, permissively licensed photograph of text that fits the
detection bundle's square input, so this draws one: a sample photograph from models/samples
(public domain or CC0, see its README) scaled to a square, with words at several sizes drawn
on light panels, on dark bands and straight onto the picture. The font is the Aileron Regular
subset that Pillow embeds (`ImageFont.load_default(size)`, Aileron by Sora Sagano, CC0).
Pillow and numpy only (requirements-split.txt); fixed seeds, so the same Pillow draws the
same pixels.

    python models/tools/text_sample.py --out models/samples/detection/text-coffee.png

writes the committed sample (coffee background, seed 0, reduced to 256 colours). `make_bundle.py ppocr-det` uses
`calibration_images` / `evaluation_images` for the bottleneck fit and fidelity.
"""

import argparse
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = pathlib.Path(__file__).resolve().parent
SAMPLES = HERE.parent / "samples"
SIZE = 480
WORDS = [
    "CLEAVE", "split", "computing", "edge", "server", "head", "tail", "bottleneck", "frame",
    "OPEN", "exit", "coffee", "STREET", "Platform 4", "No parking", "delay", "uplink", "tensor",
    "Station", "MENU", "espresso", "north", "Gate B12", "2026", "route 66", "detector", "text",
]
# Backgrounds: the committed sample's first, then the ones the calibration images use.
SAMPLE = ("coffee", 0)
CALIBRATION = [("astronaut", 1), ("chelsea", 2), ("china", 3), ("flower", 4), ("rocket", 5),
               ("coffee", 6), ("chelsea", 7), ("china", 8)]
EVALUATION = [("rocket", 9), ("flower", 10), ("astronaut", 11)]


def background(name, size=SIZE):
    """The sample photograph `name`, centre-cropped to a square and scaled to `size`."""
    img = Image.open(SAMPLES / f"{name}.jpg").convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    # A little blur: the upscaled JPEG's blocks would otherwise cost PNG bytes.
    return img.filter(ImageFilter.GaussianBlur(1.2))


def draw_text_image(name, seed, size=SIZE):
    """Words in rows down the picture; each row a panel, a band or bare text."""
    rng = np.random.default_rng(seed)
    img = background(name, size)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(12, 30))
    while True:
        height = int(rng.choice([44, 34, 26, 20, 15]))
        font = ImageFont.load_default(height)
        words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(1, 4)), replace=False)]
        text = " ".join(words)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        if y + th + 16 > size:
            break
        if tw + 24 > size:
            continue
        x = int(rng.integers(10, size - tw - 12))
        style = rng.choice(["panel", "band", "bare"])
        pad = max(4, th // 3)
        box = (x - pad, y - pad, x + tw + pad, y + th + pad)
        if style == "panel":
            fill = tuple(int(v) for v in rng.integers(200, 256, 3))
            ink = tuple(int(v) for v in rng.integers(0, 70, 3))
            draw.rectangle(box, fill=fill)
            draw.text((x - left, y - top), text, font=font, fill=ink)
        elif style == "band":
            fill = tuple(int(v) for v in rng.integers(0, 60, 3))
            ink = tuple(int(v) for v in rng.integers(210, 256, 3))
            draw.rectangle(box, fill=fill)
            draw.text((x - left, y - top), text, font=font, fill=ink)
        else:
            ink = (255, 255, 255) if rng.random() < 0.5 else (10, 10, 10)
            outline = (0, 0, 0) if ink[0] > 128 else (255, 255, 255)
            draw.text((x - left, y - top), text, font=font, fill=ink,
                      stroke_width=max(1, height // 14), stroke_fill=outline)
        y += th + 2 * pad + int(rng.integers(10, 34))
    return img


def calibration_images():
    return [draw_text_image(name, seed) for name, seed in CALIBRATION]


def evaluation_images(include_sample=True):
    """Held out from any fitting: the committed sample's drawing (before its reduction to 256
    colours), then three more."""
    chosen = [SAMPLE, *EVALUATION] if include_sample else EVALUATION
    return [draw_text_image(name, seed) for name, seed in chosen]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--background", default=SAMPLE[0], help="a models/samples photograph name")
    p.add_argument("--seed", type=int, default=SAMPLE[1])
    args = p.parse_args()
    img = draw_text_image(args.background, args.seed)
    # 256 colours, no dithering: under 100 KB as PNG, and PNG decodes to the same pixels in
    # Pillow and in Rust's `image` (a JPEG decoder may differ by a level here and there).
    img = img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes, {img.size[0]}x{img.size[1]})")


if __name__ == "__main__":
    main()
