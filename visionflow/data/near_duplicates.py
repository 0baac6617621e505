"""Near-duplicate detection: the same photo re-encoded, resized, slightly cropped, brightened or
mirrored, within a split and across splits (train/eval leakage). NumPy only (no torch import), so
it runs in the validation pass on the thumbnails that pass already decodes.

Method, per image, on a THUMB x THUMB grayscale thumbnail:

1. Fingerprints: a 64-bit DCT hash (pHash): the 8x8 lowest frequencies of the thumbnail's 2-D
   DCT-II, one bit per coefficient (above the median of the 63 non-DC ones). A linear
   brightness/contrast change only moves the DC term and scales the rest, so the bits survive it;
   re-encoding and resizing change high frequencies, which are not used. The mirror's hash comes
   from the same coefficients (flipping left-right multiplies horizontal frequency u by (-1)^u).
   A crop shifts and stretches the picture, which moves many bits, so the hash is also taken of
   every crop of 2-3 pixels per axis of the image (VARIANTS: 63 crops, computed as matrix
   products with the DCT rows, no resampling of images).
2. Candidates, by multi-index hashing, never by comparing all pairs: the index holds every
   image's hash and its mirror's; the hash is split into 3 blocks (BLOCK_BITS). Two hashes within
   r bits agree within r' bits on at least one block when r < 3 (r' + 1) (pigeonhole), so a query
   looks up the C(block bits, <= r') neighbours of each of its blocks in a bucket table
   (counting sort over the block values) and checks the full hash of what it finds. The image
   itself is queried within HASH_RADIUS = 11 bits, each crop within CROP_RADIUS = 5.
3. Verification: the Pearson correlation at VERIFY x VERIFY pixels (the thumbnail's 2x2 cell
   means) of the candidate with the crop variant (and mirror) of the other image whose hash was
   closest, so that hash collisions between different pictures are dropped. `score` is that
   correlation; a pair is a near-duplicate at score >= threshold (config.NEAR_DUPLICATE_THRESHOLD).

Cost: hashing and verification are linear in the images; the search does ~9,100 bucket lookups
per image (4,900 for the image, 67 for each crop), each returning ~2N / 2^21 entries, so it is
linear up to ~1M images. Measured time, memory and recall: docs/performance.md, Near-duplicates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from PIL import Image

from visionflow.config import NEAR_DUPLICATE_THRESHOLD

THUMB = 32  # thumbnail side (grayscale) the fingerprints and the verification work on
VERIFY = 16  # side of the verification image (the thumbnail's 2x2 cell means)
HASH_SIDE = 8  # 8x8 DCT coefficients: a 64-bit hash
BLOCK_BITS = (21, 21, 22)  # multi-index hashing: the hash as 3 blocks (bucket tables of 2^21, 2^22)
BLOCK_RADIUS = 3  # bits searched per block for the image itself (and its mirror)
HASH_RADIUS = len(BLOCK_BITS) * (BLOCK_RADIUS + 1) - 1  # 11: the image itself within 11 bits: a candidate
CROP_BLOCK_RADIUS = 1  # bits searched per block for a crop variant
CROP_RADIUS = len(BLOCK_BITS) * (CROP_BLOCK_RADIUS + 1) - 1  # 5: a crop variant within 5 bits: a candidate
VERIFY_SLACK = 0  # verify the variants this many bits farther than the closest (0: the closest ones)
_HASH_CHUNK = 1024  # images hashed at a time (bounds memory: 64 variants x 64 coefficients each)


def thumbnail(image: Image.Image) -> np.ndarray:
    """The (THUMB, THUMB) uint8 grayscale thumbnail of a decoded RGB image (bilinear, antialiased)."""
    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)


def _resize_matrix(crop: tuple[float, float], size: int = THUMB) -> np.ndarray:
    """(size, size) linear-interpolation matrix: crop `crop` = (first, last) pixels (at THUMB
    pixels) off one axis of a size-pixel line and stretch the rest back (pixel centres aligned)."""
    first, last = (side * size / THUMB for side in crop)
    step = (size - first - last) / size
    centres = first + (np.arange(size) + 0.5) * step - 0.5
    low = np.clip(np.floor(centres), 0, size - 1).astype(int)
    high = np.clip(low + 1, 0, size - 1)
    weight = np.clip(centres - low, 0.0, 1.0)
    matrix = np.zeros((size, size))
    matrix[np.arange(size), low] += 1.0 - weight
    matrix[np.arange(size), high] += weight
    return matrix


def _dct_matrix(n: int, k: int) -> np.ndarray:
    """The first k rows of the orthonormal n-point DCT-II matrix."""
    x = np.arange(n)
    rows = np.cos(np.pi * (2 * x[None, :] + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    rows[0] /= np.sqrt(2.0)
    return rows


# Per axis: the crops a query tries (pixels off the first and the last side, at THUMB pixels):
# every crop of 2 or 3 pixels of a 32-pixel image; variant 0 is the image itself. Each image is
# queried as AXIS_CROPS^2 = 64 variants. (A few pixels off a larger image are a fraction of a
# thumbnail pixel: the image itself is close enough.)
AXIS_CROPS = ((0, 0), (0, 2), (1, 1), (2, 0), (0, 3), (1, 2), (2, 1), (3, 0))
VARIANTS = tuple((vertical, horizontal) for vertical in AXIS_CROPS for horizontal in AXIS_CROPS)
# DCT rows of each cropped axis: coefficients of variant (v, h) = _AXIS_DCT[v] @ thumb @ _AXIS_DCT[h].T
_AXIS_DCT = np.stack([_dct_matrix(THUMB, HASH_SIDE) @ _resize_matrix(crop) for crop in AXIS_CROPS]).astype(np.float32)
# The same crops at the verification size (VERIFY pixels).
_AXIS_VERIFY = np.stack([_resize_matrix(crop, VERIFY) for crop in AXIS_CROPS]).astype(np.float32)
_FLIP = np.where(np.arange(HASH_SIDE) % 2, -1.0, 1.0).astype(np.float32)  # (-1)^u: the mirror's DCT


def _hash_bits(coefficients: np.ndarray) -> np.ndarray:
    """(..., 8, 8) DCT coefficients -> (...,) uint64: bit i set where coefficient i (row-major) is
    above the median of the 63 non-DC ones (the DC term, i.e. brightness, is left out)."""
    flat = coefficients.reshape(*coefficients.shape[:-2], HASH_SIDE * HASH_SIDE)
    median = np.partition(flat[..., 1:], 31, axis=-1)[..., 31:32]  # the 32nd of 63: the median
    packed = np.packbits(flat > median, axis=-1, bitorder="little")  # (..., 8) bytes, bit i = column i
    return np.ascontiguousarray(packed).view(np.uint64)[..., 0]


def dct_hashes(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """64-bit DCT hashes of every crop variant (VARIANTS) of (N, THUMB, THUMB) thumbnails and of
    their mirror images: two (N, len(VARIANTS)) uint64; column 0 is the image itself."""
    crops = len(AXIS_CROPS)
    rows = _AXIS_DCT.reshape(crops * HASH_SIDE, THUMB)  # (64, 32): every crop's DCT rows
    hashes = np.empty((len(thumbs), len(VARIANTS)), np.uint64)
    mirrors = np.empty_like(hashes)
    for start in range(0, len(thumbs), _HASH_CHUNK):
        block = thumbs[start : start + _HASH_CHUNK].astype(np.float32)
        horizontal = (block.reshape(-1, THUMB) @ rows.T).reshape(len(block), THUMB, -1)  # (n, 32 rows, 64)
        coefficients = np.tensordot(rows, horizontal, axes=([1], [1])).transpose(1, 0, 2)  # (n, 64, 64)
        coefficients = coefficients.reshape(len(block), crops, HASH_SIDE, crops, HASH_SIDE).transpose(0, 1, 3, 2, 4)
        coefficients = coefficients.reshape(len(block), len(VARIANTS), HASH_SIDE, HASH_SIDE)
        hashes[start : start + len(block)] = _hash_bits(coefficients)
        mirrors[start : start + len(block)] = _hash_bits(coefficients * _FLIP)
    return hashes, mirrors


def _block_masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-bit value with at most `radius` bits set (the neighbourhood of a block)."""
    masks = [0]
    for count in range(1, radius + 1):
        masks += [sum(1 << bit for bit in chosen) for chosen in combinations(range(bits), count)]
    return np.array(masks, dtype=np.int64)


