from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.data.images import UnreadableImage, is_image_file, load_rgb, thread_map
from visionflow.errors import DatasetError


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"])
def test_every_common_format_loads_as_rgb(tmp_path, image_writer, ext):
    path = image_writer(tmp_path / f"x.{ext.upper()}", size=(9, 7), fmt={"jpg": "JPEG", "tif": "TIFF"}.get(ext))
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (9, 7)
    assert is_image_file(path)


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("1", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("I;16", "PNG"),
        ("I;16", "TIFF"),
    ],
)
def test_odd_modes_convert_to_rgb(tmp_path, image_writer, mode, fmt):
    path = image_writer(tmp_path / f"x.{fmt.lower()}", mode=mode, fmt=fmt)
    with Image.open(path) as raw:
        assert raw.mode.startswith(mode[:2])  # the fixture really has the odd mode
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (12, 10)


def test_grayscale_keeps_values_in_all_channels(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8)).save(tmp_path / "g.png")
    assert np.asarray(load_rgb(tmp_path / "g.png")).tolist() == [[[0] * 3, [100] * 3, [255] * 3]]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_transparency_is_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(load_rgb(tmp_path / "a.png")).tolist()[0]
    assert rgb[0] == [255, 0, 0]  # opaque: unchanged
    assert rgb[1] == [255, 255, 255]  # fully transparent: white, not the hidden blue
    assert all(126 <= v <= 129 for v in rgb[2])  # half-transparent black over white: grey


def test_palette_with_transparent_index_is_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    image.putdata([0, 1])
    image.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_rgb(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_cmyk_converts_to_plausible_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tiff")  # pure red in CMYK
    assert np.asarray(load_rgb(tmp_path / "c.tiff"))[0, 0].tolist() == [255, 0, 0]


def test_truncated_jpeg_is_a_dataset_error(tmp_path, image_writer):
    path = image_writer(tmp_path / "t.jpg", size=(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match="t.jpg") as info:
        load_rgb(path)
    assert info.value.reason == "truncated image data"


@pytest.mark.parametrize(
    "content,reason", [(b"", "empty file"), (b"hello, not pixels\n", "not a recognised image format")]
)
def test_unreadable_files_name_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage) as info:
        load_rgb(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_extension_check_is_case_insensitive():
    assert is_image_file(Path("a/B.JPEG")) and is_image_file(Path("x.Webp"))
    assert not is_image_file(Path("notes.txt")) and not is_image_file(Path("jpg"))


def test_thread_map_keeps_order_and_runs_on_several_threads():
    seen = set()

    def work(x: int) -> int:
        seen.add(threading.get_ident())
        time.sleep(0.0005)  # releases the GIL, like decoding or hashing does
        return x * x

    assert thread_map(work, range(400)) == [x * x for x in range(400)]
    assert len(seen) >= 2
    assert thread_map(work, []) == []
