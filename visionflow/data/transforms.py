"""Image transforms, in two forms.

PIL pipelines (torchvision's Resize, CenterCrop, ToTensor, Normalize, Compose) turn one file's
image into a model input for evaluation, prediction and previews. The training fast path never
touches PIL: the decoded split is a uint8 (N, 3, D, D) tensor already on the training device (D =
config.decode_size: the input size, or more for a center crop), and each batch is cropped and
augmented there (random crop with zero padding or a random-resized crop, horizontal flip) from a
seeded torch.Generator, then normalized by one fused multiply-add. Both forms use the same
statistics: mean and std per channel on [0, 1] pixels, and the same center crop.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visionflow.config import decode_size

CROP_PADDING = 4  # pixels of zero padding before the random crop: the CIFAR standard (recipes set data.crop_padding)
_STATS_CHUNK = 4096  # images per bincount pass: bounds the temporary copy to ~12 MB at 32x32
_MIN_STD = 1 / 255  # one grey level: a constant channel would otherwise divide by zero
RESIZED_CROP_SCALE = (0.08, 1.0)  # area fraction of a random-resized crop: torchvision's RandomResizedCrop default
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio range, likewise

# ---------------------------------------------------------------------------------------------
# PIL pipelines (one image at a time)


def resize(image_size: int) -> Any:
    """To `image_size` x `image_size`, bilinear with antialiasing: exactly what decoded.py stores, so a
    model sees the same pixels whether an image comes from the decoded cache or from a file."""
    from torchvision import transforms as T  # here: torchvision's import costs ~2 s (torch._dynamo)

    return T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR)


def eval_pipeline(image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0) -> Any:
    """PIL image -> normalized float32 (3, S, S): resized to decode_size(S, crop_pct), center-cropped
    to S; what evaluation and prediction feed the model (the same pixels as `center_crop` of the
    decoded split)."""
    from torchvision import transforms as T

    size = decode_size(image_size, crop_pct)
    return T.Compose([resize(size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_std(images: Tensor | Iterable[Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std on [0, 1] pixels of a uint8 (N, 3, H, W) tensor, or
    of a split given as uint8 (B, 3, H, W) batches (`loaders.uint8_batches`: the same figures).

    Exact and memory-light: a 256-bin histogram per channel instead of a float copy of the split.
    """
    chunks = images.split(_STATS_CHUNK) if isinstance(images, Tensor) else images
    counts = torch.zeros(3, 256, dtype=torch.float64)  # pixels per grey level, per channel
    for chunk in chunks:
        if chunk.dtype != torch.uint8 or chunk.dim() != 4 or chunk.shape[1] != 3:
            raise ValueError(f"mean_std expects uint8 (N, 3, H, W) images, got {chunk.dtype} {tuple(chunk.shape)}")
        for c in range(3):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1).cpu(), minlength=256).double()
    total = counts.sum(1)  # (C,)
    if not total.all():
        raise ValueError("mean_std expects at least one image, got none")
    levels = torch.arange(256, dtype=torch.float64) / 255  # (256,) pixel values on [0, 1]
    mean = (counts * levels).sum(1) / total
    var = (counts * levels**2).sum(1) / total - mean**2
    std = var.clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------------------------------------
