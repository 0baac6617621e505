"""PIL pipelines, statistics, and the batch-wise uint8 augmentation and fused normalization."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visionflow.config import decode_size
from visionflow.data import transforms
from visionflow.data.transforms import (
    CROP_PADDING,
    BatchTransform,
    augment_batch,
    center_crop,
    eval_pipeline,
    mean_std,
    random_resized_crop,
    resize,
)

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


def test_evaluation_center_crops_the_decoded_split_as_the_pil_pipeline_crops_a_file():
    # 224 px at crop_pct 0.875: decoded at 256, the central 224 (torchvision's resize 256 / crop 224)
    assert decode_size(224, 0.875) == 256 and decode_size(299, 299 / 342) == 342 and decode_size(32, None) == 32
    image = _images(1, 40)[0]
    decoded = torch.from_numpy(np.array(resize(decode_size(28, 0.875))(_pil(image)))).permute(2, 0, 1)[None]
    fast = BatchTransform(MEAN, STD, "cpu", size=28)(decoded)  # what evaluation feeds the model
    slow = eval_pipeline(28, MEAN, STD, crop_pct=0.875)(_pil(image))  # what prediction feeds it
    assert decoded.shape[-1] == 32 and fast.shape == (1, 3, 28, 28)
    torch.testing.assert_close(fast[0], slow, atol=1e-5, rtol=0)
    assert torch.equal(center_crop(decoded, 28), decoded[..., 2:30, 2:30])


def test_a_training_crop_smaller_than_the_decoded_images_is_random():
    images = _images(64, 12)
    crops = augment_batch(images, torch.Generator().manual_seed(0), padding=0, size=8)  # RandomCrop(8), no padding
    assert crops.shape == (64, 3, 8, 8)
    windows = images.unfold(2, 8, 1).unfold(3, 8, 1)  # (N, 3, 5, 5, 8, 8): every 8x8 window
    for image, crop in zip(windows, crops):
        matches = [
            (y, x) for y in range(5) for x in range(5) for c in (crop, crop.flip(-1)) if torch.equal(image[:, y, x], c)
        ]
        assert matches
    assert len({tuple(c.flatten()[:8].tolist()) for c in crops}) > 32  # positions vary


def test_random_resized_crop_of_the_whole_image_is_the_image_or_its_mirror(monkeypatch):
    monkeypatch.setattr(transforms, "RESIZED_CROP_SCALE", (1.0, 1.0))
    monkeypatch.setattr(transforms, "RESIZED_CROP_RATIO", (1.0, 1.0))
    images = _images(32, 16)
    out = random_resized_crop(images, torch.Generator().manual_seed(0), 16)
    mirrored = [torch.equal(o.round().to(torch.uint8), i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o.round().to(torch.uint8), i) for o, i in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < 32


def test_random_resized_crops_are_seeded_sized_and_in_the_pixel_range():
    images = _images(16, 64)
    first = random_resized_crop(images, torch.Generator().manual_seed(3), 24)
    assert first.shape == (16, 3, 24, 24) and first.dtype == torch.float32
    assert torch.equal(first, random_resized_crop(images, torch.Generator().manual_seed(3), 24))
    assert not torch.equal(first, random_resized_crop(images, torch.Generator().manual_seed(4), 24))
    assert first.min() >= 0 and first.max() <= 255
    train = BatchTransform(MEAN, STD, "cpu", torch.Generator().manual_seed(3), size=24, train_crop="random-resized")
    torch.testing.assert_close(
        train(images), BatchTransform(MEAN, STD, "cpu")(first.round().to(torch.uint8)), atol=0.02, rtol=0
    )
