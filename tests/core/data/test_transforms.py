"""PIL pipelines, statistics, and the batch-wise uint8 augmentation and fused normalization."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visionflow.data.transforms import CROP_PADDING, BatchTransform, augment_batch, eval_pipeline, mean_std, resize

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _images(n: int = 16, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)  # (N, 3, S, S)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_mean_std_matches_float_computation():
    images = _images(40, 16)
    mean, std = mean_std(images)
    pixels = images.double() / 255
    assert mean == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert std == pytest.approx(pixels.std((0, 2, 3), unbiased=False).tolist(), abs=1e-9)


def test_mean_std_of_a_constant_channel_is_not_zero():
    images = torch.full((4, 3, 8, 8), 7, dtype=torch.uint8)
    mean, std = mean_std(images)
    assert mean == pytest.approx([7 / 255] * 3)
    assert all(s > 0 for s in std)


def test_mean_std_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        mean_std(torch.zeros(2, 3, 4, 4))


def test_fused_normalization_equals_to_tensor_then_normalize():
    images = _images(4, 8)
    fused = BatchTransform(MEAN, STD, "cpu")(images)
    reference = torch.stack([eval_pipeline(8, MEAN, STD)(_pil(img)) for img in images])
    assert fused.dtype == torch.float32 and fused.shape == (4, 3, 8, 8)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)


def test_batch_transform_refuses_float_batches():
    with pytest.raises(TypeError, match="uint8"):
        BatchTransform(MEAN, STD, "cpu")(torch.zeros(2, 3, 4, 4))


def test_batch_transform_channels_last_layout():
    out = BatchTransform(MEAN, STD, "cpu", channels_last=True)(_images(4, 8))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_resize_matches_the_decoded_cache():
    # data/decoded.py stores image.resize((S, S), BILINEAR); the PIL pipeline must give the same pixels.
    photo = _pil(_images(1, 40)[0]).resize((60, 40))
    expected = np.asarray(photo.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(np.asarray(resize(32)(photo)), expected)


def test_pil_pipelines_output():
    photo = _pil(_images(1, 40)[0]).resize((50, 30))
    assert eval_pipeline(32, MEAN, STD)(photo).shape == (3, 32, 32)


def _crop_offset(out: torch.Tensor, image: torch.Tensor, padding: int) -> tuple[int, int] | None:
    """The (dy, dx) of the window of `image` zero-padded by `padding` that equals `out`, if any."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (padding,) * 4)
    return next(
        (
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(out, padded[:, dy : dy + h, dx : dx + w])
        ),
        None,
    )


def _crop_and_flip(
    outs: torch.Tensor, images: torch.Tensor, padding: int = CROP_PADDING
) -> list[tuple[tuple[int, int] | None, bool]]:
    """Per image: (crop offset, flipped?) explaining out = [flip](crop(image)); offset None if none does."""
    found = []
    for out, image in zip(outs, images):
        plain = _crop_offset(out, image, padding)
        found.append((plain, False) if plain is not None else (_crop_offset(out.flip(2), image, padding), True))
    return found


@pytest.mark.parametrize("padding, offsets", [(CROP_PADDING, 20), (2, 15), (0, 1)])
def test_augment_batch_is_a_padded_crop_then_maybe_a_flip(padding: int, offsets: int):
    images = _images(120, 6)
    out = augment_batch(images, torch.Generator().manual_seed(0), padding)
    assert out.shape == images.shape and out.dtype == torch.uint8
    found = _crop_and_flip(out, images, padding)
    assert all(offset is not None for offset, _ in found)
    # offsets vary per image: (2 * padding + 1)^2 possible, 81 at 4 px, 25 at 2 px; 0 px only flips
    assert len({offset for offset, _ in found}) >= offsets
    assert 40 < sum(flipped for _, flipped in found) < 80  # about half mirrored


def test_augmentation_is_deterministic_per_seed():
    images = _images(32, 8)
    first = augment_batch(images, torch.Generator().manual_seed(3))
    again = augment_batch(images, torch.Generator().manual_seed(3))
    other = augment_batch(images, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_batch_transform_augments_only_with_a_generator():
    images = _images(16, 8)
    plain = BatchTransform(MEAN, STD, "cpu")
    augmented = BatchTransform(MEAN, STD, "cpu", augment=torch.Generator().manual_seed(0))
    assert torch.equal(plain(images), plain(images))
    expected = plain(augment_batch(images, torch.Generator().manual_seed(0)))
    assert torch.equal(augmented(images), expected)


@pytest.mark.gpu
def test_augmentation_on_cuda_matches_shapes_and_seed():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    images = _images(64, 32).cuda()
    first = BatchTransform(MEAN, STD, "cuda", augment=torch.Generator("cuda").manual_seed(0), channels_last=True)
    again = BatchTransform(MEAN, STD, "cuda", augment=torch.Generator("cuda").manual_seed(0), channels_last=True)
    out = first(images)
    assert out.device.type == "cuda" and out.shape == (64, 3, 32, 32)
    assert torch.equal(out, again(images))
    crops = augment_batch(images, torch.Generator("cuda").manual_seed(1)).cpu()
    assert all(offset is not None for offset, _ in _crop_and_flip(crops, images.cpu()))


def test_batch_transform_crops_with_its_padding():
    images = _images(64, 8)
    flips_only = BatchTransform(MEAN, STD, "cpu", augment=torch.Generator().manual_seed(0), crop_padding=0)
    plain = BatchTransform(MEAN, STD, "cpu")(images)
    out = flips_only(images)
    mirrored = [torch.equal(o, p.flip(2)) for o, p in zip(out, plain)]
    assert all(m or torch.equal(o, p) for m, o, p in zip(mirrored, out, plain)) and 16 < sum(mirrored) < 48