# Batch ops on uint8 tensors, on the training device


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central `size` x `size` of (B, C, D, D) images, at torchvision CenterCrop's offset."""
    top = int(round((images.shape[-2] - size) / 2.0))
    left = int(round((images.shape[-1] - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def augment_batch(
    images: Tensor, generator: torch.Generator, padding: int = CROP_PADDING, size: int | None = None
) -> Tensor:
    """The training augmentation, per image: random `size` x `size` crop (default: the images' own
    size) after zero padding by `padding` pixels, then a horizontal flip with probability 1/2
    (torchvision's RandomCrop(size, padding) + RandomHorizontalFlip). uint8 (B, C, H, W) in, uint8
    (B, C, size, size) out.

    One gather over the padded batch does both (a flip is just reversed column indices): no
    Python loop over images, the same kernels on every device.
    """
    b, c = images.shape[:2]
    h = w = size or images.shape[-1]
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, Hp, Wp), Hp = H + 2p
    slack = padded.shape[-1] - w + 1  # crop positions per axis
    offsets = torch.randint(0, slack, (2, b), device=device, generator=generator)  # (2, B): dy, dx
    flip = torch.rand(b, device=device, generator=generator) < 0.5  # (B,)
    col_order = torch.arange(w, device=device)  # (W,)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # (B, H) row in the padded image
    cols = offsets[1, :, None] + torch.where(flip[:, None], col_order.flip(0), col_order)  # (B, W)
    index = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]  # (B, H, W) flat pixel in (Hp, Wp)
    out = padded.flatten(2).gather(2, index.view(b, 1, h * w).expand(b, c, h * w))  # (B, C, H*W)
    return out.unflatten(2, (h, w))  # (B, C, H, W)


def random_resized_crop(images: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """The fine-tuning augmentation, per image: a random box of RESIZED_CROP_SCALE of the area and
    RESIZED_CROP_RATIO aspect, resized (bilinear) to `size` x `size`, flipped horizontally with
    probability 1/2 (torchvision's RandomResizedCrop + RandomHorizontalFlip). uint8 (B, C, D, D) in,
    float32 (B, C, size, size) pixels on [0, 255] out. One affine grid sample for the whole batch;
    a box wider or taller than the image is clipped to it (torchvision redraws it up to 10 times).
    """
    b, device = images.shape[0], images.device
    draws = torch.rand(5, b, device=device, generator=generator)  # area, log-ratio, x, y, flip
    area = RESIZED_CROP_SCALE[0] + draws[0] * (RESIZED_CROP_SCALE[1] - RESIZED_CROP_SCALE[0])
    low, high = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    ratio = torch.exp(low + draws[1] * (high - low))
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # fractions of D
    center_x = (draws[2] * (1 - width) + width / 2) * 2 - 1  # on the grid's [-1, 1] scale
    center_y = (draws[3] * (1 - height) + height / 2) * 2 - 1
    sign = torch.where(draws[4] < 0.5, -1.0, 1.0)  # -1: mirrored
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, center_x
    theta[:, 1, 1], theta[:, 1, 2] = height, center_y
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchTransform:
    """uint8 (B, 3, D, D) batch on the device -> float32 (B, 3, S, S) model input: crop to `size`
    (default D: none) and augment (optional), then normalize.

    Normalization is folded into one multiply-add, x * (1 / (255 std)) - mean / std, which equals
    ToTensor + Normalize's (x / 255 - mean) / std up to float rounding.
    `augment`: a seeded generator on the images' device for the training crop `train_crop`:
    `augment_batch` (with `crop_padding` pixels of padding) for "pad", `random_resized_crop` for
    "random-resized"; None: `center_crop` only.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        augment: torch.Generator | None = None,
        channels_last: bool = False,
        crop_padding: int = CROP_PADDING,
        size: int | None = None,
        train_crop: str = "pad",
    ):
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1 / (255 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)
        self.augment, self.crop_padding, self.size, self.train_crop = augment, crop_padding, size, train_crop
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchTransform expects uint8 image batches, got {images.dtype}")
        size = self.size or images.shape[-1]
        if self.augment is None:
            images = center_crop(images, size)
        elif self.train_crop == "random-resized":
            images = random_resized_crop(images, self.augment, size)  # float32 pixels
        else:
            images = augment_batch(images, self.augment, self.crop_padding, size)
        x = images.float().mul_(self.scale).add_(self.shift)  # (B, C, S, S) float32, in place after the cast
        # Layout change last, on the float result: permuting uint8 is slower than permuting float32.
        return x.contiguous(memory_format=self.memory_format)
