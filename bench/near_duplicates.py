"""Near-duplicate detection at scale: 60,000 32x32 images made from cifar10-mini (its 6,000
train + val images, each with 9 transformed copies: JPEG quality 30, resized down and up, cropped
by 2-3 pixels, brightened 10%, contrast -10%, mirrored, mirrored + JPEG 50, cropped + JPEG 50,
brightened + mirrored). Times `visionflow.data.near_duplicates.find_pairs` on the thumbnails (what the
validation pass feeds it), after generating them.

recall: planted (original, copy) pairs found. false_positive_rate: flagged pairs of images made
from different originals / all such pairs. peak_rss_mb: this process (NumPy + PIL, no torch).

Last line: images=<n> seconds=<s> peak_rss_mb=<m> recall=<r> false_positive_rate=<f>
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow.data.near_duplicates import find_pairs, thumbnail  # noqa: E402


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """2-3 pixels off each axis, at a random offset."""
    width, height = image.size
    cut_x, cut_y = rng.integers(2, 4, size=2)
    left, top = rng.integers(0, cut_x + 1), rng.integers(0, cut_y + 1)
    return image.crop((left, top, width - (cut_x - left), height - (cut_y - top)))


def transforms(rng: np.random.Generator) -> list:
    return [
        lambda im: jpeg(im, 30),
        lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR).resize(im.size),
        lambda im: crop(im, rng),
        lambda im: ImageEnhance.Brightness(im).enhance(1.1),
        lambda im: ImageEnhance.Contrast(im).enhance(0.9),
        ImageOps.mirror,
        lambda im: jpeg(ImageOps.mirror(im), 50),
        lambda im: jpeg(crop(im, rng), 50),
        lambda im: ImageOps.mirror(ImageEnhance.Brightness(im).enhance(1.1)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-mini")
    parser.add_argument("--originals", type=int, default=6000, help="originals used (each with 9 copies)")
    args = parser.parse_args()
    files = sorted(args.data.glob("*/*/*.jpg"))[: args.originals]
    rng = np.random.default_rng(0)
    steps = transforms(rng)
    thumbs, source = [], []
    for k, file in enumerate(files):
        with Image.open(file) as opened:
            image = opened.convert("RGB")
        for picture in [image] + [step(image) for step in steps]:
            thumbs.append(thumbnail(picture))
            source.append(k)
    thumbs, source = np.stack(thumbs), np.array(source)
    print(f"generated {len(thumbs)} thumbnails from {len(files)} originals", flush=True)

    start = time.perf_counter()
    pairs, scores = find_pairs(thumbs)
    seconds = time.perf_counter() - start

    copies = len(steps) + 1
    found = {(int(i), int(j)) for i, j in pairs}
    planted = [(k * copies, k * copies + c) for k in range(len(files)) for c in range(1, copies)]
    recall = sum(pair in found for pair in planted) / len(planted)
    for c in range(1, copies):
        got = sum((k * copies, k * copies + c) in found for k in range(len(files)))
        print(f"  transform {c}: {got}/{len(files)} found")
    false = int(np.sum(source[pairs[:, 0]] != source[pairs[:, 1]]))
    different = len(thumbs) * (len(thumbs) - 1) // 2 - len(files) * copies * (copies - 1) // 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pairs found {len(pairs)}, of different originals {false}")
    print(
        f"images={len(thumbs)} seconds={seconds:.1f} peak_rss_mb={peak:.0f} recall={recall:.4f} "
        f"false_positive_rate={false / different:.2e}"
    )


if __name__ == "__main__":
    main()