def _search(index: np.ndarray, queries: np.ndarray, block_radius: int, images: int, per_image: int) -> np.ndarray:
    """Multi-index hashing: the unique keys `query_image * images + index_image` (query row r is
    image r // per_image, index row r image r % images) of the pairs whose hashes are within
    len(BLOCK_BITS) * (block_radius + 1) - 1 bits (pigeonhole: then one block is within
    block_radius bits, and every such block value is looked up)."""
    radius = len(BLOCK_BITS) * (block_radius + 1) - 1
    found = [np.empty(0, np.int64)]
    shift = 0
    for bits in BLOCK_BITS:
        masks = _block_masks(bits, block_radius)
        step = max(1, (1 << 22) // len(masks))  # queries per chunk: ~4M bucket lookups at a time
        keys = ((index >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        sorted_hashes = index[order]
        counts = np.bincount(keys, minlength=1 << bits).astype(np.int32)
        starts = np.cumsum(counts) - counts
        query_keys = ((queries >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        for start in range(0, len(queries), step):
            neighbours = (query_keys[start : start + step, None] ^ masks).ravel()
            hit = np.flatnonzero(counts[neighbours])
            buckets = neighbours[hit]
            sizes = counts[buckets]
            owners = np.repeat(start + hit // len(masks), sizes)
            # Positions inside each bucket: a running index restarted at every bucket.
            positions = np.repeat(starts[buckets] - (np.cumsum(sizes) - sizes), sizes) + np.arange(len(owners))
            close = np.bitwise_count(queries[owners] ^ sorted_hashes[positions]) <= radius
            pairs = (owners[close] // per_image) * images + order[positions[close]] % images
            found.append(np.unique(pairs))
        shift += bits
    return np.unique(np.concatenate(found))


def candidates(hashes: np.ndarray, mirrors: np.ndarray) -> np.ndarray:
    """(P, 2) int64 unique rows (i, j), i != j: image i is within HASH_RADIUS bits of image j or of
    j's mirror, or one of i's crop variants (VARIANTS) within CROP_RADIUS bits."""
    count = len(hashes)
    index = np.concatenate([hashes[:, 0], mirrors[:, 0]])  # row r: image r % count, mirrored when r >= count
    keys = np.union1d(
        _search(index, hashes[:, 0], BLOCK_RADIUS, count, 1),
        _search(index, hashes[:, 1:].ravel(), CROP_BLOCK_RADIUS, count, len(VARIANTS) - 1),
    )
    rows = np.stack(np.divmod(keys, count), axis=1)
    return rows[rows[:, 0] != rows[:, 1]]


def _normalized(images: np.ndarray) -> np.ndarray:
    """(n, VERIFY, VERIFY) -> (n, VERIFY*VERIFY) float32 with zero mean and unit norm (flat: 0)."""
    flat = images.reshape(len(images), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms > 0, norms, 1.0)


def _small(thumbs: np.ndarray) -> np.ndarray:
    """(N, VERIFY, VERIFY) float32: the thumbnails' 2x2 cell means."""
    factor = THUMB // VERIFY
    return thumbs.astype(np.float32).reshape(len(thumbs), VERIFY, factor, VERIFY, factor).mean(axis=(2, 4))


def pair_scores(thumbs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(P,) float32 verification score of candidate rows (i, j, variant, mirrored): the correlation
    of image j (or its mirror) with the variant of image i at VERIFY x VERIFY pixels."""
    small = _small(thumbs)
    # Zero-mean unit-norm targets, then their mirrors: the correlation of a with target t is
    # a.t / |a - mean(a)| because t has zero mean, so the moved images are never normalized.
    targets = _normalized(small)
    targets = np.concatenate([targets, targets.reshape(-1, VERIFY, VERIFY)[:, :, ::-1].reshape(len(small), -1)])
    pixels = VERIFY * VERIFY
    scores = np.empty(len(rows), np.float32)
    order = np.argsort(rows[:, 2], kind="stable")
    bounds = np.searchsorted(rows[order, 2], np.arange(len(VARIANTS) + 1))
    for variant in range(len(VARIANTS)):
        selected = order[bounds[variant] : bounds[variant + 1]]
        vertical, horizontal = divmod(variant, len(AXIS_CROPS))
        for start in range(0, len(selected), 1 << 15):
            part = selected[start : start + (1 << 15)]
            i, j, _, mirrored = rows[part].T
            moved = small[i]
            if variant:
                moved = (moved.reshape(-1, VERIFY) @ _AXIS_VERIFY[horizontal].T).reshape(len(i), VERIFY, VERIFY)
                moved = np.tensordot(_AXIS_VERIFY[vertical], moved, axes=([1], [1])).transpose(1, 0, 2)
            moved = moved.reshape(len(i), pixels)
            dot = np.einsum("pk,pk->p", moved, targets[j + mirrored * len(small)])
            total = moved.sum(axis=1)
            spread = np.einsum("pk,pk->p", moved, moved) - total * total / pixels
            scores[part] = dot / np.sqrt(np.maximum(spread, 1e-6))
    return scores


def _near_best_variants(hashes: np.ndarray, mirrors: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Candidate rows (i, j, variant, mirrored) for (P, 2) image pairs: the variants of i (mirrored
    or not) whose hash is within VERIFY_SLACK bits of the pair's closest one (the closest by hash
    is not always the best aligned: verification picks among them)."""
    i, j = pairs.T
    distances = np.concatenate(
        [np.bitwise_count(table[i] ^ hashes[j, :1]) for table in (hashes, mirrors)], axis=1
    )  # (P, 2 * variants)
    chosen = np.argwhere(distances <= distances.min(axis=1, keepdims=True) + VERIFY_SLACK)
    mirrored, variant = np.divmod(chosen[:, 1], len(VARIANTS))
    return np.stack([i[chosen[:, 0]], j[chosen[:, 0]], variant, mirrored], axis=1)


def find_pairs(thumbs: np.ndarray, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate pairs among (N, THUMB, THUMB) uint8 thumbnails: (P, 2) index pairs i < j and
    their (P,) scores (the best verified alignment of the pair), score >= threshold."""
    hashes, mirrors = dct_hashes(thumbs)
    rows = _near_best_variants(hashes, mirrors, candidates(hashes, mirrors))
    scores = pair_scores(thumbs, rows)
    keep = scores >= threshold
    pairs = np.sort(rows[keep, :2], axis=1)
    order = np.lexsort((-scores[keep], pairs[:, 1], pairs[:, 0]))
    pairs, best = pairs[order], scores[keep][order]
    first = np.ones(len(pairs), bool)
    first[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return pairs[first], best[first]


@dataclass(frozen=True)
class LeakPair:
    train: str
    eval: str
    score: float


@dataclass(frozen=True)
class NearDuplicateReport:
    """Near-duplicates of a dataset; paths are dataset-relative like the validation report's."""

    threshold: float
    eval_split: str
    eval_images: int
    within: tuple[tuple[str, ...], ...]  # groups of near-identical images inside one split
    across: tuple[LeakPair, ...]  # (train, eval) pairs, highest score first
    leaked_per_class: dict[str, int]  # eval images with a near-duplicate in train, per class

    @property
    def leaked_eval(self) -> tuple[str, ...]:
        """Eval images with a near-duplicate in the training split, sorted."""
        return tuple(sorted({pair.eval for pair in self.across}))

    @property
    def eval_leakage_rate(self) -> float:
        """Fraction of the eval split with a near-duplicate in the training split."""
        return len(self.leaked_eval) / self.eval_images if self.eval_images else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The validation report's `near_duplicates` section."""
        return {
            "within_split": [list(group) for group in self.within],
            "across_splits": [{"train": p.train, "eval": p.eval, "score": p.score} for p in self.across],
        }

    def summary(self) -> dict[str, Any]:
        """Threshold, leakage rate and counts (the validation report's `near_duplicate_summary`)."""
        return {
            "threshold": self.threshold,
            "eval_split": self.eval_split,
            "eval_leakage_rate": self.eval_leakage_rate,
            "leaked_eval_images": len(self.leaked_eval),
            "leaked_per_class": self.leaked_per_class,
        }

    def format_lines(self, limit: int = 20) -> list[str]:
        """Lines for the text report (the first `limit` groups and pairs)."""
        lines = [
            f"near-duplicate groups within a split (score >= {self.threshold}): {len(self.within)}",
            *["  " + " ~ ".join(group) for group in self.within[:limit]],
            f"near-duplicates across splits: {len(self.across)} pairs, {len(self.leaked_eval)} of "
            f"{self.eval_images} {self.eval_split} images leaked ({self.eval_leakage_rate:.2%})",
            *[f"  {p.train} ~ {p.eval} (score {p.score:.3f})" for p in self.across[:limit]],
        ]
        if self.leaked_per_class:
            lines.append("  leaked per class: " + ", ".join(f"{c} {n}" for c, n in self.leaked_per_class.items()))
        return lines


def _groups(pairs: Sequence[tuple[int, int]], size: int) -> list[list[int]]:
    """Connected components (union-find) of the pairs' graph with more than one member."""
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in sorted({i for pair in pairs for i in pair}):
        members.setdefault(root(i), []).append(i)
    return [group for group in members.values() if len(group) > 1]


def near_duplicate_report(
    thumbs: dict[str, np.ndarray],
    paths: dict[str, Sequence[str]],
    classes: dict[str, Sequence[str]],
    eval_split: str,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
) -> NearDuplicateReport:
    """Near-duplicates of the splits' thumbnails (split -> (N, THUMB, THUMB) uint8), with their
    dataset-relative paths and class names in the same order; `eval_split` is compared with train."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"Invalid near-duplicate threshold {threshold}: expected a correlation in (0, 1]")
    names = list(thumbs)
    split_of = np.concatenate([np.full(len(thumbs[name]), k) for k, name in enumerate(names)])
    every_path = [path for name in names for path in paths[name]]
    every_class = [label for name in names for label in classes[name]]
    pairs, scores = find_pairs(np.concatenate([thumbs[name] for name in names]), threshold)
    same = split_of[pairs[:, 0]] == split_of[pairs[:, 1]]
    within = sorted(tuple(every_path[i] for i in group) for group in _groups(pairs[same].tolist(), len(every_path)))
    train, evaluated = names.index("train"), names.index(eval_split)
    across, leaked = [], {}
    for (i, j), score in zip(pairs[~same].tolist(), scores[~same].tolist()):
        if {split_of[i], split_of[j]} == {train, evaluated}:
            i, j = (i, j) if split_of[i] == train else (j, i)
            across.append(LeakPair(every_path[i], every_path[j], round(min(score, 1.0), 4)))
            leaked[every_path[j]] = every_class[j]
    across.sort(key=lambda p: (-p.score, p.eval, p.train))
    return NearDuplicateReport(
        threshold=threshold,
        eval_split=eval_split,
        eval_images=len(thumbs[eval_split]),
        within=tuple(within),
        across=tuple(across),
        leaked_per_class=dict(sorted(Counter(leaked.values()).items())),
    )
