"""Image transforms, in two forms.

PIL pipelines (torchvision's Resize, ToTensor, Normalize, Compose) turn one file's image into a
model input for evaluation, prediction and previews. The training fast path never touches PIL:
the decoded split is a uint8 (N, 3, H, W) tensor already on the training device, and each batch
is augmented there (random crop with zero padding, horizontal flip) from a seeded
torch.Generator, then normalized by one fused multiply-add. Both forms use the same statistics:
mean and std per channel on [0, 1] pixels.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_PADDING = 4  # pixels of zero padding before the random crop: the CIFAR standard (recipes set data.crop_padding)
_STATS_CHUNK = 4096  # images per bincount pass: bounds the temporary copy to ~12 MB at 32x32
_MIN_STD = 1 / 255  # one grey level: a constant channel would otherwise divide by zero

# ---------------------------------------------------------------------------------------------
# PIL pipelines (one image at a time)


def resize(image_size: int) -> Any:
    """To `image_size` x `image_size`, bilinear with antialiasing: exactly what decoded.py stores, so a
    model sees the same pixels whether an image comes from the decoded cache or from a file."""
    from torchvision import transforms as T  # here: torchvision's import costs ~2 s (torch._dynamo)

    return T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR)


def eval_pipeline(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """PIL image -> normalized float32 (3, S, S): what evaluation and prediction feed the model."""
    from torchvision import transforms as T

    return T.Compose([resize(image_size), T.ToTensor(), T.Normalize(mean, std)])


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


def augment_batch(images: Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """The training augmentation, per image: random crop after zero padding by `padding` pixels,
    then a horizontal flip with probability 1/2 (torchvision's RandomCrop(padding) +
    RandomHorizontalFlip). uint8 (B, C, H, W) in and out.

    One gather over the padded batch does both (a flip is just reversed column indices): no
    Python loop over images, the same kernels on every device.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, Hp, Wp), Hp = H + 2p
    offsets = torch.randint(0, 2 * padding + 1, (2, b), device=device, generator=generator)  # (2, B): dy, dx
    flip = torch.rand(b, device=device, generator=generator) < 0.5  # (B,)
    col_order = torch.arange(w, device=device)  # (W,)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # (B, H) row in the padded image
    cols = offsets[1, :, None] + torch.where(flip[:, None], col_order.flip(0), col_order)  # (B, W)
    index = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]  # (B, H, W) flat pixel in (Hp, Wp)
    out = padded.flatten(2).gather(2, index.view(b, 1, h * w).expand(b, c, h * w))  # (B, C, H*W)
    return out.unflatten(2, (h, w))  # (B, C, H, W)


class BatchTransform:
    """uint8 (B, 3, H, W) batch on the device -> float32 model input: augment (optional), normalize.

    Normalization is folded into one multiply-add, x * (1 / (255 std)) - mean / std, which equals
    ToTensor + Normalize's (x / 255 - mean) / std up to float rounding.
    `augment`: a seeded generator on the images' device to apply `augment_batch` (with
    `crop_padding` pixels of padding), None for none.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        augment: torch.Generator | None = None,
        channels_last: bool = False,
        crop_padding: int = CROP_PADDING,
    ):
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1 / (255 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)
        self.augment = augment
        self.crop_padding = crop_padding
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchTransform expects uint8 image batches, got {images.dtype}")
        if self.augment is not None:
            images = augment_batch(images, self.augment, self.crop_padding)
        x = images.float().mul_(self.scale).add_(self.shift)  # (B, C, H, W) float32, in place after the cast
        # Layout change last, on the float result: permuting uint8 is slower than permuting float32.
        return x.contiguous(memory_format=self.memory_format)
