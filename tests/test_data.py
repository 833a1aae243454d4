"""Tests for unsupdistill.data: folder listing, decoding, skipping bad files, digits."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from unsupdistill.config import DataConfig
from unsupdistill.data import (
    IMAGE_EXTENSIONS,
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    build_dataset,
    digits_split,
    list_image_files,
    load_rgb,
    resize_center_crop,
    write_skipped,
)

SIZE = 12


def _save(path: Path, img: Image.Image, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)
    return path


def _rgb(path: Path, color: tuple[int, int, int] = (200, 30, 40), size: tuple[int, int] = (20, 16)) -> Path:
    return _save(path, Image.new("RGB", size, color))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("unsupdistill.data")]


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


def test_image_extensions_cover_common_formats_and_not_save_only_or_stub_ones() -> None:
    for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
        assert ext in IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    for ext in (".pdf", ".h5", ".mpg", ".txt"):  # save-only, stub, identify-only, not an image
        assert ext not in IMAGE_EXTENSIONS


def test_list_image_files_recursive_sorted_case_insensitive_and_ignores_hidden(tmp_path: Path) -> None:
    for rel in ("b/z.JPG", "b/a.Png", "a.png", "c/d/e.jpeg", "B.tif"):
        _rgb(tmp_path / rel)
    _rgb(tmp_path / ".hidden" / "x.png")
    _rgb(tmp_path / "b" / ".y.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "data.npy").write_bytes(b"\x00")

    files = list_image_files(tmp_path)

    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == ["B.tif", "a.png", "b/a.Png", "b/z.JPG", "c/d/e.jpeg"]
    assert list_image_files(str(tmp_path)) == files


def test_list_image_files_follows_symlinks_without_looping(tmp_path: Path) -> None:
    _rgb(tmp_path / "data" / "a.png")
    _rgb(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "data", tmp_path / "data" / "loop")  # a loop back to itself
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")

    rel = [p.relative_to(tmp_path / "data").as_posix() for p in list_image_files(tmp_path / "data")]

    assert rel == ["a.png", "linked/b.png"]


def test_list_image_files_missing_or_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        list_image_files(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    file = _rgb(tmp_path / "a.png")
    with pytest.raises(DataError, match="not a directory"):
        list_image_files(file)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 16), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("gray.png", lambda: Image.new("L", (20, 16), 90), (90, 90, 90)),
        ("palette.png", _palette_with_transparency, (10, 200, 30)),
        ("palette.gif", _palette_with_transparency, (10, 200, 30)),
        ("rgba.png", lambda: Image.new("RGBA", (20, 16), (10, 20, 30, 0)), (10, 20, 30)),
        ("la.png", lambda: Image.new("LA", (20, 16), (70, 128)), (70, 70, 70)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (24, 16), (255, 0, 0, 0)), (0, 255, 255)),
        ("float.tif", lambda: Image.new("F", (20, 16), 0.5), (128, 128, 128)),
        ("bilevel.png", lambda: Image.new("1", (20, 16), 1), (255, 255, 255)),
    ],
)
def test_modes_decode_to_rgb(
    tmp_path: Path, name: str, make: Callable[[], Image.Image], expected: tuple[int, int, int]
) -> None:
    path = _save(tmp_path / name, make())

    img = load_rgb(path)
    out = resize_center_crop(img, SIZE)

    assert img.mode == "RGB"
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.uint8
    tol = 3 if name.endswith(".jpg") else 0
    assert np.abs(out[:, SIZE // 2, SIZE // 2].numpy().astype(int) - np.array(expected)).max() <= tol


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(3, axis=0)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode == "I;16"

    pixels = np.asarray(load_rgb(path))

    assert pixels.shape == (3, 4, 3) and pixels.dtype == np.uint8
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 4]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert resize_center_crop(load_rgb(path), SIZE).shape == (3, SIZE, SIZE)


def test_32_bit_integer_image_in_16_bit_range_is_scaled(tmp_path: Path) -> None:
    path = _save(tmp_path / "int.tif", Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))
    assert Image.open(path).mode == "I"

    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path / "rotated.jpg", img, exif=exif, quality=95)

    upright = load_rgb(path)

    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10].astype(int), np.asarray(upright)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 2

    assert np.asarray(load_rgb(path))[8, 8].tolist() == [255, 0, 0]


def test_resize_center_crop_keeps_the_centre() -> None:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # blue centre square, red sides

    out = resize_center_crop(img, 10)

    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8 and out.is_contiguous()
    assert (out[2, :, 2:8] == 255).all() and (out[0, :, 2:8] == 0).all()
    assert resize_center_crop(Image.new("RGB", (5, 30), (1, 2, 3)), 10).shape == (3, 10, 10)  # upscaling


# ----------------------------------------------------------------------------------------------
# Skipping unreadable files
# ----------------------------------------------------------------------------------------------


def _folder_with_bad_files(root: Path) -> list[Path]:
    _rgb(root / "good1.png")
    _rgb(root / "sub" / "good2.jpg")
    empty = root / "empty.jpg"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = _save(root / "full.jpg", Image.fromarray(noise), quality=95).read_bytes()
    (root / "full.jpg").unlink()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])  # the header is intact, half the pixel data is gone
    text = root / "text.png"
    text.write_text("this is not a png")
    return [empty, text, truncated]


def test_unreadable_files_are_skipped_counted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _folder_with_bad_files(tmp_path)

    with caplog.at_level(logging.INFO, logger="unsupdistill.data"):
        dataset = ImageFolderDataset(tmp_path, SIZE)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.files] == ["good1.png", "sub/good2.jpg"]
    assert len(dataset) == 2
    assert sorted(path for path, _ in dataset.skipped) == sorted(str(p) for p in bad)
    reasons = dict(dataset.skipped)
    assert "empty" in reasons[str(bad[0])]
    assert "truncated" in reasons[str(bad[2])].lower()
    warned = _warnings(caplog)
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "skipped 3 " in message and "data.strict=true" in message
    assert all(str(p) in message for p in bad)


def test_strict_raises_listing_the_bad_files(tmp_path: Path) -> None:
    bad = _folder_with_bad_files(tmp_path)

    with pytest.raises(DataError, match="data.strict=false") as err:
        ImageFolderDataset(tmp_path, SIZE, strict=True)

    assert all(str(p) in str(err.value) for p in bad)


def test_header_verify_defers_truncated_files_to_load_time(tmp_path: Path) -> None:
    _folder_with_bad_files(tmp_path)

    dataset = ImageFolderDataset(tmp_path, SIZE, verify="header", num_threads=1)

    assert sorted(Path(p).name for p, _ in dataset.skipped) == ["empty.jpg", "text.png"]
    index = [p.name for p in dataset.files].index("truncated.jpg")
    with pytest.raises(DataError, match="truncated.jpg"):
        dataset[index]


def test_decompression_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rgb(tmp_path / "small.png", size=(8, 8))
    _rgb(tmp_path / "warns.png", size=(15, 10))  # 150 pixels: Pillow only warns above the limit
    _rgb(tmp_path / "raises.png", size=(30, 30))  # 900 pixels: more than twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert [p.name for p in dataset.files] == ["small.png"]
    assert all("decompression bomb" in reason for _, reason in dataset.skipped)
    assert len(dataset.skipped) == 2
    with pytest.raises(Image.DecompressionBombWarning):
        load_rgb(tmp_path / "warns.png")


def test_broken_symlink_is_reported(tmp_path: Path) -> None:
    _rgb(tmp_path / "good.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "broken.png")

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert dataset.skipped == [(str(tmp_path / "broken.png"), "file not found (broken symlink?)")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_permission_denied_is_skipped(tmp_path: Path) -> None:
    _rgb(tmp_path / "good.png")
    locked = _rgb(tmp_path / "locked.png")
    locked.chmod(0)

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert dataset.skipped == [(str(locked), "permission denied")]


def test_empty_folder_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    _rgb(tmp_path / ".hidden.png")

    with pytest.raises(DataError, match="no image files") as err:
        ImageFolderDataset(tmp_path, SIZE)

    assert str(tmp_path) in str(err.value)


def test_folder_with_only_unreadable_images_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("nope")
    (tmp_path / "b.jpg").write_bytes(b"")

    with pytest.raises(DataError, match="none of the 2 image files") as err:
        ImageFolderDataset(tmp_path, SIZE)

    assert str(tmp_path) in str(err.value)


def test_write_skipped(tmp_path: Path) -> None:
    _folder_with_bad_files(tmp_path / "images")
    dataset = ImageFolderDataset(tmp_path / "images", SIZE)

    assert write_skipped(dataset, tmp_path / "skipped.txt") == 3
    lines = (tmp_path / "skipped.txt").read_text().splitlines()
    assert [tuple(line.split("\t")) for line in lines] == dataset.skipped
    assert write_skipped(DigitsDataset(8, indices=[0]), tmp_path / "none.txt") == 0
    assert not (tmp_path / "none.txt").exists()


# ----------------------------------------------------------------------------------------------
# Loading in worker processes
# ----------------------------------------------------------------------------------------------


def test_dataloader_with_worker_processes(tmp_path: Path) -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    for i, color in enumerate(colors):
        _rgb(tmp_path / f"{i}.png", color, size=(30 + i, 20))
    dataset = ImageFolderDataset(tmp_path, SIZE)
    assert pickle.loads(pickle.dumps(dataset)).files == dataset.files

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)

    assert [b.shape for b in batches] == [(2, 3, SIZE, SIZE)] * 2
    assert all(b.dtype == torch.uint8 for b in batches)
    centre = torch.cat(batches)[:, :, SIZE // 2, SIZE // 2]
    assert centre.tolist() == [list(c) for c in colors]


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------


def test_digits_dataset_pixels_shape_and_labels() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    native = DigitsDataset(8)
    assert len(native) == 1797 and native.labels.dtype == torch.int64 and len(native.labels) == 1797
    assert native.skipped == []
    expected = np.rint(digits.images[3] * 255 / 16).astype(np.uint8)
    assert (native[3].numpy() == expected[None]).all()  # same in all three channels

    big = DigitsDataset(32, indices=[5, 0, 7])
    assert big.images.shape == (3, 3, 32, 32) and big[0].dtype == torch.uint8
    assert big.labels.tolist() == digits.target[[5, 0, 7]].tolist()
    assert int(big.images.max()) == 255 and int(big.images.min()) == 0
    assert (big.images[:, 0] == big.images[:, 2]).all()


def test_digits_split_is_fixed_stratified_and_covers_everything() -> None:
    train, test = digits_split()

    assert (len(train), len(test)) == (1257, 540)
    assert not set(train) & set(test) and sorted(train + test) == list(range(1797))
    assert train == sorted(train) and test == sorted(test)
    assert digits_split() == (train, test)
    labels = DigitsDataset(8).labels
    test_counts = torch.bincount(labels[test], minlength=10).float()
    all_counts = torch.bincount(labels, minlength=10).float()
    assert torch.allclose(test_counts / all_counts, torch.full((10,), 0.3), atol=0.02)


def test_build_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="unsupdistill.data"):
        digits = build_dataset(DataConfig(), image_size=16)
    assert isinstance(digits, DigitsDataset) and len(digits) == 1797 and digits[0].shape == (3, 16, 16)
    assert "built-in digits (1,797 images)" in caplog.text

    _rgb(tmp_path / "a.png")
    folder = build_dataset(DataConfig(path=str(tmp_path)), image_size=16)
    assert isinstance(folder, ImageFolderDataset) and folder[0].shape == (3, 16, 16)
    resized = build_dataset(DataConfig(path=str(tmp_path), image_size=10, verify="header"), image_size=16)
    assert resized[0].shape == (3, 10, 10)
