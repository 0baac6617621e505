"""Image decoding: any common format and pixel mode to an 8-bit RGB PIL image, plus the thread
pool every per-file pass (hashing, validation, decoding) runs on.

Decisions:
- Transparency is composited on white. Dropping alpha would expose whatever colour happens to
  sit under fully transparent pixels (often black or noise), which is not what a viewer shows.
- 16-bit samples (I;16*, and mode I, which is how older Pillow opened 16-bit PNG/TIFF) are
  scaled 0..65535 -> 0..255 (round(v / 257)); clipping would turn most 16-bit images white.
- EXIF orientation is NOT applied, matching torchvision's ImageFolder loader, so pixels (and
  therefore models and duplicate hashes) agree with what other torchvision tools see.
- Animated formats (GIF, WebP) yield their first frame.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionflow.cores import usable_cores
from visionflow.errors import DatasetError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

T = TypeVar("T")
R = TypeVar("R")


class UnreadableImage(DatasetError):
    """A file that cannot be decoded as an image; `reason` is short enough for a report column."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"Unreadable image '{path}': {reason}; expected a decodable image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
        self.path = path
        self.reason = reason


def is_image_file(path: Path) -> bool:
    """True when the extension (case-insensitive) is one of IMAGE_EXTENSIONS."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def open_image(path: Path | str) -> Image.Image:
    """Fully decode an image in its original mode; raises UnreadableImage (a DatasetError)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as image:
            # load() decodes every byte now: a truncated file must fail here, not in a worker later.
            image.load()
            return image
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise UnreadableImage(path, f"too many pixels ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = "truncated image data" if "truncated" in message.lower() else f"decode error: {message}"
        raise UnreadableImage(path, reason) from None


def to_rgb(image: Image.Image, path: Path | str = "<image>") -> Image.Image:
    """Convert any supported mode to 8-bit RGB (see the module docstring for the choices)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        # round(v / 257) maps 0..65535 onto 0..255 exactly; mode I may exceed 16 bits, so clip first.
        eight = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise UnreadableImage(Path(path), f"unsupported pixel mode {image.mode} ({err})") from None


def load_rgb(path: Path | str) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image; raises DatasetError if unreadable/truncated."""
    return to_rgb(open_image(path), path)


def worker_count() -> int:
    """Threads for per-file work: the usable cores plus a few, since file I/O also waits."""
    return min(32, usable_cores() + 4)


def thread_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """map() on a thread pool, results in input order. Decoding (PIL), hashing (hashlib) and file
    reads release the GIL, so threads use every core without the pickling cost of processes."""
    items = list(items)
    workers = worker_count()
    if len(items) < 2 or workers < 2:
        return [fn(item) for item in items]
    # Chunks amortize the per-task future overhead, which dominates for tiny files; several
    # chunks per worker keep the load balanced when file sizes vary.
    size = max(1, min(256, len(items) // (workers * 4)))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda chunk: [fn(item) for item in chunk], chunks)
        return [result for chunk_results in done for result in chunk_results]
